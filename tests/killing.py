"""Callbacks that kill the training process on purpose, for the kill-and-resume tests (run in subprocesses)."""

import io
import os
import signal

import torch
from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """SIGKILL the process right after optimizer step `step`: no cleanup, no final checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillWhileSaving(Callback):
    """SIGKILL the process halfway through writing its `save`-th checkpoint file."""

    def __init__(self, save: int) -> None:
        self.save = save

    def setup(self, trainer, pl_module, stage: str) -> None:
        real_save, saves = torch.save, 0

        def save_and_die(obj, f, *args, **kwargs):
            nonlocal saves
            saves += 1
            if saves < self.save:
                return real_save(obj, f, *args, **kwargs)
            data = io.BytesIO()
            real_save(obj, data, *args, **kwargs)
            f.write(data.getvalue()[: len(data.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_and_die


class KillDuringFeatures(Callback):
    """SIGKILL the process in a frozen fit's feature pass, after its `after`-th batch, its progress saved after
    every batch."""

    def __init__(self, after: int) -> None:
        self.after = after

    def setup(self, trainer, pl_module, stage: str) -> None:  # before the model is built and the pass runs
        from mbti_lightning import features

        pooled, calls = features.pooled, [0]
        features.SAVE_EVERY = 0.0

        def pooled_and_die(*args, **kwargs):
            if calls[0] == self.after:
                os.kill(os.getpid(), signal.SIGKILL)
            calls[0] += 1
            return pooled(*args, **kwargs)

        features.pooled = pooled_and_die
