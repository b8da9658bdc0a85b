"""LoRA: adapters on a frozen base, small checkpoints, exact reloads, and exports that pipeline loads."""

import csv
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, fit_demo
from fake_hub import FakeHfApi
from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline

from mbti_lightning import folding
from mbti_lightning.cli import cli_main
from mbti_lightning.export import main as export_main
from mbti_lightning.model import MBTIClassifier
from mbti_lightning.tokenizer import load_tokenizer

TEXTS = ["i made a list and a schedule for the whole week", "whatever lol lets just improvise", "the the the"]
# The demo base is random, not pretrained: its frozen embeddings know no words, so they get adapters
# too (on a pretrained base such as Phi-3, `all-linear` is the usual choice).
LORA = "{r: 8, lora_alpha: 16, lora_dropout: 0.0, target_modules: [embed_tokens, qkv_proj, o_proj, gate_up_proj, down_proj]}"


def demo_fit(run: Path, *args: str) -> Path:
    # The demo folder's saved weights stand in for a pretrained base (from_scratch false).
    return fit_demo(
        run, "--model.from_scratch", "false", "--trainer.max_epochs", "1", "--trainer.val_check_interval", "50", *args
    )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return demo_fit(tmp_path_factory.mktemp("lora"), "--model.peft", LORA, "--model.learning_rate", "3e-3")


@pytest.mark.slow
def test_lora_learns_and_its_checkpoint_is_small(lora_run, tmp_path):
    (log,) = (lora_run.parents[1] / "logs/demo").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(log.open()))
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the loss falls
    assert max(float(r["val/mcc"]) for r in rows if r["val/mcc"]) >= 0.3

    full = demo_fit(tmp_path, "--trainer.max_steps", "2")  # full fine-tuning of the same base
    assert (lora_run / "last.ckpt").stat().st_size < (full / "last.ckpt").stat().st_size / 3
    saved = torch.load(lora_run / "last.ckpt", weights_only=False)["state_dict"]
    assert any("lora_A" in k for k in saved) and any("score" in k for k in saved)  # the head is saved
    assert not any("base_layer" in k or "layernorm" in k for k in saved)  # the frozen base is not


@pytest.mark.slow
def test_lora_reload_gives_identical_logits_and_both_exports_match_pipeline(lora_run, tmp_path):
    model = MBTIClassifier.load_from_checkpoint(lora_run / "last.ckpt", weights_only=False).eval()
    tokenizer = load_tokenizer("demo")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad(), folding.head_inputs(model.model) as inputs:
        logits = model(**batch)
        again = MBTIClassifier.load_from_checkpoint(lora_run / "last.ckpt", weights_only=False).eval()(**batch)
    assert torch.equal(logits, again)
    assert not torch.allclose(logits[0], logits[1])  # texts are told apart: the head is not a fresh one

    for how in ([], ["--adapter"]):
        out = tmp_path / f"export{len(how)}"
        export_main(["--ckpt", str(lora_run / "last.ckpt"), "--out", str(out), *how])
        assert (out / "adapter_config.json").exists() == bool(how)
        if how:  # the base from adapter_config.json, the adapters and head on top, the labels from the folder
            config = AutoConfig.from_pretrained(out / "classifier_config")
            model_or_path = AutoModelForSequenceClassification.from_pretrained(out, config=config)
        else:  # the calibration folded into the head: J's row divided by T, P's with its offset on top
            config, model_or_path = AutoConfig.from_pretrained(out), str(out)
            head = folding.classification_head(model.model).weight
            folded = AutoModelForSequenceClassification.from_pretrained(out).score.weight.detach()
            assert torch.allclose(folded[0], head[0] / config.calibration_temperatures["J-P"], atol=1e-6)
            expected = (inputs[0] @ folded.T).softmax(-1)
        classifier = pipeline("text-classification", model=model_or_path, tokenizer=str(out), top_k=None)
        for text, probs in zip(TEXTS, expected):
            scores = {d["label"]: d["score"] for d in classifier([text])[0]}
            assert scores == pytest.approx({"J": probs[0].item(), "P": probs[1].item()}, abs=1e-5), how


@pytest.mark.slow
def test_a_merged_push_after_an_adapter_push_leaves_no_adapter_on_the_hub(lora_run, tmp_path, monkeypatch):
    """With the adapter's files left on the Hub, transformers (with peft installed) would load the base plus
    the old adapter and ignore the new merged weights."""
    monkeypatch.setattr("mbti_lightning.export.HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    FakeHfApi.reset()
    for how in (["--adapter"], []):
        out = tmp_path / f"export{len(how)}"
        export_main(["--ckpt", str(lora_run / "last.ckpt"), "--out", str(out), "--push-to-hub", "me/m", *how])
        local = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
        assert FakeHfApi.repos["me/m"]["files"] == local | {".gitattributes"}, how
    assert "adapter_config.json" not in FakeHfApi.repos["me/m"]["files"]


@pytest.mark.slow
def test_an_adapter_only_checkpoint_resumes(lora_run, monkeypatch):
    monkeypatch.chdir(lora_run.parents[1])
    monkeypatch.setattr(sys, "argv", ["mbti-lightning"])
    cli = cli_main(
        [
            "fit",
            "--config",
            str(REPO / "configs/demo.yaml"),
            "--model.from_scratch",
            "false",
            "--model.peft",
            LORA,
            "--trainer.max_steps",
            "210",
            "--trainer.val_check_interval",
            "50",
            "--ckpt_path",
            str(lora_run / "last.ckpt"),
        ]
    )
    assert cli.trainer.global_step == 210  # 10 steps on top of the 200 saved, optimizer state and all


def test_qlora_needs_a_gpu_an_adapter_and_weights_to_load():
    with pytest.raises(ValueError, match="model.quantize needs model.peft"):
        MBTIClassifier(model_name_or_path="demo", quantize="nf4")
    with pytest.raises(ValueError, match="model.quantize needs model.from_scratch false"):
        MBTIClassifier(model_name_or_path="demo", quantize="nf4", peft={}, from_scratch=True)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="nf4 needs a CUDA GPU"):
            MBTIClassifier(model_name_or_path="demo", quantize="nf4", peft={}).configure_model()


def test_a_misspelt_lora_setting_is_named():
    with pytest.raises(ValueError, match="model.peft: .*'rank'"):
        MBTIClassifier(model_name_or_path="demo", peft={"rank": 8}).configure_model()


@pytest.mark.slow
def test_an_adapter_export_runs_through_the_projects_commands_as_the_merged_one(lora_run, tmp_path, monkeypatch):
    """`--adapter` folders load as exports do (`loading`): predict gives the merged export's answers."""
    for how in ([], ["--adapter"]):
        export_main(["--ckpt", str(lora_run / "last.ckpt"), "--out", str(tmp_path / f"export{len(how)}"), *how])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mbti-lightning"])
    Path("texts.txt").write_text("\n".join(TEXTS) + "\n")
    for name in ("export0", "export1"):
        predict = ["predict", "--config", str(REPO / "configs/demo.yaml"), "--data.predict_file", "texts.txt"]
        cli_main([*predict, "--ckpt_path", name, "--predictions.output", f"{name}.csv"])
    merged, adapter = (list(csv.DictReader(open(f"{name}.csv"))) for name in ("export0", "export1"))
    assert [r["J-P"] for r in adapter] == [r["J-P"] for r in merged]
    assert [float(r["J-P_prob"]) for r in adapter] == pytest.approx([float(r["J-P_prob"]) for r in merged], abs=2e-4)
