"""The progress bar and the throughput log, both of which read the GPU only at logging steps.

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
from lightning.pytorch.callbacks import RichProgressBar


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

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if trainer.training and _logging_now(trainer) and "train/loss" in trainer.callback_metrics:
            self._loss = float(trainer.callback_metrics["train/loss"])
        shown = super().get_metrics(trainer, pl_module)
        shown.pop("v_num", None)  # the logger's version, which Rich's bar would print as "0.000"
        return shown if self._loss is None else {**shown, "train/loss": self._loss}


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
