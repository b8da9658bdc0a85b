"""Batches: rows read a whole batch at a time, dynamic padding, and a training loader that can resume."""

from __future__ import annotations

from collections.abc import Callable

import torch
from datasets import Dataset
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
