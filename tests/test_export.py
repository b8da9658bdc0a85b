import csv
import logging
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, fit_demo
from fake_hub import FakeHfApi
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline

from mbti_lightning import calibration, folding
from mbti_lightning.card import EXAMPLES, card_data
from mbti_lightning.cli import cli_main
from mbti_lightning.evaluation import METRICS
from mbti_lightning.export import main as export_main
from mbti_lightning.model import MBTIClassifier
from mbti_lightning.tokenizer import load_tokenizer

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
    cli_main(
        [
            "fit",
            "--config",
            str(REPO / "configs/demo.yaml"),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "60",
            "--trainer.val_check_interval",
            "30",
            "--data.preprocessing_workers",
            "2",
        ]
    )
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


def lightning_logits(ckpt: Path) -> torch.Tensor:
    model = MBTIClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    with torch.no_grad():
        return model(**load_tokenizer("demo")(TEXTS, padding=True, return_tensors="pt"))


def assert_pipeline_scores(folder: Path, expected: torch.Tensor) -> None:
    results = pipeline("text-classification", model=str(folder), top_k=None)(TEXTS)
    for probs, result in zip(expected, results):
        scores = {r["label"]: r["score"] for r in result}
        assert set(scores) == {"J", "P"}
        assert scores["J"] == pytest.approx(probs[0].item(), abs=1e-5)
        assert scores["P"] == pytest.approx(probs[1].item(), abs=1e-5)


def test_pipeline_gives_the_lightning_models_scores(trained, tmp_path):
    out = tmp_path / "model"
    export("--ckpt", trained, "--out", out, "--no-calibrate")
    assert_pipeline_scores(out, lightning_logits(trained).softmax(-1))
    assert AutoModelForSequenceClassification.from_pretrained(out).config.id2label == {0: "J", 1: "P"}
    assert "exported with `--no-calibrate`" in (out / "README.md").read_text()


def test_calibrated_export_folds_the_temperature_and_offsets_of_its_card_into_a_head_without_a_bias(trained, tmp_path):
    """The demo's head (Phi-3's `score`) has no bias: its rows are divided by T, and the P offset rides on the
    weights along one direction of the head's input; `pipeline` gives exactly what that head makes of it."""
    out = tmp_path / "model"
    export("--ckpt", trained, "--out", out)
    config = AutoConfig.from_pretrained(out)
    (temperature,) = config.calibration_temperatures.values()
    offsets = config.calibration_offsets["J-P"]
    assert temperature != 1.0 and offsets["J"] == 0.0 and offsets["P"] != 0.0
    card = (out / "README.md").read_text()
    row = re.search(r"\| J-P \| ([\d.]+) \| J \+0.000, P ([+-][\d.]+) \|", card)
    assert (float(row[1]), float(row[2])) == pytest.approx((temperature, offsets["P"]), abs=1e-3)
    assert "head has no bias, so the offsets ride on its weights" in card

    model = MBTIClassifier.load_from_checkpoint(trained, map_location="cpu").eval()
    raw = folding.classification_head(model.model).weight.detach()
    folded = AutoModelForSequenceClassification.from_pretrained(out).score.weight.detach()
    assert torch.allclose(folded[0], raw[0] / temperature, atol=1e-6)  # J: the temperature alone
    assert not torch.allclose(folded[1], raw[1] / temperature, atol=1e-3)  # P: and its offset
    with torch.no_grad(), folding.head_inputs(model.model) as inputs:
        model(**load_tokenizer("demo")(TEXTS, padding=True, return_tensors="pt"))
    assert_pipeline_scores(out, (inputs[0] @ folded.T).softmax(-1))
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG" and "](reliability.png)" in card


def test_temperature_scaling_fixes_an_overconfident_model():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (2000,))
    x = torch.randn(2000) + (2 * labels - 1)  # N(-1, 1) or N(1, 1): the calibrated log-odds are 2x
    logits = torch.stack([torch.zeros(2000), 4 * 2 * x], 1)  # four times too sure
    cal = calibration.fit(logits, labels, offsets=False)
    assert cal.temperature == pytest.approx(4.0, rel=0.1)
    assert calibration.ece(logits, labels, cal) < calibration.ece(logits, labels) / 3


def weak_class_weighted_logits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a weak model trained with balanced class weights scores on data where P is 70% of rows: log-odds
    centred on an equal prior (the weights took the 70/30 out), with little signal."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.7).long()
    log_odds = 0.4 * (2 * labels - 1) + torch.randn(n, generator=g) - 0.4 * (2 * 0.7 - 1)
    return torch.stack([torch.zeros(n), log_odds], 1), labels


def test_offsets_restore_the_prior_that_a_temperature_cannot_on_rows_not_fitted_on():
    fit_logits, fit_labels = weak_class_weighted_logits(4000, seed=0)
    logits, labels = weak_class_weighted_logits(4000, seed=1)  # held out
    share = labels.float().mean().item()
    temperature_only = calibration.fit(fit_logits, fit_labels, offsets=False)
    both = calibration.fit(fit_logits, fit_labels)
    assert abs(temperature_only(logits).softmax(-1)[:, 1].mean().item() - share) > 0.1  # stays near 0.5
    assert both(logits).softmax(-1)[:, 1].mean().item() == pytest.approx(share, abs=0.05)
    assert calibration.prior_gap(logits, labels, both) < 0.05 < calibration.prior_gap(logits, labels)
    assert calibration.ece(logits, labels, both) < calibration.ece(logits, labels)


def test_a_temperature_out_of_bounds_is_held_with_a_warning():
    labels = torch.arange(200) % 2
    noise = torch.stack([torch.zeros(200), torch.randn(200, generator=torch.Generator().manual_seed(0))], 1)
    with pytest.warns(UserWarning, match=r"calibration of J-P: the best temperature, .* is held at 20.0"):
        assert calibration.fit(noise, labels, name="J-P").temperature == pytest.approx(20.0)


@pytest.mark.parametrize("bias", [True, False])
def test_folding_gives_the_calibrated_scores_with_or_without_a_head_bias(bias):
    """With a bias the offsets go there; without one they ride on the weights, scaled per text by `carrier . h`
    where h is the head's input at the position the model pools (a decoder's last text token, padding after)."""
    from transformers import BertConfig, BertForSequenceClassification, Phi3Config, Phi3ForSequenceClassification

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    model = (
        BertForSequenceClassification(BertConfig(**small))
        if bias
        else Phi3ForSequenceClassification(Phi3Config(**small, pad_token_id=0))
    ).eval()
    ids = torch.randint(1, 100, (4, 7))
    ids[1, 5:], ids[2, 3:] = 0, 0  # right padding: rows of different lengths
    mask = (ids != 0).long()
    carrier = None if bias else torch.randn(32, generator=torch.Generator().manual_seed(0))
    cal = calibration.Calibration(2.5, (0.0, 0.8), carrier)
    with torch.no_grad(), folding.head_inputs(model) as inputs:
        raw = model(ids, attention_mask=mask).logits.double()
        head = folding.classification_head(model)
        as_inputs = inputs[0] @ head.weight.T + (head.bias if bias else 0)  # the pooled input, 2-D or 3-D
        assert torch.allclose(as_inputs.double(), raw, atol=1e-5)
        assert folding.fold(model, [2.5, 2.5], list(cal.offsets), carrier)
        expected = cal(raw, None if bias else inputs[0] @ carrier)
        assert torch.allclose(model(ids, attention_mask=mask).logits.double(), expected, atol=1e-5)


def test_the_carrier_finds_the_direction_of_the_inputs_that_is_the_same_for_every_row():
    """Rows in a 15-dimensional subspace of 16, plus one constant vector: a direction exists along which every
    row is the same, though not the rows' mean direction."""
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(2000, 15, generator=g) @ torch.randn(15, 16, generator=g) + torch.randn(16, generator=g)
    carried = inputs @ calibration.fit_carrier(inputs)
    along_mean = inputs @ inputs.mean(0)
    assert (along_mean / along_mean.mean()).std() > 1.0  # the mean direction is no constant
    assert carried.mean().item() == pytest.approx(1.0, abs=0.2) and carried.std().item() < 0.2  # up to the ridge


def test_a_head_without_a_bias_or_carrier_takes_the_temperature_alone():
    from transformers import Phi3Config, Phi3ForSequenceClassification

    config = Phi3Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100, pad_token_id=0
    )
    model = Phi3ForSequenceClassification(config).eval()
    ids = torch.randint(1, 100, (4, 7))
    with torch.no_grad():
        raw = model(ids).logits.double()
        assert not folding.fold(model, [2.5, 2.5], [0.0, 0.8])
        assert torch.allclose(model(ids).logits.double(), raw / 2.5, atol=1e-5)


def test_the_head_is_found_by_name_even_where_lora_matrices_have_as_many_outputs():
    from transformers import Phi3Config, Phi3ForSequenceClassification

    peft = pytest.importorskip("peft")
    config = Phi3Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100, pad_token_id=0
    )
    model = Phi3ForSequenceClassification(config)
    # r == num_labels: every lora_A is a Linear with num_labels outputs, registered before... or after the head.
    lora = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["qkv_proj"]))
    assert folding.classification_head(lora) is lora.base_model.model.score.modules_to_save["default"]


def test_the_dtype_as_trained_is_a_backbone_weights_not_the_class_weight_buffers():
    from mbti_lightning.loading import saved_dtype

    state = {"class_weight": torch.ones(1, 2), "model.score.weight": torch.ones(2, 4, dtype=torch.bfloat16)}
    assert saved_dtype({"state_dict": state, "hyper_parameters": {}}) == "bfloat16"
    qlora = {"state_dict": {"class_weight": torch.ones(1, 2), "model.lora_A": torch.ones(2, 2)}}
    assert (
        saved_dtype(qlora | {"hyper_parameters": {"quantize": "nf4"}}) == "bfloat16"
    )  # the 4-bit base's compute dtype


def test_card_has_metrics_baseline_split_and_plots(trained, tmp_path):
    out = tmp_path / "model"
    export("--ckpt", trained, "--out", out)
    card = (out / "README.md").read_text()
    for text in (
        "| MCC |",
        "| balanced accuracy |",
        "majority class",
        "Rows are split, not authors",
        "Intended use and limitations",
        "learning_rate",
        "pipeline_tag: text-classification",
    ):
        assert text in card, text
    for png in ("val_metrics.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in card
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_card_metadata_carries_every_metric_the_table_shows(trained, tmp_path):
    out = tmp_path / "model"
    export("--ckpt", trained, "--out", out, "--license", "mit")
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.language == "en" and card.data.library_name == "transformers"
    assert card.data.widget and all(example["text"] for example in card.data.widget)
    _, results = model_index_to_eval_results(metadata_load(out / "README.md")["model-index"])
    from_metadata = {(r.metric_config, r.metric_name.removeprefix("J-P ")): r.metric_value for r in results}
    assert {r.dataset_split for r in results} == {"test"}  # the demo's seed split leaves test rows
    posts = card.text.split("Per post:")[1].split("Per person")[0]
    table = dict(re.findall(r"^\| (accuracy|macro-F1|MCC|balanced accuracy) \| ([\d.]+) \[", posts, re.M))
    assert len(table) == 4
    assert from_metadata == {("J-P", name): float(value) for name, value in table.items()}
    header = "| metric | this model | TF-IDF + logistic regression | majority | model - baseline | model - majority |"
    assert header in card.text


def test_the_baseline_command_logs_the_mcc_the_card_shows(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mbti-lightning"])
    cli_main(["baseline", "--config", str(REPO / "configs/demo.yaml")])
    (logged,) = csv.DictReader(next(Path("logs").rglob("metrics.csv")).open())
    assert float(logged["val/baseline/mcc"]) > 0.3 and float(logged["test/baseline/mcc"]) > 0.3
    export("--ckpt", trained, "--out", tmp_path / "model")
    posts = (tmp_path / "model/README.md").read_text().split("Per post:")[1]
    (row,) = re.findall(r"^\| MCC \| [\d.]+ \[[^]]*\] \| ([\d.]+) \[", posts, re.M)[:1]
    assert row == f"{float(logged['test/baseline/mcc']):.4f}"  # the card is on the test split


def test_base_model_and_datasets_are_set_for_hub_ids_only(tmp_path):
    hub_model = {"model_name_or_path": "microsoft/Phi-3-mini-4k-instruct", "from_scratch": False}
    hub_data = {"dataset": "minhaozhang/mbti", "data_files": None}
    results = {"J-P": {"posts": {"model": dict.fromkeys(METRICS, {"value": 0.5, "interval": (0.4, 0.6)})}}}
    data = card_data(hub_model, hub_data, {"J-P": ("J", "P")}, results, adapter=True, license=None)
    assert data.base_model == "microsoft/Phi-3-mini-4k-instruct" and data.datasets == ["minhaozhang/mbti"]
    assert data.library_name == "peft" and data.license is None
    (tmp_path / "phi3").mkdir()
    for model_hp, data_hp in [
        ({"model_name_or_path": str(tmp_path / "phi3")}, {"dataset": "csv", "data_files": "posts.csv"}),
        (hub_model | {"from_scratch": True}, {"dataset": "minhaozhang/mbti", "data_files": "local.parquet"}),
        ({"model_name_or_path": "demo", "from_scratch": True}, {"dataset": "demo"}),
    ]:
        data = card_data(model_hp, data_hp, {"J-P": ("J", "P")}, results, adapter=False, license=None)
        assert data.base_model is None and data.datasets is None, (model_hp, data_hp)


def test_dtype_choice_is_saved(trained, tmp_path):
    export("--ckpt", trained, "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The HfApi mock, no token in the environment, and an empty temporary HF_HOME (no saved login)."""
    monkeypatch.setattr("mbti_lightning.export.HfApi", FakeHfApi)
    FakeHfApi.reset()
    for name in ("HF_TOKEN", "HF_HUB_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(home / "token"))  # read at import
    return home


def test_push_sends_the_folder_with_the_env_token_and_never_writes_it(trained, tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "model"
    export("--ckpt", trained, "--out", out, "--push-to-hub", "me/mbti-jp", "--private")

    assert FakeHfApi.calls[0] == ("token", TOKEN)
    assert FakeHfApi.calls[1] == ("create_repo", "me/mbti-jp", True)
    assert FakeHfApi.calls[2] == ("update_repo_settings", "me/mbti-jp", True)
    _, repo, files, revision, create_pr, message = FakeHfApi.calls[3]
    assert repo == "me/mbti-jp" and revision is None and not create_pr
    assert re.fullmatch(r"mbti-lightning: J-P classifier from demo, test MCC 0\.\d{4}", message)
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "confusion_matrix.png"} <= set(files)
    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err
    for path in out.iterdir():
        assert TOKEN.encode() not in path.read_bytes(), path.name


def test_a_user_logged_in_with_hf_auth_login_can_push_to_a_branch_or_a_pull_request(trained, tmp_path, hub, capsys):
    hub.mkdir()
    (hub / "token").write_text(TOKEN)  # what `hf auth login` saves
    out = tmp_path / "model"
    export("--ckpt", trained, "--out", out, "--push-to-hub", "me/mbti-jp", "--revision", "v2", "--create-pr")
    assert FakeHfApi.calls[0] == ("token", TOKEN)
    assert FakeHfApi.calls[1] == ("create_repo", "me/mbti-jp", None)  # the account's default visibility
    assert FakeHfApi.calls[2] == ("create_branch", "me/mbti-jp", "v2")
    assert FakeHfApi.calls[3][3:5] == ("v2", True)
    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err
    for path in out.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path.name


def test_token_can_come_from_a_dotenv_file(trained, tmp_path, hub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"# hub\nHF_HUB_TOKEN='{TOKEN}'\n")
    export("--ckpt", trained, "--out", tmp_path / "model", "--push-to-hub", "me/mbti-jp")
    assert FakeHfApi.calls[0] == ("token", TOKEN) and FakeHfApi.calls[1][2] is None


def test_private_makes_an_existing_public_repo_private(trained, tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    FakeHfApi.repos["me/mbti-jp"] = {"private": False, "files": {".gitattributes", "README.md"}}
    export("--ckpt", trained, "--out", tmp_path / "model", "--push-to-hub", "me/mbti-jp", "--private")
    assert FakeHfApi.repos["me/mbti-jp"]["private"] is True


def expect_error(capsys, message: str, *args) -> None:
    with pytest.raises(SystemExit) as exit_info:
        export(*args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_token_fails_before_any_work(trained, tmp_path, hub, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    expect_error(
        capsys,
        "--push-to-hub needs a Hugging Face token: log in with `hf auth login`",
        "--ckpt",
        trained,
        "--out",
        tmp_path / "m",
        "--push-to-hub",
        "me/x",
    )
    assert not (tmp_path / "m").exists()


def test_bad_checkpoints_are_named(tmp_path, capsys):
    expect_error(
        capsys,
        f"checkpoint not found: {tmp_path / 'nope.ckpt'}",
        "--ckpt",
        tmp_path / "nope.ckpt",
        "--out",
        tmp_path / "m",
    )
    (tmp_path / "corrupt.ckpt").write_bytes(b"\x00not a checkpoint" * 10)
    expect_error(
        capsys,
        f"could not read checkpoint {tmp_path / 'corrupt.ckpt'}",
        "--ckpt",
        tmp_path / "corrupt.ckpt",
        "--out",
        tmp_path / "m",
    )
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "other.ckpt")
    expect_error(
        capsys, "was not written by `mbti-lightning fit`", "--ckpt", tmp_path / "other.ckpt", "--out", tmp_path / "m"
    )
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


def test_a_failed_overwrite_keeps_the_old_folder(trained, tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    replace, calls = os.replace, []

    def fail_second(src, dst):  # the old folder is set aside, then moving the new one in fails
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk gone")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="disk gone"):
        export("--ckpt", trained, "--out", out, "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_exported_model_predicts_through_the_cli_as_its_checkpoint_does(
    trained, tmp_path, monkeypatch, recwarn, caplog
):
    """An exported folder (its hub id: tests/test_seams.py) works as `model.model_name_or_path` or `--ckpt_path`, under a
    config that trains from scratch too: `predict` writes the checkpoint's predictions; a command line whose target
    is not the model's is told the model's is used."""
    out = tmp_path / "model"
    export("--ckpt", trained, "--out", out, "--no-calibrate")  # the checkpoint's own scores
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
    # configs/demo.yaml says from_scratch: true; the export is still what runs (it was a random model before).
    cli_main([*predict, "--model.model_name_or_path", str(out), "--predictions.output", "scratch.csv"])
    cli_main([*predict, "--ckpt_path", str(out), "--predictions.output", "folder.csv"])
    assert Path("scratch.csv").read_text() == Path("folder.csv").read_text() == Path("checkpoint.csv").read_text()
    assert not [w for w in recwarn if "batch indices" in str(w.message)]  # Lightning's, about its own writer

    caplog.set_level(logging.INFO)
    cli_main([*predict, *published, "--data.target", "E-I", "--predictions.output", "target.csv"])
    assert f"data.target: 'J-P', as {out} was trained (not 'E-I')" in caplog.text
    assert Path("target.csv").read_text() == Path("checkpoint.csv").read_text()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_cards_table_is_the_exported_folders_own_metrics_through_pipeline(trained, tmp_path, dtype):
    from mbti_lightning.data import MBTIDataModule
    from mbti_lightning.loading import hyperparameters, read_checkpoint
    from mbti_lightning.metrics import score_predictions

    out = tmp_path / "model"
    export("--ckpt", trained, "--out", out, "--dtype", dtype)
    dm = MBTIDataModule(**hyperparameters(read_checkpoint(trained), "datamodule_hyper_parameters"))
    dm.setup("test")
    rows = dm.splits["test"]
    texts = dm.tokenizer.batch_decode(rows["input_ids"][:], skip_special_tokens=True)
    classifier = pipeline("text-classification", model=str(out), dtype="auto")
    letters = [result["label"] for result in classifier(texts, batch_size=64)]
    preds = torch.tensor([[("J", "P").index(letter)] for letter in letters])
    scores = score_predictions({"J-P": ("J", "P")}, preds, torch.tensor(rows["labels"][:])[:, None])["J-P"]
    card = (out / "README.md").read_text()
    # The usage example shows what pipeline answers for it, not a placeholder.
    example = classifier(EXAMPLES[0], top_k=None, truncation=True)
    shown = re.findall(r"'label': '(\w)', 'score': ([\d.]+)", card.split("classifier(")[1].split("```")[0])
    assert [label for label, _ in shown] == [r["label"] for r in example]
    assert [float(score) for _, score in shown] == pytest.approx([r["score"] for r in example], abs=2e-3)
    table = dict(
        re.findall(
            r"^\| (accuracy|MCC|balanced accuracy) \| ([\d.]+) \[",
            card.split("Per post:")[1].split("Per person")[0],
            re.M,
        )
    )
    assert {name: float(value) for name, value in table.items()} == pytest.approx(
        {"accuracy": scores["acc"], "MCC": scores["mcc"], "balanced accuracy": scores["bal_acc"]}, abs=6e-5
    )


def test_an_export_after_the_data_changed_stops_unless_allowed_and_the_card_says_so(corpus_file, tmp_path, capsys):
    import pyarrow.parquet as pq

    data = ["--data.dataset", "parquet", "--data.data_files", str(corpus_file), "--data.keep_fraction", "1.0"]
    ckpt = fit_demo(tmp_path, *data, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4") / "last.ckpt"
    table = pq.read_table(corpus_file)
    pq.write_table(table.slice(100), corpus_file)  # a user's file, edited since: every split moves
    expect_error(capsys, "no longer gives the train / validation / test rows", "--ckpt", ckpt, "--out", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    export("--ckpt", ckpt, "--out", tmp_path / "m", "--allow-changed-data")
    assert "**The data changed after training**" in (tmp_path / "m/README.md").read_text()
    pq.write_table(table, corpus_file)  # the data as trained: no complaint, no note
    export("--ckpt", ckpt, "--out", tmp_path / "m2")
    assert "The data changed" not in (tmp_path / "m2/README.md").read_text()


def test_a_relative_local_model_path_is_not_taken_for_someone_elses_hub_repo():
    results = {"J-P": {"posts": {"model": dict.fromkeys(METRICS, {"value": 0.5, "interval": (0.4, 0.6)})}}}
    local = {"model_name_or_path": "models/phi3", "from_scratch": False}  # a folder where the run was made
    assert card_data(local, {"dataset": "demo"}, {"J-P": ("J", "P")}, results, False, None, True).base_model is None
    assert card_data(local, {"dataset": "demo"}, {"J-P": ("J", "P")}, results, False, None, False).base_model == (
        "models/phi3"
    )


def test_the_folder_follows_the_umask_and_the_snippet_truncates_as_training_did(trained, tmp_path):
    old = os.umask(0o027)
    try:
        export("--ckpt", trained, "--out", tmp_path / "model")
    finally:
        os.umask(old)
    out = tmp_path / "model"
    assert out.stat().st_mode & 0o777 == 0o750
    assert {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()}["model.safetensors"] == 0o640
    assert {path.stat().st_mode & 0o777 for path in out.iterdir()} == {0o640}
    assert load_tokenizer(str(out)).model_max_length == 128  # configs/demo.yaml's data.max_length
    card = (out / "README.md").read_text()
    assert "truncation=True)  # at 128 tokens, as in training" in card
    classifier = pipeline("text-classification", model=str(out))
    assert classifier("word " * 1000, truncation=True)[0]["label"] in {"J", "P"}


def skewed_corpus(path: Path, p_share: float = 0.7) -> Path:
    """The demo corpus with J rows dropped until P is `p_share` of the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mbti_lightning.demo import generate_rows

    rows = generate_rows(num_rows=6000, seed=9)
    p = [i for i, letter in enumerate(rows["J-P"]) if letter == "P"]
    j = [i for i, letter in enumerate(rows["J-P"]) if letter == "J"][: int(len(p) * (1 - p_share) / p_share)]
    keep = sorted(p + j)
    pq.write_table(pa.table({key: [values[i] for i in keep] for key, values in rows.items()}), path)
    return path


@pytest.mark.parametrize("head_bias", [True, False], ids=["BERT, a head with a bias", "Phi-3, a head without"])
def test_a_weak_class_weighted_model_exports_scores_with_the_true_prior(tmp_path, head_bias):
    """A weak model on 70% P rows with balanced class weights: its raw scores centre on an equal prior; the
    export's calibrated `pipeline` scores average the test rows' P share, rows the calibration never saw, and are
    better calibrated there. A small BERT's classifier has a bias to hold the offsets; the demo's Phi-3 `score`
    carries them on its weights. (Measured, share 0.674: BERT raw mean 0.496, calibrated 0.697; Phi-3 raw 0.464,
    calibrated 0.632, ECE 0.082 -> 0.034.)"""
    from transformers import BertConfig

    from mbti_lightning.data import MBTIDataModule
    from mbti_lightning.loading import hyperparameters, read_checkpoint

    data = ["--data.dataset", "parquet", "--data.data_files", str(skewed_corpus(tmp_path / "skewed.parquet"))]
    model = []  # the demo's Phi-3
    if head_bias:
        base = tmp_path / "bert"
        tokenizer = load_tokenizer("demo")
        tokenizer.save_pretrained(base)
        small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        BertConfig(vocab_size=len(tokenizer), max_position_embeddings=256, **small).save_pretrained(base)
        model = ["--model.model_name_or_path", str(base), "--model.learning_rate", "5e-4"]
    short = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "30", "--trainer.val_check_interval", "30"]
    ckpt = fit_demo(tmp_path, *data, *model, *short) / "last.ckpt"
    dm = MBTIDataModule(**hyperparameters(read_checkpoint(ckpt), "datamodule_hyper_parameters"))
    dm.setup("test")
    rows = dm.splits["test"]
    texts = dm.tokenizer.batch_decode(rows["input_ids"][:], skip_special_tokens=True)
    labels = torch.tensor(rows["labels"][:])
    share = labels.float().mean().item()
    assert 0.65 < share < 0.75
    scores = {}
    for how in ([], ["--no-calibrate"]):
        out = tmp_path / f"model{len(how)}"
        export("--ckpt", ckpt, "--out", out, *how)
        results = pipeline("text-classification", model=str(out), top_k=None)(texts, batch_size=64)
        scores[len(how)] = torch.tensor([{r["label"]: r["score"] for r in result}["P"] for result in results])
    calibrated, raw = scores[0], scores[1]
    assert abs(raw.mean().item() - share) > 0.1  # the class weights took the prior out
    assert calibrated.mean().item() == pytest.approx(share, abs=0.05)
    as_logits = {k: torch.stack([torch.zeros_like(v), torch.logit(v.double())], 1) for k, v in scores.items()}
    assert calibration.ece(as_logits[0], labels) < calibration.ece(as_logits[1], labels)
    assert AutoConfig.from_pretrained(tmp_path / "model0").calibration_offsets["J-P"]["J"] == 0.0
