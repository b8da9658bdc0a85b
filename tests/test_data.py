from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import load_dataset

from mbti_lightning.data import MBTIDataModule
from mbti_lightning.tokenizer import load_tokenizer


def make_dm(path: Path, **kwargs) -> MBTIDataModule:
    args = dict(dataset="parquet", data_files=str(path), tokenizer="demo", keep_fraction=0.5, num_workers=0)
    return MBTIDataModule(**(args | kwargs))


def test_seed_split_parity(corpus_file):
    """The DataModule keeps exactly the rows the seed's own datasets calls keep, in the same order."""
    # The seed recipe, call for call (seed/tutorial.md), on the same file.
    seed = load_dataset("parquet", data_files=str(corpus_file), split="train")
    for column in ["mbti", "E-I", "N-S", "F-T", "J-P"]:
        seed = seed.class_encode_column(column)
    seed = seed.train_test_split(test_size=0.5, stratify_by_column="mbti", seed=0)["test"]
    seed = seed.train_test_split(test_size=0.2, stratify_by_column="mbti", seed=1)

    dm = make_dm(corpus_file)
    dm.setup("fit")
    tokenizer = load_tokenizer("demo")
    for ours, theirs in [("train", "train"), ("validation", "test")]:
        expected = tokenizer(seed[theirs]["body"][:], truncation=True, max_length=512)["input_ids"]
        assert dm.splits[ours]["input_ids"][:] == expected
        assert dm.splits[ours]["labels"][:] == seed[theirs]["J-P"][:]
    assert len(dm.splits["train"]) == 1200 and len(dm.splits["validation"]) == 300


def test_seed_split_parity_when_a_type_vanishes_after_the_first_split(tmp_path):
    """A type so rare that the first split discards all its rows: datasets then stratifies the second
    split over the types still there, and so does the data module."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mbti_lightning.demo import generate_rows

    rows = generate_rows(num_rows=6000, seed=7)
    rare = [i for i, t in enumerate(rows["mbti"]) if t == "estp"]
    keep = [i for i in range(6000) if rows["mbti"][i] != "estp" or i in rare[:2]]  # two ESTP rows
    path = tmp_path / "rare.parquet"
    pq.write_table(pa.table({k: [v[i] for i in keep] for k, v in rows.items()}), path)

    seed = load_dataset("parquet", data_files=str(path), split="train")
    for column in ["mbti", "E-I", "N-S", "F-T", "J-P"]:
        seed = seed.class_encode_column(column)
    seed = seed.train_test_split(test_size=0.2, stratify_by_column="mbti", seed=0)["test"]
    assert "estp" not in {seed.features["mbti"].int2str(i) for i in seed["mbti"][:]}
    seed = seed.train_test_split(test_size=0.2, stratify_by_column="mbti", seed=1)

    dm = make_dm(path, keep_fraction=0.2)
    dm.setup("fit")
    for ours, theirs in [("train", "train"), ("validation", "test")]:
        assert dm.splits[ours]["labels"][:] == seed[theirs]["J-P"][:]
        assert dm.splits[ours]["input_ids"][:] == load_tokenizer("demo")(seed[theirs]["body"][:])["input_ids"]


def test_test_split_is_unseen(corpus_file):
    dm = make_dm(corpus_file)
    dm.setup("test")
    seen = {tuple(x) for name in ("train", "validation") for x in dm.splits[name]["input_ids"]}
    assert len(dm.splits["test"]) == len(dm.splits["validation"])
    assert not seen & {tuple(x) for x in dm.splits["test"]["input_ids"]}


def test_second_setup_reads_the_cache(corpus_file, monkeypatch):
    make_dm(corpus_file).setup("fit")

    def fail(*args):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(MBTIDataModule, "_build", fail)
    dm = make_dm(corpus_file)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 1200
    changes = [
        {"max_length": 16},
        {"keep_seed": 5},
        {"val_seed": 5},
        {"target": "E-I"},
        {"split": "author"},
        {"mask_type_mentions": True},
        {"explode_separator": "."},
    ]
    for changed in changes:
        with pytest.raises(AssertionError, match="tokenized again"):  # a changed setting is never served stale
            make_dm(corpus_file, **changed).setup("fit")


def test_batches_are_right_padded_with_a_pad_token(corpus_file):
    dm = make_dm(corpus_file, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert dm.tokenizer.pad_token == "</s>"  # the demo tokenizer has none; eos stands in, as for Phi-3
    assert batch["input_ids"].shape[1] % 8 == 0
    lengths = batch["attention_mask"].sum(1)
    for row, n in zip(batch["input_ids"], lengths):
        assert (row[n:] == dm.tokenizer.pad_token_id).all() and batch["attention_mask"][0, 0] == 1


def test_batches_are_page_locked_only_for_a_cuda_trainer(corpus_file):
    """Page-locked batches are copied to the GPU without waiting for the work queued before them."""
    dm = make_dm(corpus_file)
    dm.setup("fit")
    assert not dm.val_dataloader().pin_memory  # no trainer (or a CPU one)
    dm.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), world_size=1, global_rank=0
    )
    assert dm.val_dataloader().pin_memory


def test_several_tokenizing_processes_give_the_same_splits(corpus_file):
    one, two = make_dm(corpus_file), make_dm(corpus_file, preprocessing_workers=2, max_length=511)
    one.setup("fit")
    two.setup("fit")  # max_length 511 changes nothing here but keeps the two caches apart
    assert one.splits["train"]["input_ids"][:] == two.splits["train"]["input_ids"][:]


def test_missing_column_is_named(corpus_file):
    dm = make_dm(corpus_file, text_column="Comment")
    with pytest.raises(ValueError, match="column 'Comment' not found .* it has \\['author', 'body'"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_length": 0}, "max_length must be positive"), ({"target": "JP"}, "unknown target .JP.; expected an axis")],
)
def test_bad_settings(corpus_file, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_dm(corpus_file, **kwargs)
