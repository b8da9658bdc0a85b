import csv
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, pipeline

from mbti_lightning.cli import cli_main
from mbti_lightning.export import main as export_main
from mbti_lightning.model import MBTIClassifier
from mbti_lightning.tokenizer import load_tokenizer

from conftest import REPO

TEXTS = ["i made a list and a schedule for the whole week", "whatever lol lets just improvise", "the the the"]
TOKEN = "hf_" + "x" * 34  # shaped like a real token, so a leak would be easy to grep


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A demo-sized fit: its last checkpoint, with the run's logs beside it."""
    run = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.chdir(run)
    mp.setattr(sys, "argv", ["mbti-lightning"])
    mp.setenv("HF_TOKEN", TOKEN)  # as on a user's machine; it must not leak into anything the run writes
    # Two tokenizing processes: under the CLI, nothing but the tokenizer may need pickling.
    cli_main(["fit", "--config", str(REPO / "configs/demo.yaml"), "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "60", "--trainer.val_check_interval", "30",
              "--data.preprocessing_workers", "2"])  # fmt: skip
    mp.undo()
    return run / "checkpoints/demo/last.ckpt"


def test_the_runs_files_never_hold_the_hub_token(trained):
    run = trained.parents[2]
    written = [p for p in run.rglob("*") if p.is_file()]
    assert {p.suffix for p in written} >= {".ckpt", ".yaml", ".csv"}
    for path in written:
        assert TOKEN.encode() not in path.read_bytes(), path


def export(*args: str) -> None:
    export_main([str(a) for a in args])


def test_pipeline_gives_the_lightning_models_scores(trained, tmp_path):
    out = tmp_path / "model"
    export("--ckpt", trained, "--out", out)

    model = MBTIClassifier.load_from_checkpoint(trained, map_location="cpu").eval()
    tokenizer = load_tokenizer("demo")
    with torch.no_grad():
        expected = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).softmax(-1)
    results = pipeline("text-classification", model=str(out), top_k=None)(TEXTS)
    for probs, result in zip(expected, results):
        scores = {r["label"]: r["score"] for r in result}
        assert set(scores) == {"J", "P"}
        assert scores["J"] == pytest.approx(probs[0].item(), abs=1e-5)
        assert scores["P"] == pytest.approx(probs[1].item(), abs=1e-5)
    assert AutoModelForSequenceClassification.from_pretrained(out).config.id2label == {0: "J", 1: "P"}


def test_card_has_metrics_baseline_split_and_plots(trained, tmp_path):
    out = tmp_path / "model"
    export("--ckpt", trained, "--out", out)
    card = (out / "README.md").read_text()
    for text in ("| MCC |", "| balanced accuracy |", "majority class", "Rows are split, not authors",
                 "Intended use and limitations", "learning_rate", "pipeline_tag: text-classification"):  # fmt: skip
        assert text in card, text
    for png in ("val_metrics.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in card
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_dtype_choice_is_saved(trained, tmp_path):
    export("--ckpt", trained, "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16


class FakeHfApi:
    """huggingface_hub.HfApi at the network boundary: records what would be sent."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("token", token))

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, files))


def test_push_sends_the_folder_with_the_env_token_and_never_writes_it(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("mbti_lightning.export.HfApi", FakeHfApi)
    FakeHfApi.calls = []
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "model"
    export("--ckpt", trained, "--out", out, "--push-to-hub", "me/mbti-jp", "--private")

    assert FakeHfApi.calls[0] == ("token", TOKEN)
    assert FakeHfApi.calls[1] == ("create_repo", "me/mbti-jp", True)
    _, repo, files = FakeHfApi.calls[2]
    assert repo == "me/mbti-jp"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "confusion_matrix.png"} <= set(files)
    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err
    for path in out.iterdir():
        assert TOKEN.encode() not in path.read_bytes(), path.name


def test_token_can_come_from_a_dotenv_file(trained, tmp_path, monkeypatch):
    monkeypatch.setattr("mbti_lightning.export.HfApi", FakeHfApi)
    FakeHfApi.calls = []
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"# hub\nHF_HUB_TOKEN='{TOKEN}'\n")
    export("--ckpt", trained, "--out", tmp_path / "model", "--push-to-hub", "me/mbti-jp")
    assert FakeHfApi.calls[0] == ("token", TOKEN) and FakeHfApi.calls[1][2] is False


def expect_error(capsys, message: str, *args) -> None:
    with pytest.raises(SystemExit) as exit_info:
        export(*args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_token_fails_before_any_work(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    expect_error(capsys, "--push-to-hub needs a Hugging Face token", "--ckpt", trained, "--out", tmp_path / "m",
                 "--push-to-hub", "me/x")  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_bad_checkpoints_are_named(tmp_path, capsys):
    expect_error(capsys, f"checkpoint not found: {tmp_path / 'nope.ckpt'}", "--ckpt", tmp_path / "nope.ckpt",
                 "--out", tmp_path / "m")  # fmt: skip
    (tmp_path / "corrupt.ckpt").write_bytes(b"\x00not a checkpoint" * 10)
    expect_error(capsys, f"could not read checkpoint {tmp_path / 'corrupt.ckpt'}", "--ckpt",
                 tmp_path / "corrupt.ckpt", "--out", tmp_path / "m")  # fmt: skip
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "other.ckpt")
    expect_error(capsys, "was not written by `mbti-lightning fit`", "--ckpt", tmp_path / "other.ckpt",
                 "--out", tmp_path / "m")  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_out_is_never_clobbered_by_accident(trained, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    expect_error(capsys, "is a file, not a folder", "--ckpt", trained, "--out", tmp_path / "file")
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(capsys, "exists and is not empty; pass --overwrite", "--ckpt", trained, "--out", out)
    assert (out / "keep.txt").read_text() == "mine"
    export("--ckpt", trained, "--out", out, "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_an_exported_model_predicts_through_the_cli_as_its_checkpoint_does(trained, tmp_path, monkeypatch, recwarn):
    """A published model (here its export folder) works as `model.model_name_or_path`: `predict` writes
    the checkpoint's predictions; a run whose target is not the model's stops and names both."""
    out = tmp_path / "model"
    export("--ckpt", trained, "--out", out)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mbti-lightning"])
    Path("texts.txt").write_text("\n".join(TEXTS) + "\n")
    predict = ["predict", "--config", str(REPO / "configs/demo.yaml"), "--data.predict_file", "texts.txt"]
    published = ["--model.model_name_or_path", str(out), "--model.from_scratch", "false"]
    cli_main([*predict, "--ckpt_path", str(trained), "--predictions.output", "checkpoint.csv"])
    cli_main([*predict, *published, "--predictions.output", "published.csv"])
    rows = list(csv.DictReader(Path("published.csv").open()))
    assert [row["text"] for row in rows] == TEXTS and {row["J-P"] for row in rows} <= {"J", "P"}
    assert Path("published.csv").read_text() == Path("checkpoint.csv").read_text()
    assert not [w for w in recwarn if "batch indices" in str(w.message)]  # Lightning's, about its own writer

    with pytest.raises(ValueError, match=r"outputs are J, P, but this run's target \(E-I\) has E, I; set data.target"):
        cli_main([*predict, *published, "--data.target", "E-I"])
