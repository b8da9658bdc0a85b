"""The progress bar (or, without a terminal, progress lines) and the throughput log, which read the GPU only at
logging steps.

Reading a value from the GPU (``.item()``, ``torch.cuda.synchronize()``) makes the CPU wait until
every queued kernel has run, and the GPU then idles until the CPU has queued the next batch's
kernels. Lightning reads a loss logged for the progress bar after every batch, and its
``ThroughputMonitor`` synchronises after every batch, so the CPU could never run ahead of the GPU.
These two do the same work once per ``trainer.log_every_n_steps`` optimizer steps.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import _plugin_to_compute_dtype, get_available_flops
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn
from lightning.pytorch.utilities import rank_zero_only
from rich.progress import Task
from rich.text import Text


def _logging_now(trainer: L.Trainer) -> bool:
    """Whether the current training batch ends an optimizer step that the trainer logs.

    (Lightning has no public way to ask: these private names, like `_plugin_to_compute_dtype` above,
    are why pyproject.toml bounds lightning to 2.6; tests/test_private_apis.py checks they are there.)
    """
    return not trainer.fit_loop._should_accumulate() and trainer._logger_connector.should_update_logs


class ProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, showing ``train/loss`` as of the last logging step (and not the
    logger's version number).

    (A metric logged with ``prog_bar=True`` is read from the GPU after every batch, so the model logs
    ``train/loss`` without it and this bar reads it only when the trainer logs it.)
    """

    def __init__(self) -> None:
        super().__init__()
        self._loss: float | None = None

    def configure_columns(self, trainer: L.Trainer) -> list:
        # A finished task's speed is None in Rich, which Lightning's column printed as "0.00it/s" on the last line.
        return [*super().configure_columns(trainer)[:-1], Speed(style=self.theme.processing_speed)]

    def _get_train_description(self, current_epoch: int) -> str:
        # Under max_steps, Lightning's max_epochs is -1 and its bar read "Epoch 0/-2" (private: test_private_apis).
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if trainer.training and _logging_now(trainer) and "train/loss" in trainer.callback_metrics:
            self._loss = float(trainer.callback_metrics["train/loss"])
        shown = super().get_metrics(trainer, pl_module)
        shown.pop("v_num", None)  # the logger's version, which Rich's bar would print as "0.000"
        return shown if self._loss is None else {**shown, "train/loss": self._loss}


class Speed(ProcessingSpeedColumn):
    """Batches per second, and at the end the task's finished speed (Rich's `speed` is None once it is done)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed if task.finished else task.speed
        return Text(f"{speed or 0:>.2f}it/s", style=self.style)


class LogLines(LightningProgressBar):
    """Progress for a log file (stdout not a terminal: SLURM, ``nohup``, CI), where a live bar shows nothing: one
    line per logging step (``trainer.log_every_n_steps``) with the step, the epoch, ``train/loss`` and the rate,
    and one line per validation with its metrics."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._since = (0, time.perf_counter())  # (optimizer step, time) of the last line

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = (trainer.global_step, time.perf_counter())

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int
    ) -> None:
        if not self._enabled or not _logging_now(trainer):
            return
        step, now = trainer.global_step, time.perf_counter()
        rate = (step - self._since[0]) / max(now - self._since[1], 1e-9)
        self._since = (step, now)
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        loss = trainer.callback_metrics.get("train/loss")
        shown = f" train/loss {float(loss):.4f}" if loss is not None else ""
        print(f"epoch {trainer.current_epoch} step {step}/{total}{shown} {rate:.2f} steps/s", flush=True)

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        values = " ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items()))
        print(f"epoch {trainer.current_epoch} step {trainer.global_step} validation: {values}", flush=True)
        self._since = (trainer.global_step, time.perf_counter())  # validation time is not training's rate


class Throughput(L.Callback):
    """Logs training throughput per device at each logging step, averaged since the previous one.

    ``train/device/samples_per_sec``, ``train/device/items_per_sec`` (real, non-pad tokens/s),
    ``train/device/flops_per_sec`` (from the module's ``flops_per_batch``) and, on GPUs Lightning
    knows the peak of, ``train/device/mfu``. Validation time is left out.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.peak = get_available_flops(
            trainer.strategy.root_device, _plugin_to_compute_dtype(trainer.precision_plugin)
        )
        self._restart(trainer)

    def _restart(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.start, self.samples, self.tokens, self.flops = time.perf_counter(), 0, 0, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restart(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training:
            self._restart(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int
    ) -> None:
        self.samples += len(batch["labels"])
        self.tokens += batch["num_tokens"]
        self.flops += getattr(pl_module, "flops_per_batch", 0)
        if not _logging_now(trainer):
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.start
        metrics = {
            "samples_per_sec": self.samples / seconds,
            "items_per_sec": self.tokens / seconds,
            "flops_per_sec": self.flops / seconds,
        }
        if self.peak:
            metrics["mfu"] = metrics["flops_per_sec"] / self.peak
        pl_module.log_dict({f"train/device/{k}": float(v) for k, v in metrics.items()}, on_step=True, on_epoch=False)
        self._restart(trainer)
