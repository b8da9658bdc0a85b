"""Heads on a frozen backbone's cached features (`model.frozen`): features computed once and never stale, and a
frozen model that every command answers with the same probabilities."""

from __future__ import annotations

import csv
import json
import logging
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, fit_demo
from datasets import Dataset
from test_real_data import kaggle_args, kaggle_file
from test_reliability import SHORT_DEMO, run_cli
from test_seams import main_says, run
from test_serve import TEXTS, call, server
from transformers import BertConfig, pipeline

from mbti_lightning import evaluation, features
from mbti_lightning.cache import cache_root
from mbti_lightning.export import main as export_main
from mbti_lightning.loading import datamodule, load
from mbti_lightning.model import MBTIClassifier
from mbti_lightning.tokenizer import load_tokenizer

SHORT = ["--trainer.max_epochs", "1", "--trainer.val_check_interval", "1.0", "--data.batch_size", "64"]
HEAD = ["--model.optimizer", "adamw", "--model.learning_rate", "1e-2"]


def frozen_fit(folder: Path, *args: str) -> Path:
    """A frozen fit of the demo config on a Kaggle-shaped file in `folder`; its ``last.ckpt``."""
    data = folder / "users.csv"
    if not data.exists():
        kaggle_file(data, num_rows=1500)
    fit_demo(folder, *kaggle_args(data), "--model.frozen", "{pooling: model}", *SHORT, *HEAD, *args)
    return folder / "checkpoints/demo/last.ckpt"


def passes(monkeypatch) -> list[Path]:
    """The features files each backbone pass writes, from now on."""
    written = []
    compute = features.compute

    def counted(embed, rows, batch_size, path, desc):
        written.append(path)
        compute(embed, rows, batch_size, path, desc)

    monkeypatch.setattr(features, "compute", counted)
    return written


def test_features_are_made_once_and_again_whenever_what_makes_them_changes(tmp_path, monkeypatch, caplog):
    written = passes(monkeypatch)
    frozen_fit(tmp_path)
    assert [path.name for path in written] == ["train.npy", "validation.npy"]
    assert written[0].parent.parent == cache_root() / "features"

    def backbone_pass(*args, **kwargs):
        raise AssertionError("a training or validation step ran the backbone")

    caplog.clear()
    with monkeypatch.context() as mp, caplog.at_level(logging.INFO):
        mp.setattr(MBTIClassifier, "forward", backbone_pass)  # every step reads the cached features
        frozen_fit(tmp_path)  # the same settings: no backbone pass, and the log names the files read
    assert len(written) == 2
    assert f"features of train: read {written[0]} (no backbone pass)" in caplog.text

    changes = {
        "max_length": ["--data.max_length", "64"],
        "pooling": ["--model.frozen", "{pooling: mean}"],
        "layer": ["--model.frozen", "{pooling: mean, layer: 1}"],
    }
    for name, args in changes.items():
        frozen_fit(tmp_path, *args)
        assert [path.name for path in written[-2:]] == ["train.npy", "validation.npy"], name
    data = tmp_path / "users.csv"  # one person's posts edited: the data's fingerprint changes
    rows = list(csv.reader(data.open()))
    rows[5][1] = "an edited post|||" + rows[5][1]
    with data.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    frozen_fit(tmp_path)
    assert len(written) == 10 and len({path.parent for path in written}) == 5  # five keys, each made once


def test_a_pass_stopped_half_way_resumes_where_it_stopped_and_gives_the_whole_passs_features(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "SAVE_EVERY", 0.0)  # its progress saved after every batch
    rows = Dataset.from_dict({"input_ids": [[i] * (1 + i % 7) for i in range(50)]}).map(
        lambda r: {"length": len(r["input_ids"])}
    )
    embedded = []

    def embed(ids, stop_after=None):
        if stop_after is not None and len(embedded) == stop_after:
            raise KeyboardInterrupt  # as a kill would, mid pass
        embedded.append(len(ids))
        return torch.tensor([[float(sum(x)), float(len(x))] for x in ids])

    whole = tmp_path / "whole.npy"
    features.compute(embed, rows, 8, whole, "whole")
    del embedded[:]
    path = tmp_path / "train.npy"
    with pytest.raises(KeyboardInterrupt):
        features.compute(lambda ids: embed(ids, stop_after=3), rows, 8, path, "train")
    assert not path.exists() and (tmp_path / ".train.partial.npy").exists()
    assert json.loads((tmp_path / ".train.progress.json").read_text()) == {"rows": 24}
    del embedded[:]
    features.compute(embed, rows, 8, path, "train")
    assert embedded == [8, 8, 8, 2]  # only the rows not done before
    assert np.array_equal(np.load(path), np.load(whole))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.npy", "whole.npy"]


@pytest.mark.slow
def test_a_fit_killed_in_its_feature_pass_resumes_the_pass_where_it_was_saved(tmp_path):
    """SIGKILL after the third batch of the training split's pass (its progress saved after each batch): the next
    fit says where it resumes, computes only the rest, and its features are an uninterrupted pass's."""
    args = [*SHORT_DEMO, "--model.frozen", "{}", "--data.eval_batch_size", "64", "--trainer.max_epochs", "1"]
    cache = {"MBTI_LIGHTNING_CACHE": str(tmp_path / "cache")}
    kill = ["--trainer.callbacks+=killing.KillDuringFeatures", "--trainer.callbacks.after=3"]
    died = run_cli(tmp_path, "fit", *args, *kill, env=cache)
    assert died.returncode == -signal.SIGKILL
    (partial,) = (tmp_path / "cache/features").glob("*/.train.partial.npy")
    assert json.loads(partial.with_name(".train.progress.json").read_text()) == {"rows": 192}
    resumed = run_cli(tmp_path, "fit", *args, env=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"features of train: resuming {partial} at row 192 of 1280" in resumed.stderr + resumed.stdout
    whole = tmp_path / "whole"
    whole.mkdir()
    assert run_cli(whole, "fit", *args, env={"MBTI_LIGHTNING_CACHE": str(whole / "cache")}).returncode == 0
    (expected,) = (whole / "cache/features").glob("*/train.npy")
    assert np.array_equal(np.load(partial.with_name("train.npy")), np.load(expected))


def test_a_truncated_features_file_is_refused_with_a_message_naming_it(tmp_path, monkeypatch, capsys):
    written = passes(monkeypatch)
    frozen_fit(tmp_path)
    path = written[0]
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    data = tmp_path / "users.csv"
    frozen = ["--model.frozen", "{pooling: model}"]
    argv = ["fit", "--config", str(REPO / "configs/demo.yaml"), *kaggle_args(data), *frozen, *SHORT]
    line = main_says(tmp_path, argv, capsys)
    assert f"features file {path} is damaged" in line and "delete it" in line


@pytest.mark.parametrize(
    "frozen, message",
    [
        ("{pooling: max}", "model.frozen.pooling 'max': use one of model, mean"),
        ("{pooling: model, layer: 1}", "model.frozen.layer 1: pooling 'model' reads what the model's head reads"),
        ("{pooling: mean, layer: 9}", "model.frozen.layer 9: the model has hidden layers 0 to 2"),
        ("{pool: mean}", "model.frozen: unknown setting pool"),
    ],
)
def test_frozen_settings_that_cannot_work_are_one_line_naming_them(tmp_path, capsys, frozen, message):
    data = kaggle_file(tmp_path / "users.csv", num_rows=300)
    argv = ["fit", "--config", str(REPO / "configs/demo.yaml"), *kaggle_args(data), *SHORT, "--model.frozen", frozen]
    assert message in main_says(tmp_path, argv, capsys)


def small_bert(folder: Path) -> Path:
    tokenizer = load_tokenizer("demo")
    tokenizer.save_pretrained(folder)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    BertConfig(vocab_size=len(tokenizer), max_position_embeddings=256, **small).save_pretrained(folder)
    return folder


def printed(probs: torch.Tensor) -> torch.Tensor:
    """Probabilities as `predict` and `serve` print them: four decimals."""
    return probs.double().round(decimals=4).float()


def predicted(folder: Path, model: str, out: str, *args: str) -> list[float]:
    """`predict --ckpt_path MODEL` (on the test split, or on `--data.predict_file`): each row's I probability."""
    path = folder / out
    run(folder, "predict", "--ckpt_path", model, "--predictions.output", str(path), "--predictions.text", "none", *args)
    rows = list(csv.DictReader(path.open()))
    return [float(r["E-I_prob"]) if r["E-I"] == "I" else 1 - float(r["E-I_prob"]) for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["decoder", "encoder"])
def test_a_head_on_the_models_own_pooling_answers_alike_in_pipeline_predict_serve_and_report(tmp_path, model):
    """Its export is an ordinary transformers classifier: `pipeline` on it and the rows behind `report` give one
    probability per text within 1e-5 (fp32), and `predict` and `serve` print it (to four decimals), on the demo's
    tiny Phi-3 and a tiny BERT."""
    args = ["--data.target", "E-I"]
    if model == "encoder":
        args += ["--model.model_name_or_path", str(small_bert(tmp_path / "bert")), "--model.from_scratch", "true"]
    ckpt = frozen_fit(tmp_path, *args)
    out = tmp_path / "model"
    export_main(["--ckpt", str(ckpt), "--out", str(out)])

    loaded = load(str(out))
    dm = datamodule(loaded)
    dm.hparams.data_files = str(tmp_path / "users.csv")
    dm.prepare_data()
    dm.setup("test")
    behind_report = evaluation.split_outputs(loaded.model, dm, "test").logits["E-I"].softmax(-1)[:, 1]
    dm.predict_dataloader()  # the test split's texts as the model reads them
    texts = dm.predict_inputs["text"]
    answers = pipeline("text-classification", model=str(out), top_k=None)(texts, truncation=True)
    by_pipeline = torch.tensor([{a["label"]: a["score"] for a in answer}["I"] for answer in answers])
    data = ["--data.data_files", str(tmp_path / "users.csv")]
    by_predict = torch.tensor(predicted(tmp_path, str(out), "predicted.csv", *data))
    assert torch.allclose(by_pipeline, behind_report, atol=1e-5)
    assert torch.allclose(by_predict, printed(behind_report), atol=1e-5)
    with server(out, tmp_path / "server.log") as (port, _):
        status, answer = call(port, {"texts": texts[:32]})
    assert status == 200
    served = [p["E-I_prob"] if p["E-I"] == "I" else 1 - p["E-I_prob"] for p in answer["predictions"]]
    assert torch.allclose(torch.tensor(served), printed(behind_report[:32]), atol=1e-5)


@pytest.mark.slow
def test_a_head_on_a_middle_layers_mean_runs_through_every_command_and_its_card_says_what_runs_it(tmp_path):
    """Four axes from one feature pass; the frozen fit's validation (on cached features) is `validate`'s on the
    texts; its export answers as the checkpoint in `predict` and as `predict` in `serve`; its card names
    mbti-lightning as what runs it."""
    data = kaggle_file(tmp_path / "users.csv", num_rows=1500)
    config = ["--config", str(REPO / "configs/demo.yaml"), *kaggle_args(data), "--data.target", "all"]
    frozen = ["--model.frozen", "{pooling: mean, layer: 1}"]
    fitted = run(tmp_path, "fit", *config, *frozen, *SHORT, *HEAD).trainer.callback_metrics
    ckpt = tmp_path / "checkpoints/demo/last.ckpt"
    validated = run(tmp_path, "validate", *config, "--ckpt_path", str(ckpt)).trainer.callback_metrics
    keys = ["val/loss"] + [f"val/{axis}/{m}" for axis in ("E-I", "N-S", "F-T", "J-P") for m in ("mcc", "author/mcc")]
    for key in keys:
        assert float(validated[key]) == pytest.approx(float(fitted[key]), abs=1e-5), key

    out = tmp_path / "model"
    export_main(["--ckpt", str(ckpt), "--out", str(out), "--no-calibrate"])
    card = (out / "README.md").read_text()
    assert "the mean over the post's tokens of hidden layer 1" in card and "mbti-lightning predict" in card
    files = ["--data.data_files", str(data)]
    from_ckpt = torch.tensor(predicted(tmp_path, str(ckpt), "from_ckpt.csv", *files))
    from_export = torch.tensor(predicted(tmp_path, str(out), "from_export.csv", *files))
    assert len(from_ckpt) > 100 and torch.allclose(from_ckpt, from_export, atol=1e-5)
    with server(out, tmp_path / "server.log") as (port, _):
        status, answer = call(port, {"texts": TEXTS})
    by_predict = predicted_texts(tmp_path, str(out))
    assert status == 200
    served = [p["E-I_prob"] if p["E-I"] == "I" else 1 - p["E-I_prob"] for p in answer["predictions"]]
    assert torch.allclose(torch.tensor(served), by_predict, atol=1e-5)


def predicted_texts(folder: Path, model: str) -> torch.Tensor:
    """`predict` on `TEXTS` as a predict file: each text's I probability."""
    path = folder / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return torch.tensor(predicted(folder, model, "texts.csv", "--data.predict_file", str(path)))
