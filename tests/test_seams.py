"""One number through every door: `test`, `report` and `predict --predictions.per author` on a checkpoint's export
and on its Hub id, on a skewed axis with many posts per person; and what the export publishes."""

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from fake_hub import FakeHfApi
from test_real_data import kaggle_args, kaggle_file

from mbti_lightning.cli import cli_main
from mbti_lightning.errors import UserError
from mbti_lightning.export import main as export_main
from mbti_lightning.metrics import confusion, confusion_metrics
from mbti_lightning.model import MBTIClassifier

HUB_ID = "someone/mbti-e-i"
SECRETS = ("FAKE123", "s3cr3tpassw0rd")


def run(folder: Path, *args: str) -> object:
    mp = pytest.MonkeyPatch()
    mp.chdir(folder)
    mp.setattr(sys, "argv", ["mbti-lightning"])
    try:
        return cli_main(list(args))
    finally:
        mp.undo()


def with_secret_loggers(ckpt: Path) -> None:
    """Give the checkpoint's recorded config the loggers a user tracks runs with (as `fit` records them): a
    Comet API key and an MLflow tracking URI with a password."""
    checkpoint = torch.load(ckpt, weights_only=False)
    config = checkpoint["mbti_lightning"]["config"]
    config["trainer"]["logger"] = [
        {"class_path": "lightning.pytorch.loggers.CometLogger", "init_args": {"api_key": SECRETS[0]}},
        {
            "class_path": "lightning.pytorch.loggers.MLFlowLogger",
            "init_args": {"tracking_uri": f"https://me:{SECRETS[1]}@mlflow.example.com"},
        },
    ]
    torch.save(checkpoint, ckpt)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A short E-I fit (skewed: about 3 in 4 are I; persons of about 8 posts, split by person) on a Kaggle-shaped
    file, its calibrated export pushed to a (fake) hub."""
    folder = tmp_path_factory.mktemp("seams")
    data = folder / "users.csv"
    kaggle_file(data, num_rows=3000)
    args = [
        "--config",
        str(REPO / "configs/demo.yaml"),
        *kaggle_args(data),
        "--data.target",
        "E-I",
        "--data.keep_fraction",
        "1.0",
        "--data.test_fraction",
        "0.3",
    ]
    run(folder, "fit", *args, "--trainer.max_epochs", "2", "--trainer.val_check_interval", "1.0")
    ckpt = folder / "checkpoints/demo/last.ckpt"
    with_secret_loggers(ckpt)
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_TOKEN", "hf_" + "y" * 34)
    mp.setattr("mbti_lightning.export.HfApi", FakeHfApi)
    FakeHfApi.reset()
    try:
        export_main(["--ckpt", str(ckpt), "--out", str(folder / "model"), "--push-to-hub", HUB_ID])
    finally:
        mp.undo()
    return {"folder": folder, "args": args, "ckpt": ckpt, "out": folder / "model", "data": data}


def scores_of_test(exported: dict, *model: str) -> dict[str, float]:
    cli = run(exported["folder"], "test", *exported["args"], *model)
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def per_person_mcc(exported: dict, name: str, *model: str) -> tuple[float, list[dict]]:
    """`predict --predictions.per author` on the test split, scored against each person's type."""
    out = exported["folder"] / f"{name}.csv"
    run(
        exported["folder"],
        "predict",
        *exported["args"],
        *model,
        "--predictions.per",
        "author",
        "--predictions.output",
        str(out),
    )
    rows = list(csv.DictReader(out.open()))
    types = [row["type"] for row in csv.DictReader(exported["data"].open())]
    truth = np.array([types[int(row["author"])][0] == "I" for row in rows], dtype=int)
    votes = np.array([row["E-I"] == "I" for row in rows], dtype=int)
    conf = confusion(truth, votes, np.arange(len(rows)), 2).sum(0)
    return float(confusion_metrics(conf)["mcc"]), rows


def test_test_report_and_predict_per_person_agree_on_an_export_and_its_hub_id(exported):
    report_dir = exported["folder"] / "report"
    run(exported["folder"], "report", *exported["args"], "--ckpt_path", str(exported["out"]), "--out", str(report_dir))
    report = json.loads((report_dir / "report.json").read_text())
    people = report["heads"]["E-I"]["figures"]["people"]["model"]
    assert people["mcc"]["value"] > 0.2  # the model learnt something per person: the comparison below means something

    by_folder = scores_of_test(exported, "--ckpt_path", str(exported["out"]))
    assert by_folder["test/author/mcc"] == pytest.approx(people["mcc"]["value"], abs=1e-6)
    assert by_folder["test/author/bal_acc"] == pytest.approx(people["bal_acc"]["value"], abs=1e-6)
    by_hub_id = scores_of_test(exported, "--ckpt_path", HUB_ID)
    by_name = scores_of_test(exported, "--model.model_name_or_path", HUB_ID, "--model.from_scratch", "false")
    assert by_hub_id == by_folder == by_name
    from mbti_lightning import loading

    assert loading.load(HUB_ID).revision == FakeHfApi.commits[HUB_ID] and loading.load(exported["out"]).revision is None

    mcc, rows = per_person_mcc(exported, "folder", "--ckpt_path", str(exported["out"]))
    assert mcc == pytest.approx(people["mcc"]["value"], abs=1e-6)
    assert len(rows) == report["persons"]
    for name, model in (("hub", ["--ckpt_path", HUB_ID]), ("named", ["--model.model_name_or_path", HUB_ID])):
        assert per_person_mcc(exported, name, *model)[1] == rows


def test_an_export_keeps_the_class_weights_its_loss_was_trained_with(exported):
    """`validate` and `test` on an export report the class-weighted loss, as on its checkpoint."""
    from mbti_lightning import loading

    ckpt, out = loading.load(exported["ckpt"]).model, loading.load(exported["out"]).model
    assert torch.equal(ckpt.class_weight, out.class_weight) and not torch.equal(out.class_weight, torch.ones(1, 2))


def test_nothing_pushed_holds_a_logger_secret_or_a_local_path(exported):
    assert HUB_ID in FakeHfApi.repos
    uploaded = [p for p in _snapshot(HUB_ID).rglob("*") if p.is_file()]
    assert {"README.md", "config.json", "model.safetensors"} <= {p.name for p in uploaded}
    local = {str(exported["folder"]), str(Path.home()), str(REPO)}
    for path in uploaded:
        text = path.read_bytes().decode("utf-8", errors="ignore")
        for secret in (*SECRETS, *local):
            assert secret not in text, f"{path.name} holds {secret!r}"
    card = (_snapshot(HUB_ID) / "README.md").read_text()
    assert "users.csv" in card and "max_epochs: 2" in card and "Logger" not in card


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id))


@pytest.mark.parametrize("out", [".", "checkpoints/demo", "checkpoints"])
def test_an_export_over_the_checkpoints_or_the_working_folder_is_refused_before_any_work(exported, out, capsys):
    folder = exported["folder"]
    before = sorted(p.name for p in (folder / "checkpoints/demo").iterdir())
    mp = pytest.MonkeyPatch()
    mp.chdir(folder)
    try:
        with pytest.raises(SystemExit):
            export_main(["--ckpt", "checkpoints/demo/last.ckpt", "--out", out, "--overwrite"])
    finally:
        mp.undo()
    assert re.search(r"--out .* (the working folder|a folder that holds --ckpt)", capsys.readouterr().err)
    assert sorted(p.name for p in (folder / "checkpoints/demo").iterdir()) == before


@pytest.fixture
def nothing_built(monkeypatch):
    """Fails a test that builds a model: a bad input must stop before."""

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was found")

    monkeypatch.setattr("mbti_lightning.backbone.build", built)


def main_says(folder: Path, argv: list[str], capsys) -> str:
    """What the `mbti-lightning` console script prints for `argv`: exit status 2, one line, no traceback."""
    from mbti_lightning.cli import main

    mp = pytest.MonkeyPatch()
    mp.chdir(folder)
    mp.setattr(sys, "argv", ["mbti-lightning", *argv])
    try:
        with pytest.raises(SystemExit) as stopped:
            main()
    finally:
        mp.undo()
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("mbti-lightning: error: ")]
    return line


def not_a_classifier_of_letters(folder: Path) -> Path:
    """A Hugging Face classifier whose labels are not MBTI letters (someone else's sentiment model)."""
    from transformers import Phi3Config, Phi3ForSequenceClassification

    from mbti_lightning.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("demo")
    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "negative", 1: "positive"},
    )
    Phi3ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_every_bad_input_is_one_line_naming_it_before_any_model_is_built(exported, tmp_path, nothing_built, capsys):
    folder, demo = exported["folder"], ["--config", str(REPO / "configs/demo.yaml")]
    ckpt = str(exported["ckpt"])
    said = main_says(folder, ["validate", *demo, "--ckpt_path", "typo.ckpt"], capsys)
    assert "checkpoint not found: typo.ckpt" in said
    said = main_says(folder, ["validate", *demo, "--ckpt_path", "someone/no-such-model"], capsys)
    assert "someone/no-such-model is neither a checkpoint (.ckpt) nor a model folder or hub id" in said
    said = main_says(
        folder, ["predict", *exported["args"], "--ckpt_path", ckpt, "--data.predict_file", "gone.csv"], capsys
    )
    assert "data.predict_file gone.csv not found" in said
    said = main_says(folder, ["validate", *demo, "--data.dataset", "csv", "--data.data_files", "gone.csv"], capsys)
    assert re.search(r"data csv gone\.csv not found", said)
    said = main_says(folder, ["predict", *demo, "--data.keep_fraction", "1.0"], capsys)
    assert "has no test split with data.split 'seed'" in said
    other = str(not_a_classifier_of_letters(tmp_path / "sentiment"))
    for argv in (["serve", other], ["explain", *demo, "--ckpt_path", other, "--texts", '["hello"]']):
        said = main_says(folder, argv, capsys)
        assert f"{other} predicts ['negative', 'positive'], not MBTI letters or types" in said
    said = main_says(folder, ["serve", str(tmp_path / "nothing-here")], capsys)
    assert "nothing-here is neither a checkpoint (.ckpt) nor a model folder or hub id" in said


def test_rows_without_an_author_are_persons_of_their_own_with_a_line_saying_how_many(tmp_path):
    from mbti_lightning.data import MBTIDataModule
    from mbti_lightning.demo import generate_rows

    rows = generate_rows(num_rows=600, seed=2)
    authors = [a if i % 5 else "" for i, a in enumerate(rows["author"])]  # every fifth row has none
    authors[1] = None
    path = tmp_path / "posts.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["author", "body", "mbti"], *zip(authors, rows["body"], rows["mbti"])])
    dm = MBTIDataModule(dataset="csv", data_files=str(path), tokenizer="demo", keep_fraction=1.0, split="author")
    with pytest.warns(UserWarning, match=r"121 rows have no 'author'; each is taken as a person of its own"):
        dm.setup("fit")
    persons = sum(len(np.unique(part["author"][:])) for part in dm.splits.values())
    assert persons == len({a for a in authors if a}) + 121

    predict = tmp_path / "predict.csv"
    with predict.open("w", newline="") as f:
        csv.writer(f).writerows(
            [["id", "author", "body"], [1, "ann", "a"], [2, "", "b"], [3, "", "c"], [4, "ann", "d"]]
        )
    dm = MBTIDataModule(tokenizer="demo", predict_file=str(predict))
    dm.setup("predict")
    assert dm.predict_inputs["author"] == ["ann", 2, 3, "ann"]


@pytest.mark.slow
def test_a_lora_checkpoint_with_an_fp32_head_on_a_bf16_base_runs_through_every_command(tmp_path, monkeypatch):
    """As QLoRA and peft leave it: the head saved in fp32, the adapters in bf16; every command computes in bf16."""
    from test_lora import LORA

    from mbti_lightning import loading

    steps = ["--trainer.max_steps", "20", "--trainer.val_check_interval", "10"]
    lora = ["--model.from_scratch", "false", "--model.peft", LORA, "--trainer.precision", "bf16-true"]
    run(tmp_path, "fit", "--config", str(REPO / "configs/demo.yaml"), *lora, *steps)
    checkpoint = torch.load(tmp_path / "checkpoints/demo/last.ckpt", weights_only=False)
    heads = [k for k in checkpoint["state_dict"] if ".score." in k]
    for key in heads:
        checkpoint["state_dict"][key] = checkpoint["state_dict"][key].float()
    ckpt = tmp_path / "fp32_head.ckpt"
    torch.save(checkpoint, ckpt)
    assert heads and loading.load(ckpt).model.model.dtype == torch.bfloat16

    (tmp_path / "texts.txt").write_text("i made a plan for the week\nwhatever lol\n")
    demo = ["--config", str(REPO / "configs/demo.yaml")]
    for name in ("fp32_head.ckpt", "checkpoints/demo/last.ckpt"):
        out = f"{name.replace('/', '_')}.csv"
        run(
            tmp_path,
            "predict",
            *demo,
            "--ckpt_path",
            name,
            "--data.predict_file",
            "texts.txt",
            "--predictions.output",
            out,
        )
    assert (tmp_path / "fp32_head.ckpt.csv").read_text() == (tmp_path / "checkpoints_demo_last.ckpt.csv").read_text()
    assert "test/mcc" in run(tmp_path, "test", *demo, "--ckpt_path", str(ckpt)).trainer.callback_metrics
    run(tmp_path, "report", *demo, "--ckpt_path", str(ckpt), "--out", str(tmp_path / "report"), "--resamples", "50")
    export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "model")])
    loaded = loading.load(tmp_path / "model")
    assert loaded.dtype == torch.bfloat16 and json.loads((tmp_path / "report/report.json").read_text())["rows"] > 0


def test_predictions_on_the_test_split_name_authors_as_the_file_does_and_number_exploded_posts(tmp_path):
    from mbti_lightning.data import MBTIDataModule
    from mbti_lightning.demo import generate_rows

    rows = generate_rows(num_rows=600, seed=2)
    path = tmp_path / "posts.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["author", "body", "mbti"], *zip(rows["author"], rows["body"], rows["mbti"])])
    dm = MBTIDataModule(dataset="csv", data_files=str(path), tokenizer="demo", keep_fraction=0.8, split="author")
    dm.setup("test")
    dm.predict_dataloader()
    assert set(dm.predict_inputs["author"]) <= set(rows["author"]) and "post" not in dm.predict_inputs

    users = kaggle_file(tmp_path / "users.csv", num_rows=600)
    args = dict(kaggle_args(users)[i : i + 2] for i in range(0, len(kaggle_args(users)), 2))
    settings = {k.removeprefix("--data."): None if v == "null" else v for k, v in args.items()}
    settings |= {"mask_type_mentions": True, "keep_fraction": 0.8, "tokenizer": "demo"}
    dm = MBTIDataModule(**settings)
    dm.setup("test")
    dm.predict_dataloader()
    inputs = dm.predict_inputs
    pairs = list(zip(inputs["id"], inputs["post"]))
    assert len(set(pairs)) == len(pairs) and max(inputs["post"]) > 0
    assert inputs["author"] == [str(i) for i in inputs["id"]]  # no author column: each source row is a person


def test_options_of_how_to_run_a_model_reach_the_export_and_the_server(exported, monkeypatch, capsys):
    """As README promises for every command: `--model-option attn_implementation=eager` over the checkpoint's."""
    from mbti_lightning import loading, serve

    seen = {}

    def stop(source, runtime=None):
        seen[str(source)] = runtime
        raise loading.LoadError("stop here")

    monkeypatch.setattr(loading, "from_checkpoint", stop)
    monkeypatch.setattr(loading, "load", stop)
    argv = ["--model-option", "attn_implementation=eager", "--model-option", "sdpa_kernels=[math]"]
    with pytest.raises(SystemExit):
        export_main(["--ckpt", str(exported["ckpt"]), "--out", str(exported["folder"] / "eager"), *argv])
    with pytest.raises(loading.LoadError):
        serve.main([str(exported["out"]), *argv])
    assert list(seen.values()) == [{"attn_implementation": "eager", "sdpa_kernels": ["math"]}] * 2
    with pytest.raises(UserError, match="--model-option 'max_length=3': give KEY=VALUE with KEY one of"):
        serve.main([str(exported["out"]), "--model-option", "max_length=3"])


def test_the_export_runs_the_model_once_per_split_and_its_raw_figures_are_the_checkpoints(exported, monkeypatch):
    """Validation (raw, for the calibration), test (as written): each once; the figures before calibration, from
    the written scores with the calibration taken out, are those of a raw pass of the checkpoint."""
    from mbti_lightning import evaluation, loading

    rows = []
    forward = MBTIClassifier.forward
    monkeypatch.setattr(
        MBTIClassifier, "forward", lambda self, ids, mask: rows.append(len(ids)) or forward(self, ids, mask)
    )
    out = exported["folder"] / "once"
    export_main(["--ckpt", str(exported["ckpt"]), "--out", str(out)])
    loaded = loading.load(exported["ckpt"])
    dm = loading.datamodule(loaded)
    dm.setup("test")
    assert sum(rows) == len(dm.splits["validation"]) + len(dm.splits["test"]) + 1  # and the card's example text
    card = (out / "README.md").read_text()
    raw = evaluation.split_outputs(loaded.model, dm, "test")
    from mbti_lightning import calibration

    ece = calibration.ece(raw.logits["E-I"], torch.as_tensor(raw.labels[:, 0]))
    assert f"| {ece:.4f} |" in card  # ECE before calibration, as the card's table shows it


def test_loading_a_fine_tuned_checkpoint_says_nothing_of_a_newly_initialized_head(tmp_path, capfd, caplog):
    """transformers' "score.weight ... newly initialized" block was printed by every command on a checkpoint of a
    pretrained base, though the trained head is loaded right after: the model is now built from its config."""
    from conftest import fit_demo

    from mbti_lightning import loading

    ckpt = fit_demo(tmp_path, "--model.from_scratch", "false", "--trainer.max_steps", "2") / "last.ckpt"
    capfd.readouterr()
    caplog.clear()
    model = loading.load(ckpt).model
    said = capfd.readouterr().err + capfd.readouterr().out + caplog.text
    assert "newly initialized" not in said and "MISSING" not in said
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k.startswith("model."))


def test_the_progress_bar_under_max_steps_names_the_epoch_alone():
    from lightning import Trainer

    from mbti_lightning.callbacks import ProgressBar

    bar = ProgressBar()
    bar._trainer = Trainer(max_steps=5, logger=False, enable_checkpointing=False)
    assert bar._get_train_description(0).strip() == "Epoch 0"  # not "Epoch 0/-2"


def test_an_export_that_records_no_length_and_a_tokenizer_without_one_reads_the_models_positions(exported, caplog):
    """As an early export of a Gemma model (its tokenizer's limit is 1e30, which truncation cannot take)."""
    import logging
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    from mbti_lightning import loading

    old = exported["folder"] / "old-export"
    shutil.copytree(exported["out"], old)
    config = AutoConfig.from_pretrained(old)
    config.mbti_lightning = {k: v for k, v in config.mbti_lightning.items() if k not in ("data", "max_length")}
    config.save_pretrained(old)
    tokenizer = AutoTokenizer.from_pretrained(old)
    tokenizer.model_max_length = int(1e30)
    tokenizer.save_pretrained(old)
    with caplog.at_level(logging.INFO):
        loaded = loading.load(str(old))
    assert loaded.max_length == config.max_position_embeddings
    assert f"max_length: {config.max_position_embeddings}, the model's positions" in caplog.text
    assert len(loaded.tokenizer("word " * 5000, truncation=True)["input_ids"]) == config.max_position_embeddings


def test_the_last_progress_line_shows_the_rate_it_ran_at_not_zero():
    from rich.progress import Progress

    from mbti_lightning.callbacks import Speed

    with Progress(Speed(style="")) as progress:
        task = progress.add_task("train", total=3)
        for _ in range(3):
            progress.advance(task)
        done = progress.tasks[0]
        done.finished_speed = 2.5  # as Rich records it when the task completes
        assert done.finished and str(Speed(style="").render(done)) == "2.50it/s"
