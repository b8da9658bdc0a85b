"""A model of persons (`model.person_head`): it answers for a person where it beats the summed post evidence, and
then everywhere (report, test, predict per author, the server's posts, the export); and scoring a model on another
corpus than it was trained on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from fake_hub import FakeHfApi
from test_seams import main_says, run

from mbti_lightning import person_head, serve
from mbti_lightning.demo import PERSON_DATA, write_person_rows
from mbti_lightning.export import main as export_main
from mbti_lightning.loading import load
from mbti_lightning.metrics import confusion, confusion_metrics

#: How far a person's probability may differ between two paths: in bf16, a post padded in a batch of another shape
#: gets slightly other features (tests/test_loading.py measures it per post).
BOUND = {"32-true": 1e-5, "bf16-true": 2e-2}


def corpus(path: Path, cue: str, persons: int, seed: int = 0) -> Path:
    return write_person_rows(path, cue, persons, seed=seed)


def data_args(path: Path) -> list[str]:
    keys = PERSON_DATA | {"data_files": path}
    return ["--config", str(REPO / "configs/demo.yaml"), *(a for k, v in keys.items() for a in (f"--data.{k}", str(v)))]


FROZEN = ["--model.frozen", "{}", "--model.learning_rate", "1e-2", "--trainer.max_epochs", "2"]
FROZEN += ["--trainer.val_check_interval", "1.0"]


@pytest.fixture(scope="module", params=["32-true", "bf16-true"])
def fitted(request, tmp_path_factory) -> dict:
    """A frozen fit with a person head (fp32 or bf16) on 1,500 persons whose letter shows only across their posts
    (skewed: 7 in 10 are I; eight weak posts each), its report and its export."""
    folder = tmp_path_factory.mktemp(request.param)
    args = data_args(corpus(folder / "persons.csv", "person", 1500))
    run(folder, "fit", *args, *FROZEN, "--model.person_head", "{}", "--trainer.precision", request.param)
    ckpt = folder / "checkpoints/demo/last.ckpt"
    run(folder, "report", *args, "--ckpt_path", str(ckpt), "--out", str(folder / "report"))
    report = json.loads((folder / "report/report.json").read_text())
    return {"folder": folder, "args": args, "ckpt": ckpt, "report": report, "precision": request.param}


def per_author(fitted: dict, *model: str) -> list[dict]:
    out = fitted["folder"] / f"per-author-{len(list(fitted['folder'].glob('per-author-*')))}.csv"
    run(
        fitted["folder"],
        "predict",
        *fitted["args"],
        *model,
        "--predictions.per",
        "author",
        "--predictions.output",
        str(out),
    )
    return list(csv.DictReader(out.open()))


def mcc_of(rows: list[dict], data: Path) -> float:
    truth = {r["author"]: r["mbti"][0] for r in csv.DictReader(data.open())}
    conf = confusion(
        np.array([truth[r["author"]] == "I" for r in rows], dtype=int),
        np.array([r["E-I"] == "I" for r in rows], dtype=int),
        np.zeros(len(rows), dtype=int),
        2,
    ).sum(0)
    return float(confusion_metrics(conf)["mcc"])


@pytest.mark.slow
def test_where_the_letter_shows_only_across_posts_the_person_head_beats_the_summed_posts(fitted):
    people = fitted["report"]["heads"]["E-I"]["figures"]["people"]
    assert fitted["report"]["heads"]["E-I"]["person_answer"]["answer"] == "person head"
    assert people["model"]["mcc"]["value"] > 0.4
    # No post says anything alone: the summed evidence is at chance, the paired interval excludes 0.
    assert abs(people["summed posts"]["mcc"]["value"]) < 0.2
    assert people["model - summed posts"]["mcc"]["interval"][0] > 0
    report = (fitted["folder"] / "report/report.md").read_text()
    assert 'A person\'s answer ("model" above): the **person head**' in report


@pytest.mark.slow
def test_report_test_predict_and_the_server_give_a_person_one_answer(fitted):
    """On a skewed file with many weak posts per person, in fp32 and bf16: the report's per-person MCC is `test`'s
    and that of `predict --predictions.per author`, whose probabilities the server's ``posts`` answer repeats."""
    data = Path(fitted["args"][fitted["args"].index("--data.data_files") + 1])
    mcc = fitted["report"]["heads"]["E-I"]["figures"]["people"]["model"]["mcc"]["value"]
    cli = run(fitted["folder"], "test", *fitted["args"], "--ckpt_path", str(fitted["ckpt"]))
    assert float(cli.trainer.callback_metrics["test/author/mcc"]) == pytest.approx(mcc, abs=1e-6)
    rows = per_author(fitted, "--ckpt_path", str(fitted["ckpt"]))
    assert len(rows) == fitted["report"]["persons"] and mcc_of(rows, data) == pytest.approx(mcc, abs=1e-6)

    posts: dict[str, list[str]] = {}
    for r in csv.DictReader(data.open()):
        posts.setdefault(r["author"], []).append(r["body"])
    loaded = load(fitted["ckpt"])
    asked = rows[:40]
    answers = serve.answer(loaded, [{"texts": posts[r["author"]], "person": True} for r in asked])
    for row, answer in zip(asked, answers):
        p_i = {True: float(row["E-I_prob"]), False: 1 - float(row["E-I_prob"])}[row["E-I"] == "I"]
        served = answer["person"]
        served_i = served["E-I_prob"] if served["E-I"] == "I" else 1 - served["E-I_prob"]
        assert served["posts"] == 8 and served_i == pytest.approx(p_i, abs=BOUND[fitted["precision"]])


@pytest.mark.slow
def test_an_export_carries_the_person_head_and_its_card_says_what_answers_a_person(fitted):
    if fitted["precision"] != "32-true":
        pytest.skip("the export's path is the same in bf16")
    out = fitted["folder"] / "model"
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_TOKEN", "hf_" + "y" * 34)
    mp.setattr("mbti_lightning.export.HfApi", FakeHfApi)
    FakeHfApi.reset()
    try:
        export_main(["--ckpt", str(fitted["ckpt"]), "--out", str(out), "--push-to-hub", "someone/persons"])
    finally:
        mp.undo()
    assert (out / person_head.WEIGHTS).is_file()
    card = (out / "README.md").read_text()
    assert "Who answers for a person, chosen on the validation persons: the person head" in card
    by_checkpoint = per_author(fitted, "--ckpt_path", str(fitted["ckpt"]))
    assert per_author(fitted, "--ckpt_path", str(out)) == by_checkpoint
    assert per_author(fitted, "--ckpt_path", "someone/persons") == by_checkpoint  # the hub id's person head


@pytest.mark.slow
def test_explain_shows_the_posts_the_attention_rested_on_and_the_persons_answer_predict_gives(fitted):
    if fitted["precision"] != "32-true":
        pytest.skip("one dtype is enough")
    folder = fitted["folder"]
    data = Path(fitted["args"][fitted["args"].index("--data.data_files") + 1])
    rows = list(csv.DictReader(data.open()))[:16]  # two persons' eight posts
    with (folder / "two.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["author", "body"], *((r["author"], r["body"]) for r in rows)])
    given = [*fitted["args"], "--ckpt_path", str(fitted["ckpt"]), "--data.predict_file", str(folder / "two.csv")]
    run(folder, "explain", *given, "--out", "explained", "--steps", "4")
    people = json.loads((folder / "explained/explanations.json").read_text())["people"]
    predicted = per_author(fitted, *given[len(fitted["args"]) :])
    assert {r["author"]: {"E-I": r["E-I"], "E-I_prob": float(r["E-I_prob"])} for r in predicted} == {
        author: p["prediction"] for author, p in people.items()
    }
    for p in people.values():
        weights = [post["weight"] for post in p["attention"]]
        assert sorted(post["post"] for post in p["attention"]) == p["posts"] and sum(weights) == pytest.approx(1)
        assert weights == sorted(weights, reverse=True)
    assert "rested its attention on" in (folder / "explained/explanations.html").read_text()


@pytest.mark.slow
def test_a_model_scores_another_corpus_and_refuses_other_labels_or_masking(fitted, capsys):
    if fitted["precision"] != "32-true":
        pytest.skip("one dtype is enough")
    folder, args = fitted["folder"], fitted["args"]
    other = corpus(folder / "other.csv", "person", 400, seed=5)
    run(folder, "report", *args, "--ckpt_path", str(fitted["ckpt"]), "--data.data_files", str(other), "--out", "b")
    report = json.loads((folder / "b/report.json").read_text())
    assert report["other_corpus"]["data_files"]["scored"] == str(other)
    assert report["persons"] == 120  # the test split of 400 persons
    assert "**Another corpus than the model was trained on**" in (folder / "b/report.md").read_text()
    mcc = report["heads"]["E-I"]["figures"]["people"]["model"]["mcc"]["value"]
    assert mcc > 0.3
    cli = run(folder, "test", *args, "--ckpt_path", str(fitted["ckpt"]), "--data.data_files", str(other))
    assert float(cli.trainer.callback_metrics["test/author/mcc"]) == pytest.approx(mcc, abs=1e-6)
    for setting, value, message in (
        ("target", "J-P", "data.target 'J-P': "),
        ("mask_type_mentions", "true", "data.mask_type_mentions True: "),
    ):
        given = [*args, f"--data.{setting}", value, "--data.data_files", str(other)]
        said = main_says(folder, ["report", *given, "--ckpt_path", str(fitted["ckpt"]), "--out", "c"], capsys)
        assert message in said and "another corpus is scored with the model's" in said


def test_a_person_heads_weights_add_up_to_one_per_person_and_a_single_post_is_answered():
    head = person_head.PersonHead(6, {"E-I": ("E", "I"), "J-P": ("J", "P")}, "attention", 8)
    persons = torch.tensor([0, 0, 0, 1, 2, 2])
    logits, weights = head(torch.randn(6, 6), persons)
    assert [z.shape for z in logits] == [(3, 2), (3, 2)]
    assert torch.allclose(torch.zeros(3).index_add(0, persons, weights), torch.ones(3)) and weights[3] == 1


def test_a_person_with_more_posts_than_max_posts_brings_a_fresh_subset_to_each_epoch():
    members = [np.arange(100), np.arange(100, 103)]
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(2):
        ((posts, local, chosen),) = person_head._batches(members, np.arange(2), 10, rng)
        mine = posts[local == list(chosen).index(0)]
        assert len(mine) == 10 and len(posts) == 13
        seen.append(set(mine))
    assert seen[0] != seen[1]


def test_the_person_head_answers_only_where_its_paired_interval_lies_above_the_summed_posts():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 300)
    right = torch.nn.functional.one_hot(torch.as_tensor(truth), 2).float()
    coin = torch.nn.functional.one_hot(torch.as_tensor(rng.integers(0, 2, 300)), 2).float()
    better = person_head.decide({"E-I": right}, {"E-I": coin}, {"E-I": truth})
    level = person_head.decide({"E-I": coin}, {"E-I": coin}, {"E-I": truth})
    assert better["E-I"]["answer"] == "person head" and level["E-I"]["answer"] == "summed posts"
    assert "not above 0, summed posts answer" in level["E-I"]["why"]


@pytest.mark.parametrize(
    "given, message",
    [
        ("{pooling: max}", "model.person_head.pooling 'max': use one of attention, mean"),
        ("{pool: mean}", "model.person_head: unknown setting pool"),
        ("{max_posts: 0}", "model.person_head.max_posts must be a positive whole number"),
    ],
)
def test_person_head_settings_that_cannot_work_are_one_line_naming_them(tmp_path, capsys, given, message):
    args = data_args(corpus(tmp_path / "p.csv", "post", 40))
    said = main_says(tmp_path, ["fit", *args, *FROZEN, "--model.person_head", given], capsys)
    assert message in said


def test_a_person_head_needs_frozen_features(tmp_path, capsys):
    args = data_args(corpus(tmp_path / "p.csv", "post", 40))
    said = main_says(tmp_path, ["fit", *args, "--model.person_head", "{}"], capsys)
    assert "model.person_head reads a frozen backbone's post features: set model.frozen" in said
