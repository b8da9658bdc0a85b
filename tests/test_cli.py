import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, fit_demo

from mbti_lightning.cli import cli_main

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when sys.argv (pytest's) and args are both given."""
    monkeypatch.setattr(sys, "argv", ["mbti-lightning"])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "model_name_or_path:" in printed and "monitor: val/mcc" in printed


def test_every_config_says_how_to_run_it():
    for config in CONFIGS:
        header = config.read_text().split("\n\n")[0]
        assert header.startswith("#") and f"--config configs/{config.name}" in header, config.name


@pytest.mark.parametrize("enabled", [True, False])
def test_the_progress_bar_can_be_turned_off(enabled, tmp_path, monkeypatch):
    from mbti_lightning.callbacks import ProgressBar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: the live bar
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        ["--config", str(REPO / "configs/demo.yaml"), "--trainer.enable_progress_bar", str(enabled).lower()], run=False
    )
    assert any(isinstance(c, ProgressBar) for c in cli.trainer.callbacks) == enabled


def test_the_progress_bar_shows_the_loss_of_the_last_logging_step_and_no_version_number(tmp_path, monkeypatch):
    from mbti_lightning.callbacks import ProgressBar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        [
            "--config",
            str(REPO / "configs/demo.yaml"),
            "--trainer.max_steps",
            "12",
            "--trainer.log_every_n_steps",
            "5",
            "--trainer.limit_val_batches",
            "0",
            "--checkpoint.save_last",
            "false",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    (bar,) = [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]
    shown = bar.get_metrics(cli.trainer, cli.model)
    with open(tmp_path / "logs/demo/version_0/metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row["train/loss"]]
    assert [row["step"] for row in logged] == ["4", "9"]  # optimizer steps 5 and 10; 12 is not logged
    assert "v_num" not in shown and shown["train/loss"] == pytest.approx(float(logged[-1]["train/loss"]))


@pytest.mark.slow
def test_a_fit_writing_to_a_log_file_shows_a_line_per_logging_step_and_per_validation(tmp_path):
    """As under SLURM or nohup: stdout is a file, no terminal."""
    args = ["--trainer.max_steps", "30", "--trainer.log_every_n_steps", "10", "--trainer.val_check_interval", "15"]
    with open(tmp_path / "job.log", "w") as log:
        subprocess.run(
            [sys.executable, "-m", "mbti_lightning", "fit", "--config", str(REPO / "configs/demo.yaml"), *args],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=600,
            check=True,
        )
    text = (tmp_path / "job.log").read_text()
    steps = re.findall(r"^epoch 0 step (\d+)/30 train/loss (\d+\.\d+) (\d+\.\d+) steps/s$", text, re.M)
    assert [int(step) for step, _, _ in steps] == [10, 20, 30] and all(float(rate) > 0 for _, _, rate in steps)
    validations = re.findall(r"^epoch 0 step (\d+) validation: .*val/mcc (-?\d+\.\d+)", text, re.M)
    assert [int(step) for step, _ in validations] == [15, 30]


@pytest.mark.slow
def test_module_entry_point_shows_help_with_every_subcommand_under_the_programs_name():
    result = subprocess.run([sys.executable, "-m", "mbti_lightning", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: mbti-lightning ")
    assert all(name in result.stdout for name in ("fit", "validate", "report", "explain", "serve MODEL"))


def read_metrics(log_dir: Path) -> list[dict[str, str]]:
    (metrics,) = log_dir.glob("demo/version_*/metrics.csv")
    return list(csv.DictReader(metrics.open()))


@pytest.mark.slow
def test_demo_fit_learns_and_validate_reproduces_the_best_checkpoint(tmp_path, monkeypatch, caplog):
    """The README's demo: fit, then validate the best checkpoint (whose name the fit printed); same numbers as
    logged."""
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"):
        cli_main(["fit", "--config", str(REPO / "configs/demo.yaml")])

    rows = [row for row in read_metrics(tmp_path / "logs") if row["val/mcc"]]
    best = max(rows, key=lambda row: float(row["val/mcc"]))
    assert float(best["val/mcc"]) >= 0.4
    assert {"val/loss", "val/acc", "val/macro_f1", "val/bal_acc", "train/loss"} <= set(rows[0])
    assert all(0 < float(row["val/ece"]) < 0.5 for row in rows)  # calibration error at every validation
    # Throughput at every logging step (every 10 optimizer steps in the demo), not in between.
    speed = [row for row in read_metrics(tmp_path / "logs") if row["train/device/items_per_sec"]]
    assert [int(row["step"]) for row in speed[:3]] == [9, 19, 29]
    assert all(
        float(row["train/device/items_per_sec"]) > 10 * float(row["train/device/samples_per_sec"]) > 0 for row in speed
    )
    (ckpt,) = (tmp_path / "checkpoints/demo").glob("best-*.ckpt")
    assert (tmp_path / "checkpoints/demo/last.ckpt").exists()
    assert f"step{int(best['step']) + 1}-" in ckpt.name
    assert f"best checkpoint: {ckpt} (val/mcc {float(best['val/mcc']):.4f}); last: {ckpt.parent / 'last.ckpt'}" in (
        caplog.text
    )

    cli = cli_main(["validate", "--config", str(REPO / "configs/demo.yaml"), "--ckpt_path", str(ckpt)])
    for key in ("val/mcc", "val/acc", "val/macro_f1", "val/bal_acc", "val/loss"):
        assert cli.trainer.callback_metrics[key].item() == pytest.approx(float(best[key]), abs=1e-6), key


@pytest.mark.slow
def test_compiled_decoder_blocks_train_and_their_checkpoint_validates_the_same_without(tmp_path, monkeypatch):
    """`model.compile` compiles each decoder block once for all batch lengths (dynamic shapes); the
    checkpoint keeps the plain weight names, so it validates the same with compiling off. That takes
    `--model.compile false` on the command line: Lightning alone would put the checkpoint's `true` back."""
    import torch

    monkeypatch.chdir(tmp_path)
    demo, short = str(REPO / "configs/demo.yaml"), ["--trainer.limit_val_batches", "2"]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cli_main(
        [
            "fit",
            "--config",
            demo,
            "--model.compile",
            "true",
            "--trainer.max_steps",
            "6",
            "--trainer.val_check_interval",
            "6",
            *short,
        ]
    )
    assert 0 < torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4  # training and evaluation, not per length
    (logged,) = [row for row in read_metrics(tmp_path / "logs") if row["val/loss"]]

    torch._dynamo.utils.counters.clear()
    cli = cli_main(
        ["validate", "--config", demo, "--ckpt_path", "checkpoints/demo/last.ckpt", "--model.compile", "false", *short]
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    assert cli.trainer.callback_metrics["val/loss"].item() == pytest.approx(float(logged["val/loss"]), rel=1e-4)


def test_a_run_of_another_target_does_not_shadow_the_checkpoints_in_its_folder(tmp_path):
    quick = ["--data.keep_fraction", "0.05", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"]
    folder = fit_demo(tmp_path, *quick)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ValueError, match=r"holds checkpoints of a J-P model and this run predicts E-I, N-S, F-T, J-P"):
        fit_demo(tmp_path, *quick, "--data.target", "all")
    assert sorted(p.name for p in folder.iterdir()) == before
    fit_demo(tmp_path, *quick, "--data.target", "all", "--checkpoint.dirpath", "checkpoints/demo_all")
    assert (tmp_path / "checkpoints/demo_all/last.ckpt").is_file()


def test_predicting_leaves_no_log_folder_behind(tmp_path):
    ckpt = fit_demo(tmp_path, "--data.keep_fraction", "0.05", "--trainer.max_steps", "2") / "last.ckpt"
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "logs").rglob("*"))
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path)
    mp.setattr(sys, "argv", ["mbti-lightning"])
    try:
        for _ in range(2):
            cli_main(
                ["predict", "--config", str(REPO / "configs/demo.yaml"), "--data.keep_fraction", "0.05"]
                + ["--ckpt_path", str(ckpt), "--predictions.output", "p.csv"]
            )
    finally:
        mp.undo()
    assert (tmp_path / "p.csv").is_file()
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "logs").rglob("*")) == before
    assert not (tmp_path / "config.yaml").exists()


def test_a_run_shorter_than_the_validation_interval_validates_after_its_last_step(tmp_path):
    """The demo validates every 100 batches; a user's `--trainer.max_steps 6` run validates at step 6 instead of
    never (no best checkpoint), and says so."""
    with pytest.warns(UserWarning, match=r"val_check_interval \(100\) is longer than the run \(trainer.max_steps 6"):
        folder = fit_demo(tmp_path, "--data.keep_fraction", "0.2", "--trainer.max_steps", "6")
    assert [p.name.split("-mcc")[0] for p in folder.glob("best-*.ckpt")] == ["best-step6"]
