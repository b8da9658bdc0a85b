"""Shared fixtures: an isolated cache, no network, and small generated data."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Nothing in the tests may reach a hub; fail loudly instead. The hub cache is the tests' own (fake_hub lays
# uploaded models there), set before huggingface_hub reads it at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
_HUB_CACHE = tempfile.TemporaryDirectory(prefix="mbti-lightning-tests-hub-")
os.environ["HF_HUB_CACHE"] = _HUB_CACHE.name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One cache per test session: the demo corpus and tokenizer are built once, and nothing touches ~/.cache."""
    root = tmp_path_factory.mktemp("cache")
    os.environ["MBTI_LIGHTNING_CACHE"] = str(root / "mbti_lightning")
    os.environ["HF_DATASETS_CACHE"] = str(root / "datasets")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    """A 3,000-row generated corpus with the columns of minhaozhang/mbti, as parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mbti_lightning.demo import generate_rows

    path = tmp_path / "mbti.parquet"
    pq.write_table(pa.table(generate_rows(num_rows=3000, seed=7)), path)
    return path


def fit_demo(run: Path, *args: str) -> Path:
    """`mbti-lightning fit --config configs/demo.yaml ARGS` in folder `run`, in-process; returns its checkpoint folder."""
    from mbti_lightning.cli import cli_main

    mp = pytest.MonkeyPatch()
    mp.chdir(run)
    mp.setattr(sys, "argv", ["mbti-lightning"])  # LightningCLI warns when sys.argv (pytest's) and args are both given
    try:
        cli_main(["fit", "--config", str(REPO / "configs/demo.yaml"), *args])
    finally:
        mp.undo()
    return run / "checkpoints/demo"
