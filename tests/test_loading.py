"""Every command sees the model the card describes: one loader, the trained dtype, the trained data settings.

For a bf16-trained and an fp32-trained checkpoint and their exports, each command's model holds its weights
in the checkpoint's dtype, and the probabilities of the same texts agree across the paths: `predict` on the
checkpoint and on the export, the server's answer, `pipeline` on the export, `explain`, and the split outputs
behind `report` and the card.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, fit_demo
from transformers import pipeline

from mbti_lightning import evaluation, loading
from mbti_lightning.cli import cli_main
from mbti_lightning.data.tokenized import tokenize
from mbti_lightning.export import main as export_main

TEXTS = [
    "i made a list and a schedule for the whole week, everything is planned",
    "whatever lol lets just improvise and see",
    "the the the",
    "my calendar has a deadline for every goal, tidy and prepared",
    "spontaneous trip, no options decided, totally chill",
]
#: How far two paths may differ for one text's probability. fp32: only the summation order differs. bf16: the
#: model computes in bf16 (8 bits of mantissa), and a text padded in a batch of another shape (another length,
#: other neighbours: `pipeline` runs one text at a time) goes through matmul kernels blocked differently, so its
#: activations round differently. Measured on the bf16 fit below: 4.5e-4 between a text alone and in a batch of
#: five (as much as between computing in bf16 and in fp32, 3.9e-4); the bound is 4x that. Texts in batches of the
#: same shape give equal bf16 answers (the two predicts below).
BOUND = {"float32": 1e-5, "bfloat16": 2e-3}
#: `predict` and the server round probabilities to 4 decimals.
ROUNDED = 5e-5


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def run(request, tmp_path_factory) -> dict:
    """A short demo fit in `dtype` (bf16-true trains a bf16 model), its last checkpoint and its uncalibrated export."""
    dtype = request.param
    folder = tmp_path_factory.mktemp(dtype)
    precision = {"float32": "32-true", "bfloat16": "bf16-true"}[dtype]
    steps = ["--trainer.max_steps", "30", "--trainer.val_check_interval", "30", "--trainer.precision", precision]
    ckpt = fit_demo(folder, *steps) / "last.ckpt"
    out = folder / "exported"
    export_main(["--ckpt", str(ckpt), "--out", str(out), "--no-calibrate"])
    (folder / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    return {"dtype": dtype, "dir": folder, "ckpt": ckpt, "export": out}


def predict(run: dict, *args: str) -> tuple[list[float], torch.dtype]:
    """`mbti-lightning predict` on the texts; its P probabilities and the dtype its model computed in."""
    out = run["dir"] / f"predicted-{len(list(run['dir'].glob('predicted-*')))}.csv"
    argv = [
        "predict",
        "--config",
        str(REPO / "configs/demo.yaml"),
        "--data.predict_file",
        str(run["dir"] / "texts.txt"),
    ]
    cli = cli_main([*argv, "--predictions.output", str(out), *args])
    return p_of(csv.DictReader(out.open())), next(cli.trainer.lightning_module.model.parameters()).dtype


def p_of(records) -> list[float]:
    """P's probability from records of the letter and its probability, as `predict` and the server write them."""
    return [float(r["J-P_prob"]) if r["J-P"] == "P" else 1 - float(r["J-P_prob"]) for r in records]


def probabilities(loaded: loading.Loaded, texts: list[str]) -> list[float]:
    """P's probability from the loaded model, the texts prepared as training did: the reference."""
    encoded = tokenize({"text": texts}, loaded.tokenizer, "text", loaded.max_length, loaded.mask)
    batch = loaded.tokenizer.pad({"input_ids": encoded["input_ids"]}, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(batch["input_ids"], batch["attention_mask"]).softmax(-1)[:, 1].tolist()


@pytest.fixture
def in_run_folder(run, monkeypatch):
    monkeypatch.chdir(run["dir"])
    monkeypatch.setattr(sys, "argv", ["mbti-lightning"])


def test_every_command_computes_in_the_trained_dtype_and_gives_the_same_probabilities(run, in_run_folder):
    dtype, bound = getattr(torch, run["dtype"]), BOUND[run["dtype"]]
    from_ckpt, from_export = loading.load(run["ckpt"]), loading.load(str(run["export"]))
    assert (from_ckpt.dtype, from_export.dtype) == (dtype, dtype)
    exported = json.loads((run["export"] / "config.json").read_text())
    assert exported["dtype"] == run["dtype"] and exported["mbti_lightning"]["data"]["max_length"] == 128

    reference = probabilities(from_ckpt, TEXTS)
    assert probabilities(from_export, TEXTS) == reference  # the same weights, the same batch

    by_predict, predict_dtype = predict(run, "--ckpt_path", str(run["ckpt"]))
    by_export, export_dtype = predict(
        run, "--model.model_name_or_path", str(run["export"]), "--model.from_scratch=false"
    )
    assert (predict_dtype, export_dtype) == (dtype, dtype)
    assert by_export == by_predict  # the same weights in batches of the same shape: equal, in bf16 too
    assert by_predict == pytest.approx(reference, abs=bound + ROUNDED)

    from mbti_lightning.serve import answer

    served = answer(from_ckpt, [{"texts": TEXTS, "person": False}])[0]["predictions"]
    assert p_of(served) == pytest.approx(reference, abs=bound + ROUNDED)

    classify = pipeline("text-classification", model=str(run["export"]), top_k=None, device="cpu")
    assert classify.model.dtype == dtype
    by_pipeline = [{s["label"]: s["score"] for s in scores}["P"] for scores in classify(TEXTS, truncation=True)]
    assert by_pipeline == pytest.approx(reference, abs=bound)

    cli_main(["explain", "--ckpt_path", str(run["ckpt"]), "--texts", json.dumps(TEXTS), "--steps", "4"])
    report = json.loads(Path("explanations/explanations.json").read_text())
    assert report["meta"]["dtype"] == run["dtype"]
    by_explain = [text["heads"]["J-P"]["probabilities"]["P"] for text in report["texts"]]
    assert by_explain == pytest.approx(reference, abs=bound)


def test_the_report_and_the_card_score_the_test_split_as_predict_does(run, in_run_folder):
    """`predict` without a file runs on the test split; the report scores the checkpoint's model there, and the
    card the exported one, through `evaluation.split_outputs`."""
    bound = BOUND[run["dtype"]]
    out = run["dir"] / "test-split.csv"
    cli_main(
        [
            "predict",
            "--config",
            str(REPO / "configs/demo.yaml"),
            "--ckpt_path",
            str(run["ckpt"]),
            "--predictions.output",
            str(out),
        ]
    )
    by_predict = p_of(csv.DictReader(out.open()))
    for source in (run["ckpt"], str(run["export"])):
        loaded = loading.load(source)
        dm = loading.datamodule(loaded)
        dm.setup("test")
        outputs = evaluation.split_outputs(loaded.model, dm, "test")
        assert outputs.logits["J-P"].softmax(-1)[:, 1].tolist() == pytest.approx(by_predict, abs=bound + ROUNDED)


def test_a_report_on_a_checkpoint_of_ones_own_csv_takes_the_checkpoints_data_and_says_so(
    tmp_path, corpus_file, monkeypatch, caplog
):
    """Trained on one's own file, then `report --config configs/demo.yaml`: the report is on that file's test split,
    and one line names each data setting the config gave otherwise."""
    own = ["--data.dataset", "parquet", "--data.data_files", str(corpus_file), "--data.split", "author"]
    own += ["--data.test_fraction", "0.2", "--data.max_length", "64", "--data.keep_fraction", "1.0"]
    ckpt = fit_demo(tmp_path, *own, "--trainer.max_steps", "10", "--trainer.val_check_interval", "10") / "last.ckpt"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mbti-lightning"])
    caplog.set_level(logging.INFO)
    args = ["--config", str(REPO / "configs/demo.yaml"), "--ckpt_path", str(ckpt), "--resamples", "50", "--draws", "1"]
    report = cli_main(["report", *args, "--out", "report"]).trainer
    written = json.loads(Path("report/report.json").read_text())
    assert written["data"]["data_files"] == str(corpus_file) and written["data"]["split"] == "author"
    for line in ("data.dataset: 'parquet'", "data.max_length: 64", "data.split: 'author'"):
        assert line in caplog.text
    assert "the last step saved (step 10)" in written["chosen_by"] and report is not None
    assert "last step saved (step 10)" in Path("report/report.md").read_text()


def test_a_report_on_an_uncalibrated_export_reports_its_raw_scores_and_says_so(run, in_run_folder):
    if run["dtype"] != "float32":
        pytest.skip("one dtype is enough")
    args = ["--config", str(REPO / "configs/demo.yaml"), "--ckpt_path", str(run["export"]), "--resamples", "50"]
    cli_main(["report", *args, "--draws", "1", "--out", "exported-report"])
    written = json.loads(Path("exported-report/report.json").read_text())
    assert written["calibration"].startswith("none: exported with --no-calibrate")
    assert written["heads"]["J-P"]["calibration"]["fitted"] is False
    assert "exported with --no-calibrate" in Path("exported-report/report.md").read_text()
    # Its tables are the raw model's: the same as a report on the checkpoint told not to calibrate.
    cli_main(
        [
            "report",
            *args[:2],
            "--ckpt_path",
            str(run["ckpt"]),
            "--resamples",
            "50",
            "--draws",
            "1",
            "--calibrate",
            "false",
            "--out",
            "raw",
        ]
    )
    raw = json.loads(Path("raw/report.json").read_text())
    assert written["heads"]["J-P"]["figures"] == raw["heads"]["J-P"]["figures"]


def test_changed_data_stops_every_command_with_one_message_naming_the_flag(tmp_path, corpus_file, monkeypatch, capsys):
    own = ["--data.dataset", "parquet", "--data.data_files", str(corpus_file), "--data.keep_fraction", "0.5"]
    ckpt = fit_demo(tmp_path, *own, "--trainer.max_steps", "5", "--trainer.val_check_interval", "5") / "last.ckpt"
    import pyarrow.parquet as pq

    table = pq.read_table(corpus_file)
    pq.write_table(table.slice(0, len(table) - 300), corpus_file)  # rows removed: other splits
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(REPO / "configs/demo.yaml"), "--ckpt_path", str(ckpt)]
    messages = []
    for argv in (["test", *config], ["report", *config], ["predict", *config]):
        monkeypatch.setattr(sys, "argv", ["mbti-lightning", *argv])
        from mbti_lightning.cli import main

        with pytest.raises(SystemExit) as stopped:
            main()
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "--allow_changed_data" in err
        messages.append(err.split("error: ")[1])
        monkeypatch.setattr(sys, "argv", ["mbti-lightning", argv[0], "--help"])
        with pytest.raises(SystemExit):
            main()
        assert "--allow_changed_data" in capsys.readouterr().out
    assert len(set(messages)) == 1
