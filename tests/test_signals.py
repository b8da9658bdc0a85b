"""SIGTERM (a cluster's preemption) and SIGINT stop every batch command at once, non-zero, leaving no half output."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_seams import exported  # noqa: F401 (the fixture: a short fit on a Kaggle-shaped file, and its export)

from mbti_lightning import baseline
from mbti_lightning.cli import main
from mbti_lightning.export import main as export_main
from mbti_lightning.model import MBTIClassifier

TERM = 128 + signal.SIGTERM


@pytest.fixture(autouse=True)
def _handlers_restored():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def signal_at(monkeypatch, obj, name: str, call: int = 2, signum: int = signal.SIGTERM) -> None:
    """Send this process `signum` at the `call`-th call of `obj.name`: mid-run, wherever that is."""
    original, calls = getattr(obj, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)


def stopped(folder: Path, run, capsys) -> tuple[int, float]:
    """(exit status, seconds from the signal's call to the exit) of `run` in `folder`."""
    os.chdir(folder)
    start = time.perf_counter()
    try:
        with pytest.raises(SystemExit) as exited:
            run()
    finally:
        os.chdir(REPO)
    assert "stopped by SIG" in capsys.readouterr().err
    return exited.value.code, time.perf_counter() - start


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_report_stops_mid_run_and_leaves_no_report(exported, monkeypatch, capsys, signum):  # noqa: F811
    signal_at(monkeypatch, MBTIClassifier, "forward", call=3, signum=signum)
    out = exported["folder"] / f"report-stopped-{signum}"
    argv = ["report", *exported["args"], "--ckpt_path", str(exported["ckpt"]), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["mbti-lightning", *argv])
    code, _ = stopped(exported["folder"], main, capsys)
    assert code == 128 + signum and not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_the_export_stops_mid_run_and_leaves_the_old_folder_as_it_was(exported, monkeypatch, capsys):  # noqa: F811
    out = exported["folder"] / "export-stopped"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    signal_at(monkeypatch, MBTIClassifier, "forward", call=3)
    argv = ["--ckpt", str(exported["ckpt"]), "--out", str(out), "--overwrite"]
    code, _ = stopped(exported["folder"], lambda: export_main(argv), capsys)
    assert code == TERM and [p.name for p in out.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("command", ["fit", "predict", "explain", "baseline"])
def test_fit_predict_explain_and_baseline_stop_mid_run_and_write_nothing(exported, monkeypatch, capsys, command):  # noqa: F811
    folder, texts = exported["folder"], exported["folder"] / "texts.txt"
    texts.write_text("i plan everything\nwhatever lol\n" * 50)
    ckpt = ["--ckpt_path", str(exported["ckpt"])]
    argv = {
        "predict": ["predict", *exported["args"], *ckpt, "--data.predict_file", str(texts)]
        + ["--predictions.output", "stopped.csv"],
        "explain": ["explain", *exported["args"], *ckpt, "--data.predict_file", str(texts), "--out", "stopped"],
        "baseline": ["baseline", *exported["args"], "--trainer.logger.init_args.name", "stopped"],
        "fit": [
            "fit",
            *exported["args"],
            "--checkpoint.dirpath",
            "stopped",
            "--trainer.logger.init_args.name",
            "stopped",
        ],
    }[command]
    if command == "baseline":
        signal_at(monkeypatch, baseline, "split_labels", call=1)
    else:  # in fit, the third training batch (the sanity check runs first)
        signal_at(monkeypatch, MBTIClassifier, "forward", call=5 if command == "fit" else 1)
    monkeypatch.setattr(sys, "argv", ["mbti-lightning", *argv])
    code, _ = stopped(folder, main, capsys)
    assert code == TERM
    assert not (folder / "stopped.csv").exists() and not (folder / "stopped").exists()
    assert not list((folder / "logs").glob("stopped/*/metrics.csv"))


@pytest.mark.slow
def test_a_sigterm_from_outside_stops_predict_within_seconds(exported, tmp_path):  # noqa: F811
    """As a cluster sends it: another process, mid-run; the command exits within 10 s, non-zero, writing nothing."""
    texts = tmp_path / "many.txt"
    texts.write_text("i made a plan for the whole week and a list\n" * 200_000)
    out = tmp_path / "predictions.csv"
    argv = ["predict", *exported["args"], "--ckpt_path", str(exported["ckpt"]), "--data.predict_file", str(texts)]
    argv += ["--predictions.output", str(out), "--data.eval_batch_size", "64"]
    process = subprocess.Popen(
        [sys.executable, "-m", "mbti_lightning", *argv],
        cwd=exported["folder"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in process.stdout:  # the model is loaded and predicting begins
            if line.startswith("model: "):
                break
        time.sleep(2)
        assert process.poll() is None, "the command ended before the signal"
        sent = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
        seconds = time.perf_counter() - sent
    finally:
        process.kill()
        process.wait()
    rest = process.stdout.read()
    assert code == TERM and seconds < 10 and "stopped by SIGTERM" in rest
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
