"""Several axes in one model, the 16-way type, and predictions written to a file."""

import csv
import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, fit_demo
from huggingface_hub import metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import pipeline

from mbti_lightning import folding
from mbti_lightning.cli import cli_main
from mbti_lightning.export import main as export_main
from mbti_lightning.labels import AXES, TYPES
from mbti_lightning.model import MBTIClassifier
from mbti_lightning.predict import prediction_records

TEXTS = [
    "i made a list and a schedule for the whole week",
    "whatever lol lets just improvise",
    "alone with a book at home, quiet evening",
    "party with friends at the club tonight",
    "the the the",
]


def fit(run: Path, *args: str) -> Path:
    """A short demo fit in `run`; returns its last checkpoint."""
    return (
        fit_demo(
            run,
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "80",
            "--trainer.val_check_interval",
            "40",
            *args,
        )
        / "last.ckpt"
    )


@pytest.fixture(scope="module")
def all_axes(tmp_path_factory) -> Path:
    return fit(tmp_path_factory.mktemp("all"), "--data.target", "all")


def metrics_of(ckpt: Path) -> dict[str, str]:
    (log,) = (ckpt.parents[2] / "logs/demo").glob("version_*/metrics.csv")
    return [row for row in csv.DictReader(log.open()) if row["val/mcc"]][-1]


def test_all_axes_log_per_axis_metrics_their_mean_and_type_accuracy(all_axes):
    final = metrics_of(all_axes)
    per_axis = [float(final[f"val/{axis}/mcc"]) for axis in AXES]
    assert float(final["val/mcc"]) == pytest.approx(sum(per_axis) / 4, abs=1e-6)
    assert min(per_axis) > 0.03 and sum(per_axis) / 4 > 0.15, per_axis  # N-S (7% S) learns slowest
    assert 0 < float(final["val/type_acc"]) < min(float(final[f"val/{axis}/acc"]) for axis in AXES)
    assert {"val/J-P/author/mcc", "val/author/mcc", "val/J-P/majority_acc"} <= set(final)
    eces = [float(final[f"val/{axis}/ece"]) for axis in AXES]
    assert 0 < min(eces) and float(final["val/ece"]) == pytest.approx(sum(eces) / 4, abs=1e-6)
    model = MBTIClassifier.load_from_checkpoint(all_axes, weights_only=False)
    assert model.model.config.id2label == {0: "I", 1: "S", 2: "T", 3: "P"}
    assert model.model.config.problem_type == "multi_label_classification"


def assert_card_metadata_equals_its_tables(out: Path, heads: list[str]) -> None:
    """Every head's per-post table row has its `model-index` result, with the same value, on the test split."""
    _, results = model_index_to_eval_results(metadata_load(out / "README.md")["model-index"])
    assert {r.dataset_split for r in results} == {"test"}
    from_metadata = {
        (r.metric_config, r.metric_name.removeprefix(f"{r.metric_config} ")): r.metric_value for r in results
    }
    card = (out / "README.md").read_text()
    sections = dict(zip(heads, card.split("### ")[1:])) if len(heads) > 1 else {heads[0]: card}
    table = {
        (head, name): float(value)
        for head, text in sections.items()
        for name, value in re.findall(
            r"^\| (accuracy|macro-F1|MCC|balanced accuracy) \| (-?[\d.]+) \[", text.split("Per person")[0], re.M
        )
    }
    assert len(table) == 4 * len(heads) and from_metadata == table


@pytest.mark.slow
def test_sixteen_way_type_head_trains_and_exports(tmp_path):
    ckpt = fit(tmp_path, "--data.target", "mbti", "--trainer.limit_train_batches", "200")
    final = metrics_of(ckpt)
    assert "val/type_acc" not in final  # one 16-way head: its accuracy is the type's, logged once
    assert float(final["val/mcc"]) > 0.05  # well above chance for 16 classes
    out = tmp_path / "model"
    export_main(["--ckpt", str(ckpt), "--out", str(out)])
    assert_card_metadata_equals_its_tables(out, ["mbti"])
    assert "balanced accuracy 1 / classes\n(1/16 here)" in (out / "README.md").read_text()
    (scores,) = pipeline("text-classification", model=str(out), top_k=None)([TEXTS[0]])
    assert {d["label"] for d in scores} == set(TYPES) and sum(d["score"] for d in scores) == pytest.approx(1)


@pytest.mark.parametrize("suffix, text", [(".csv", "text"), (".jsonl", "hash")])
def test_predictions_keep_the_input_order_and_use_letters(all_axes, tmp_path, monkeypatch, suffix, text):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS * 40) + "\n")  # 200 texts: several length-sorted batches
    out = tmp_path / f"predictions{suffix}"
    monkeypatch.chdir(all_axes.parents[2])
    monkeypatch.setattr(sys, "argv", ["mbti-lightning"])
    cli_main(
        [
            "predict",
            "--config",
            str(REPO / "configs/demo.yaml"),
            "--data.target",
            "all",
            "--ckpt_path",
            str(all_axes),
            "--data.predict_file",
            str(texts),
            "--data.eval_batch_size",
            "16",
            "--predictions.output",
            str(out),
            "--predictions.text",
            text,
        ]
    )

    if suffix == ".csv":
        rows = list(csv.DictReader(out.open()))
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [str(r["id"]) for r in rows] == [str(i) for i in range(1, 201)]  # line numbers, in order
    if text == "text":
        assert [r["text"] for r in rows] == TEXTS * 40
    else:  # the text stays private; its hash still identifies it
        assert [r["text_sha256"] for r in rows] == [hashlib.sha256(t.encode()).hexdigest() for t in TEXTS * 40]
    assert list(rows[0]) == [
        "id",
        "text" if text == "text" else "text_sha256",
        "type",
        "E-I",
        "E-I_prob",
        "N-S",
        "N-S_prob",
        "F-T",
        "F-T_prob",
        "J-P",
        "J-P_prob",
    ]
    for row in rows:
        assert row["type"] in TYPES and row["type"] == "".join(row[axis] for axis in AXES)
        assert all(0.5 <= float(row[f"{axis}_prob"]) <= 1 for axis in AXES)
    same_text = [{k: v for k, v in rows[i].items() if k != "id"} for i in (0, 5, 195)]
    assert same_text[0] == same_text[1] == same_text[2]  # wherever its batch was


def test_records_from_a_type_head_sum_the_types_of_each_letter():
    probs = torch.zeros(1, 16)
    probs[0, TYPES.index("INTJ")], probs[0, TYPES.index("ENTP")] = 0.3, 0.7
    (record,) = prediction_records({"mbti": TYPES}, {"mbti": probs})
    assert record == {
        "type": "ENTP",
        "type_prob": 0.7,
        "E-I": "E",
        "E-I_prob": 0.7,
        "N-S": "N",
        "N-S_prob": 1.0,
        "F-T": "T",
        "F-T_prob": 1.0,
        "J-P": "P",
        "J-P_prob": 0.7,
    }


def test_multi_axis_export_works_with_pipeline(all_axes, tmp_path):
    out = tmp_path / "model"
    export_main(["--ckpt", str(all_axes), "--out", str(out)])
    card = (out / "README.md").read_text()
    assert "Predicts 4 axes" in card and all(f"### {axis}" in card for axis in AXES)
    assert all((out / f"confusion_matrix_{axis}.png").is_file() for axis in AXES)
    assert_card_metadata_equals_its_tables(out, list(AXES))

    classifier = pipeline("text-classification", model=str(out), top_k=None)
    scores = {d["label"]: d["score"] for d in classifier([TEXTS[0]])[0]}
    model = MBTIClassifier.load_from_checkpoint(all_axes, weights_only=False).eval()
    temperatures = torch.tensor([classifier.model.config.calibration_temperatures[axis] for axis in AXES])
    raw, folded = folding.classification_head(model.model).weight, classifier.model.score.weight
    # Calibrated: each axis's row divided by its own temperature, plus its offset along one shared direction.
    carried = (folded - raw / temperatures[:, None]).detach()
    assert torch.linalg.matrix_rank(carried, rtol=1e-4) == 1
    with torch.no_grad(), folding.head_inputs(model.model) as inputs:
        model(**classifier.tokenizer([TEXTS[0]], return_tensors="pt"))
    expected = torch.sigmoid(inputs[0] @ folded.T)[0]
    assert scores == pytest.approx(
        {"I": expected[0].item(), "S": expected[1].item(), "T": expected[2].item(), "P": expected[3].item()}, abs=1e-5
    )


def test_predicting_the_test_split_writes_its_texts_as_the_model_saw_them(all_axes, tmp_path, monkeypatch):
    monkeypatch.chdir(all_axes.parents[2])
    monkeypatch.setattr(sys, "argv", ["mbti-lightning"])
    args = ["predict", "--config", str(REPO / "configs/demo.yaml"), "--data.target", "all", "--ckpt_path"]
    for text in ("text", "hash"):
        out = tmp_path / f"{text}.csv"
        cli_main([*args, str(all_axes), "--predictions.output", str(out), "--predictions.text", text])
        rows = list(csv.DictReader(out.open()))
        column = "text" if text == "text" else "text_sha256"
        assert rows and all(row[column] for row in rows), text
