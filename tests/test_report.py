"""`mbti-lightning report`: intervals that cover the truth, on the test split, agreeing with the exported card."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, fit_demo
from huggingface_hub import metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from mbti_lightning import calibration
from mbti_lightning.cli import cli_main
from mbti_lightning.evaluation import METRICS, scored
from mbti_lightning.export import main as export_main
from mbti_lightning.labels import AXES
from mbti_lightning.metrics import confusion, confusion_metrics


def simulated(seed: int, persons: int = 300, agree: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, predictions, person) of posts: persons of label P with probability 0.6, 1 to 9 posts each, each
    post right with probability 0.75 (with `agree`, a person's posts are all right or all wrong)."""
    rng = np.random.default_rng(seed)
    posts = rng.integers(1, 10, persons)
    person = np.repeat(np.arange(persons), posts)
    labels = (rng.random(persons) < 0.6).astype(int)[person]
    right = (rng.random(persons) < 0.75)[person] if agree else rng.random(len(person)) < 0.75
    return labels, np.where(right, labels, 1 - labels), person


def test_person_resampled_intervals_cover_the_true_value_in_at_least_90_of_100_seeds():
    # The population's confusion matrix: P(label), times P(right) on the diagonal.
    truth = confusion_metrics(np.array([[0.4 * 0.75, 0.4 * 0.25], [0.6 * 0.25, 0.6 * 0.75]]))
    covered = dict.fromkeys(METRICS, 0)
    for seed in range(100):
        labels, preds, person = simulated(seed)
        figures = scored({"model": confusion(labels, preds, person, 2)}, resamples=500, seed=seed)["model"]
        for key in METRICS:
            low, high = figures[key]["interval"]
            covered[key] += low <= truth[key] <= high
    assert min(covered.values()) >= 90, covered


def test_intervals_resampling_persons_are_wider_than_resampling_rows_when_a_persons_posts_agree():
    labels, preds, person = simulated(0, agree=True)
    by_person = scored({"model": confusion(labels, preds, person, 2)}, 1000, 0)["model"]
    by_row = scored({"model": confusion(labels, preds, np.arange(len(labels)), 2)}, 1000, 0)["model"]
    for key in METRICS:
        width = {name: np.diff(f[key]["interval"])[0] for name, f in (("person", by_person), ("row", by_row))}
        assert width["person"] > 1.5 * width["row"], (key, width)


def test_a_difference_has_the_interval_of_paired_resamples():
    """The same persons are drawn for both systems: two nearly equal systems differ by little, with a narrow
    interval, even though each system's own interval is wide."""
    labels, preds, person = simulated(1)
    flipped = preds.copy()
    flipped[:10] = 1 - flipped[:10]
    figures = scored(
        {"model": confusion(labels, preds, person, 2), "other": confusion(labels, flipped, person, 2)}, 1000, 0
    )
    own = np.diff(figures["model"]["acc"]["interval"])[0]
    low, high = figures["model - other"]["acc"]["interval"]
    assert high - low < own / 3 and low <= figures["model - other"]["acc"]["value"] <= high


def run(run_dir: Path, *args: str) -> None:
    mp = pytest.MonkeyPatch()
    mp.chdir(run_dir)
    mp.setattr(sys, "argv", ["mbti-lightning"])
    try:
        cli_main(list(args))
    finally:
        mp.undo()


SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "80", "--trainer.val_check_interval", "40"]


@pytest.fixture(scope="module")
def one_axis(tmp_path_factory) -> Path:
    return fit_demo(tmp_path_factory.mktemp("report"), *SHORT) / "last.ckpt"


def report_of(ckpt: Path, *args: str) -> dict:
    out = ckpt.parents[2] / "reports/test"
    run(
        ckpt.parents[2],
        "report",
        "--config",
        str(REPO / "configs/demo.yaml"),
        "--ckpt_path",
        str(ckpt),
        "--out",
        str(out),
        *args,
    )
    assert {"report.md", "report.json", "coverage.png", "how_much_text.png", "reliability_test.png"} <= {
        p.name for p in out.iterdir()
    }
    return json.loads((out / "report.json").read_text())


def assert_every_figure(report: dict, heads: list[str]) -> None:
    """Every figure of every head; where a head learnt in the short fit (post MCC above 0.2; at least one did), its
    most confident answers are its best and a person's answer gains from more of their posts."""
    assert report["split"] == "test" and report["resamples"] == 1000 and report["persons"] < report["rows"]
    learnt = {head: report["heads"][head]["figures"]["posts"]["model"]["mcc"]["value"] > 0.2 for head in heads}
    assert any(learnt.values()), learnt
    for head in heads:
        h = report["heads"][head]
        for level in ("posts", "people"):
            for system in ("model", "baseline", "majority", "model - baseline", "model - majority"):
                for key in METRICS:
                    figure = h["figures"][level][system][key]
                    low, high = figure["interval"]
                    assert low <= figure["value"] <= high, (head, level, system, key)
        assert set(h["coverage"]) == {"100%", "75%", "50%", "25%"}
        assert h["coverage"]["25%"] >= h["coverage"]["100%"] or not learnt[head]
        curve = h["how_much_text"]
        assert [p["posts"] for p in curve] == [1, 2, 5, 10, 25, "all"]
        for key in ("acc", "macro_f1"):  # more text never makes it worse, beyond the interval
            points = [p["model"][key] for p in curve]
            assert all(b["value"] >= a["interval"][0] for a, b in zip(points, points[1:])), (head, key, points)
            assert points[-1]["value"] > points[0]["value"] or not learnt[head]
        assert {"temperature", "ece_before", "ece_after", "nll_before", "nll_after"} <= set(h["calibration"])
    assert report["leak_audit"]["features"] and report["leak_audit"]["masked_rows"] is None


@pytest.mark.slow
def test_report_for_one_axis_has_every_figure_and_fits_calibration_on_validation_only(one_axis, monkeypatch):
    fitted_on = []
    fit = calibration.fit

    def recording(logits, labels, *args, **kwargs):
        fitted_on.append(labels.clone())
        return fit(logits, labels, *args, **kwargs)

    monkeypatch.setattr(calibration, "fit", recording)
    report = report_of(one_axis)
    assert_every_figure(report, ["J-P"])
    assert report["axis_average_macro_f1_per_person"] is None
    from mbti_lightning.data import MBTIDataModule
    from mbti_lightning.loading import hyperparameters, read_checkpoint

    dm = MBTIDataModule(**hyperparameters(read_checkpoint(one_axis), "datamodule_hyper_parameters"))
    dm.setup("test")
    validation, test = (list(dm.splits[split]["labels"][:]) for split in ("validation", "test"))
    # The final fit on every validation row, the held-out check's on halves of them, the persons' on their persons.
    assert validation in [labels.tolist() for labels in fitted_on]
    assert all(len(labels) <= len(validation) and labels.tolist() != test for labels in fitted_on)
    md = (one_axis.parents[2] / "reports/test/report.md").read_text()
    assert "on the **test split**" in md and "| macro-F1 |" in md and "## Leak audit" in md


@pytest.mark.slow
def test_the_exported_cards_model_index_is_the_reports_test_figures(one_axis, tmp_path):
    report = report_of(one_axis)
    out = tmp_path / "model"
    export_main(["--ckpt", str(one_axis), "--out", str(out)])
    _, results = model_index_to_eval_results(metadata_load(out / "README.md")["model-index"])
    assert {r.dataset_split for r in results} == {"test"}
    figures = report["heads"]["J-P"]["figures"]["posts"]["model"]
    assert {r.metric_name: r.metric_value for r in results} == {
        f"J-P {name}": round(figures[key]["value"], 4) for key, (name, _) in METRICS.items()
    }
    card = (out / "README.md").read_text()
    calibrated = report["heads"]["J-P"]["calibration"]
    # The held-out check decides whether offsets are kept (this short fit's scores can go either way).
    offsets = ", ".join(f"{letter} {b:+.3f}" for letter, b in (calibrated["offsets"] or {}).items()) or "none"
    assert (
        f"| J-P | {calibrated['temperature']:.4f} | {offsets} | {calibrated['ece_before']:.4f} | "
        f"{calibrated['ece_after']:.4f} | {calibrated['nll_before']:.4f} | {calibrated['nll_after']:.4f} |" in card
    )
    assert "Measured on the test split" in card


@pytest.mark.slow
def test_report_for_four_axes_has_the_published_average(tmp_path):
    ckpt = fit_demo(tmp_path, *SHORT, "--data.target", "all") / "last.ckpt"
    report = report_of(ckpt, "--data.target", "all")
    assert_every_figure(report, list(AXES))  # N-S (7% S) barely learns in 80 steps: its gains are not checked
    average = report["axis_average_macro_f1_per_person"]
    per_axis = [report["heads"][axis]["figures"]["people"]["model"]["macro_f1"]["value"] for axis in AXES]
    assert average["model"]["value"] == pytest.approx(sum(per_axis) / 4)
    low, high = average["model - baseline"]["interval"]
    assert low <= average["model - baseline"]["value"] <= high


def test_report_without_a_test_split_says_what_to_do(tmp_path, corpus_file):
    data = ["--data.dataset", "parquet", "--data.data_files", str(corpus_file), "--data.keep_fraction", "1.0"]
    ckpt = fit_demo(tmp_path, *data, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0") / "last.ckpt"
    with pytest.raises(ValueError, match="no test split with data.split 'seed'.*set data.keep_fraction below 1"):
        run(tmp_path, "report", "--config", str(REPO / "configs/demo.yaml"), *data, "--ckpt_path", str(ckpt))


def test_the_leak_audit_flags_type_vocabulary_among_the_baselines_strongest_ngrams():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from mbti_lightning.baseline import Baseline
    from mbti_lightning.report import leak_audit

    texts = ["as an intj i plan", "my ni says plan", "lists and plans"] * 5 + ["whatever man", "as an enfp lol"] * 5
    labels = [0] * 15 + [1] * 10
    vectorizer = TfidfVectorizer()
    fitted = Baseline(vectorizer, [LogisticRegression().fit(vectorizer.fit_transform(texts), labels)])

    audit = leak_audit(fitted, {"J-P": ("J", "P")}, type("DM", (), {"splits": {"test": _Split()}})())
    assert {(f["class"], f["ngram"]) for f in audit["flagged"]} >= {("J", "intj"), ("J", "ni"), ("P", "enfp")}
    assert audit["masked_rows"] == 2 and audit["rows"] == 4


class _Split(list):
    """A test split's `mentions` column: 2 of 4 rows had type mentions masked."""

    column_names = ["mentions"]

    def __init__(self):
        super().__init__([2, 0, 1, 0])

    def __getitem__(self, key):
        return list(self) if key == "mentions" else super().__getitem__(key)
