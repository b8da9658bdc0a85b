import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO
from lightning.pytorch.callbacks import ModelCheckpoint

from mbti_lightning.data import MBTIDataModule
from mbti_lightning.loading import hyperparameters, read_checkpoint
from mbti_lightning.model import MBTIClassifier


class NaNAtStep(MBTIClassifier):
    """Produces a NaN loss in the first batch of optimizer step `bad_step`."""

    bad_step = 3

    def forward(self, input_ids, attention_mask):
        logits = super().forward(input_ids, attention_mask)
        return logits * float("nan") if self.training and self.global_step == self.bad_step else logits


def fit(tmp_path, **model_kwargs):
    L.seed_everything(0)
    dm = MBTIDataModule(dataset="demo", tokenizer="demo", keep_fraction=0.1, batch_size=16, num_workers=0)
    model = NaNAtStep(model_name_or_path="demo", from_scratch=True, learning_rate=1e-3, **model_kwargs)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint],
    )
    trainer.fit(model, dm)
    return trainer


def test_nonfinite_loss_stops_with_step_and_batch_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="training loss is nan at optimizer step 3, batch 3 of epoch 0"):
        fit(tmp_path)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2  # the last good save, not overwritten on the way out
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_nonfinite_batches_can_be_skipped_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="skipping a batch with training loss nan at optimizer step 3"):
        trainer = fit(tmp_path, skip_nonfinite_batches=1)
    assert trainer.global_step == 6 and trainer.lightning_module._skipped == 1
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def run_cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m mbti_lightning ...` in `cwd`, with this folder importable for the killing and probing callbacks."""
    env = os.environ | (env or {}) | {"PYTHONPATH": str(REPO / "tests")}
    return subprocess.run(
        [sys.executable, "-m", "mbti_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def logged(run: Path, version: int) -> list[dict[str, str]]:
    return list(csv.DictReader((run / f"logs/demo/version_{version}/metrics.csv").open()))


# 1,280 training rows in batches of 32: 40 steps an epoch, 80 in all.
SHORT_DEMO = [
    "--config",
    str(REPO / "configs/demo.yaml"),
    "--data.keep_fraction",
    "0.1",
    "--trainer.max_epochs",
    "2",
    "--trainer.val_check_interval",
    "20",
    "--checkpoint.every_n_train_steps",
    "10",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict[str, str]]:
    whole = tmp_path_factory.mktemp("whole")
    assert run_cli(whole, "fit", *SHORT_DEMO).returncode == 0
    return logged(whole, 0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill_after", "saved_step", "saved_epoch"),
    [(55, 50, 1), (45, 40, 0)],  # a kill inside the first epoch is the easier case of the second's
    ids=["second epoch", "on the epoch boundary"],
)
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(
    tmp_path, uninterrupted, kill_after, saved_step, saved_epoch
):
    """Resume is exact from any step of any epoch. (It held in the first epoch only: Lightning makes the resumed
    fit's iterator before it sets the sampler's epoch, so a later epoch restarted in the first one's order.)"""
    step = f"--trainer.callbacks.step={kill_after}"
    died = run_cli(tmp_path, "fit", *SHORT_DEMO, "--trainer.callbacks+=killing.KillAtStep", step)
    assert died.returncode == -signal.SIGKILL
    last = tmp_path / "checkpoints/demo/last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert (saved["global_step"], saved["epoch"]) == (saved_step, saved_epoch)
    assert saved["optimizer_states"][0]["state"]  # bitsandbytes' 8-bit state travels with it

    resumed = run_cli(tmp_path, "fit", *SHORT_DEMO, "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr
    got = logged(tmp_path, 1)
    assert min(int(r["step"]) for r in got) > saved_step  # continued from there, not from the start
    train = {r["step"]: float(r["train/loss"]) for r in uninterrupted if r["train/loss"]}
    resumed_train = {r["step"]: float(r["train/loss"]) for r in got if r["train/loss"]}
    assert resumed_train == pytest.approx({s: train[s] for s in resumed_train}, abs=1e-4)
    validations = [r for r in uninterrupted if r["val/mcc"] and int(r["step"]) > saved_step]
    resumed_validations = [r for r in got if r["val/mcc"]]
    assert [r["step"] for r in resumed_validations] == [r["step"] for r in validations] and validations
    for expected, result in zip(validations, resumed_validations):
        for key in ("val/loss", "val/mcc", "val/acc", "val/author/mcc"):
            assert float(result[key]) == pytest.approx(float(expected[key]), abs=1e-4), (key, result["step"])


@pytest.mark.slow
def test_a_kill_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    died = run_cli(
        tmp_path,
        "fit",
        *SHORT_DEMO,
        "--trainer.max_epochs",
        "1",
        "--trainer.callbacks+=killing.KillWhileSaving",
        "--trainer.callbacks.save=3",
    )
    assert died.returncode == -signal.SIGKILL
    saved = torch.load(tmp_path / "checkpoints/demo/last.ckpt", weights_only=False)
    assert saved["global_step"] in (10, 20) and saved["state_dict"]


def test_a_checkpoint_for_another_axis_is_refused(tmp_path):
    trainer = fit(tmp_path, skip_nonfinite_batches=1)
    model = MBTIClassifier(model_name_or_path="demo", from_scratch=True, target="E-I")
    dm = MBTIDataModule(dataset="demo", tokenizer="demo", target="E-I", keep_fraction=0.1, num_workers=0)
    with pytest.raises(ValueError, match="the checkpoint predicts J-P but this run.s target is E-I"):
        L.Trainer(accelerator="cpu", logger=False).validate(
            model, dm, ckpt_path=trainer.checkpoint_callback.last_model_path
        )


@pytest.mark.slow
def test_ddp_with_two_processes_syncs_metrics_and_writes_one_checkpoint(tmp_path, monkeypatch):
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    fit_run = run_cli(tmp_path, "fit", *SHORT_DEMO, *ddp, "--trainer.max_epochs", "1")
    assert fit_run.returncode == 0, fit_run.stderr[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints/demo").iterdir())
    assert len(checkpoints) == 2 and checkpoints[1] == "last.ckpt"  # the best and the last, once, not per rank
    assert torch.load(tmp_path / "checkpoints/demo/last.ckpt", weights_only=False)["global_step"] == 20

    for _version, devices in ((1, ddp), (2, [])):
        ran = run_cli(tmp_path, "validate", *SHORT_DEMO, *devices, "--ckpt_path", "checkpoints/demo/last.ckpt")
        assert ran.returncode == 0, ran.stderr[-3000:]
    two, one = logged(tmp_path, 1)[-1], logged(tmp_path, 2)[-1]
    assert float(one["val/author/count"]) > 100
    for key in (
        "val/loss",
        "val/mcc",
        "val/acc",
        "val/macro_f1",
        "val/author/mcc",
        "val/author/count",
        "val/majority_acc",
        "val/ece",
    ):
        assert float(two[key]) == pytest.approx(float(one[key]), abs=1e-5), key

    # Predictions: each rank predicts its share of the batches; the file holds every test row once, in order,
    # with the scores one process gives.
    ran = run_cli(tmp_path, "predict", *SHORT_DEMO, *ddp, "--ckpt_path", "checkpoints/demo/last.ckpt")
    assert ran.returncode == 0, ran.stderr[-3000:]
    two = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    monkeypatch.chdir(tmp_path)  # the run's data cache
    last = Path("checkpoints/demo/last.ckpt")
    dm = MBTIDataModule(**hyperparameters(read_checkpoint(last), "datamodule_hyper_parameters"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    model = MBTIClassifier.load_from_checkpoint(last)
    one = trainer.predict(model, dm)
    assert [row["id"] for row in two] == [str(row) for row in dm.predict_inputs["id"]]
    rows = torch.cat([batch["row"] for batch in one])  # batched by length
    assert len(two) > 100 and sorted(rows.tolist()) == list(range(len(two)))
    logits = torch.cat([batch["logits"]["J-P"] for batch in one])[rows.argsort()]
    prob_j = logits.float().softmax(-1)[:, model.heads["J-P"].index("J")]
    assert [float(r["J-P_prob"]) if r["J-P"] == "J" else 1 - float(r["J-P_prob"]) for r in two] == pytest.approx(
        prob_j.tolist(), abs=2e-4
    )


@pytest.mark.slow
def test_ddp_with_a_cold_cache_tokenizes_once(tmp_path):
    """Lightning runs prepare_data on one process per node while the others wait: the splits are
    tokenized there, once, and every rank reads them."""
    ran = run_cli(
        tmp_path,
        "fit",
        *SHORT_DEMO,
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.callbacks+=probes.CountTokenizing",
        f"--trainer.callbacks.out={tmp_path / 'builds'}",
        env={"MBTI_LIGHTNING_CACHE": str(tmp_path / "cold_cache")},
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert len((tmp_path / "builds").read_text().split()) == 1
    assert len(list((tmp_path / "cold_cache/tokenized").iterdir())) == 1
