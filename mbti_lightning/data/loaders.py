"""Batches: rows read a whole batch at a time, dynamic padding, a training loader that can resume, and where
validation falls in an epoch of them."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from mbti_lightning.sampling import PADDING


class _Rows(torch.utils.data.Dataset):
    """A tokenized split read a whole batch at a time; each batch also carries its row numbers."""

    def __init__(self, split: Dataset) -> None:
        self.split = split.select_columns(["input_ids", "labels", "author"])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, rows: list[int]) -> dict[str, list]:
        return {**self.split[[row if row >= 0 else PADDING - row for row in rows]], "row": rows}


class _FeatureRows(_Rows):
    """A split's rows as a frozen backbone's features (`features.cached`) with their labels and authors, read a
    whole batch at a time, ready to use (no padding: a feature row is as wide as any other)."""

    def __init__(self, split: Dataset, features: np.ndarray) -> None:
        self.split = split.select_columns(["labels", "author"])
        self.features = features

    def __getitem__(self, rows: list[int]) -> dict:
        read = [row if row >= 0 else PADDING - row for row in rows]
        part = self.split[read]
        return {
            "features": torch.from_numpy(np.ascontiguousarray(self.features[read])),
            "labels": torch.tensor(part["labels"]),
            "author": torch.tensor(part["author"]),
            "row": torch.tensor(rows),
            "num_tokens": 0,  # no tokens are read
            "padded": min(rows) < 0,
        }


class Collator:
    """Dynamic right padding (to a multiple of `pad_to_multiple_of`), plus the batch's real token count."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None) -> None:
        self.pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, rows: dict[str, list]) -> dict:
        batch = self.pad(rows)
        batch["num_tokens"] = int(batch["attention_mask"].sum())  # a Python int: no GPU sync to read it
        batch["padded"] = min(rows["row"]) < 0  # holds copies that only keep ranks in step (sampling.PADDING)
        return batch


class _ResumableLoader(DataLoader):
    """The training loader, whose state says how far into its epoch training got.

    The count comes from the trainer's progress, not from this loader, which runs ahead by the
    batches that are prefetched. The data module saves and restores this state (see
    `MBTIDataModule.load_state_dict`); that the loader has it also tells Lightning it can resume.
    """

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": self._batches_done()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["batches_done"])


def validate_where_training_reaches(trainer: L.Trainer, batches: int) -> None:
    """A `trainer.val_check_interval` (in batches) longer than an epoch of `batches` makes Lightning stop, and
    one longer than a `trainer.max_steps` run never validates (no best checkpoint); a shipped config with a
    user's smaller file or shorter run must still run and validate, so validation moves to the run's last batch
    or to each epoch's end."""
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    interval, per_epoch = trainer.val_check_interval, trainer.check_val_every_n_epoch is not None
    if not isinstance(interval, int) or batches == 0:
        return
    run = trainer.max_steps * trainer.accumulate_grad_batches
    if interval > run > 0 and (run <= batches or not per_epoch):
        rank_zero_warn(
            f"trainer.val_check_interval ({interval}) is longer than the run (trainer.max_steps "
            f"{trainer.max_steps}, {run} training batches); validating after its last batch instead"
        )
        trainer.val_check_interval = run
    elif interval > batches and per_epoch:
        rank_zero_warn(
            f"trainer.val_check_interval ({interval}) is longer than an epoch ({batches} training batches); "
            "validating at the end of each epoch instead"
        )
        trainer.val_check_interval = 1.0
