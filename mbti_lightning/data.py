"""The data module: load MBTI data, encode labels, make the seed's splits, tokenize once, batch."""

from __future__ import annotations

import logging
import math
import os
from typing import Literal

import lightning as L
import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from datasets.fingerprint import Hasher
from datasets.utils.stratify import stratified_shuffle_split_generate_indices
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from mbti_lightning import demo
from mbti_lightning.cache import build_atomically, cache_root
from mbti_lightning.labels import AXES, check_axis, label2id, parse_letter, type_to_id
from mbti_lightning.sampling import LengthGroupedSampler
from mbti_lightning.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

#: Bump when preprocessing changes in a way that makes older cached splits wrong.
CACHE_VERSION = "2"


def stratified_split(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`Dataset.train_test_split(test_size, stratify_by_column=..., seed)` on class ids `y`, as indices.

    The same sizes, generator and stratification routine as datasets uses, without its reading the
    label column one row at a time (minutes at 2.3M rows).
    """
    n_test = math.ceil(test_size * len(y))
    return next(stratified_shuffle_split_generate_indices(y, len(y) - n_test, n_test, np.random.default_rng(seed)))


def seed_split(
    strata: list, keep_fraction: float, keep_seed: int, val_fraction: float, val_seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seed recipe's two stratified splits, as row numbers: (train, validation, discarded).

    The seed class-encodes the type column (ids follow the sorted values), keeps the `test` part of
    ``train_test_split(test_size=keep_fraction, stratify_by_column=..., seed=keep_seed)`` and splits
    that again with `val_fraction` / `val_seed`. The same splits on the class ids alone give the same
    rows without touching, let alone tokenizing, the text; a test compares them with the seed's calls.
    """
    y = np.unique(np.asarray(strata, dtype=str), return_inverse=True)[1]
    if keep_fraction < 1:
        discarded, kept = stratified_split(y, keep_fraction, keep_seed)
    else:
        discarded, kept = np.array([], dtype=np.int64), np.arange(len(y))
    train, val = stratified_split(y[kept], val_fraction, val_seed)
    return kept[train], kept[val], discarded


def _tokenize(batch: dict, tokenizer: PreTrainedTokenizerBase, column: str, max_length: int) -> dict:
    ids = tokenizer(batch[column], truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids, "length": [len(x) for x in ids]}


class _Rows(torch.utils.data.Dataset):
    """A tokenized split read a whole batch at a time; each batch also carries its row numbers."""

    def __init__(self, split: Dataset) -> None:
        self.split = split.select_columns(["input_ids", "labels"])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, rows: list[int]) -> dict[str, list]:
        return {**self.split[rows], "row": rows}


class Collator:
    """Dynamic right padding (to a multiple of `pad_to_multiple_of`), plus the batch's real token count."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None) -> None:
        self.pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, rows: dict[str, list]) -> dict:
        batch = self.pad(rows)
        batch["num_tokens"] = int(batch["attention_mask"].sum())  # a Python int: no GPU sync to read it
        return batch


class MBTIDataModule(L.LightningDataModule):
    """MBTI posts -> tokenized train / validation / test splits for one axis.

    `test` (and `predict`) use rows that the seed split discards: as many as the validation split
    has, never seen in training or model selection. Training batches group rows of similar length
    (see `LengthGroupedSampler`) unless `group_by_length` is false; evaluation batches are sorted by
    length and carry their row numbers (`batch["row"]`) so predictions can be put back in order. Splits are tokenized once and cached under
    ``$MBTI_LIGHTNING_CACHE/tokenized`` (default ``~/.cache/mbti_lightning``), keyed by the data,
    the tokenizer and every setting below that changes them.

    Args:
        dataset: Hugging Face dataset id, a builder name (``csv``, ``json``, ``parquet``) used with
            `data_files`, or ``demo`` for the generated offline corpus.
        data_files: Path, glob, list or ``{split: path}`` mapping for local files.
        dataset_split: Which split of `dataset` to read.
        text_column: Column with the text.
        type_column: Column with the 4-letter type (any case), or null when `axis_columns` is used.
        author_column: Column with the author id, or null.
        axis_columns: ``{axis: column}`` for data with one letter column per axis and no type column.
        target: The axis to classify: ``E-I``, ``N-S``, ``F-T`` or ``J-P``.
        split: ``seed`` = the seed recipe's two stratified splits, exactly.
        keep_fraction: Share of all rows kept (the seed keeps 10%); the rest is discarded.
        keep_seed: Seed of the first split.
        val_fraction: Share of the kept rows used for validation.
        val_seed: Seed of the second split.
        tokenizer: Tokenizer name or path; the CLI links it to ``model.model_name_or_path``.
        max_length: Texts are truncated to this many tokens.
        pad_to_multiple_of: Pad each batch to a multiple of this (tensor-core friendly), or null.
        group_by_length: Build training batches from rows of similar length (less padding); false
            gives plain random batches, as the seed's Trainer did.
        batch_size: Training micro-batch size.
        eval_batch_size: Batch size for validation, test and predict; defaults to `batch_size`.
        num_workers: DataLoader worker processes.
        preprocessing_workers: Processes that tokenize; null = one per CPU core (at most 8) when
            more than 50,000 rows are kept, else one.
        seed: Seed of the training shuffle.
    """

    def __init__(
        self,
        dataset: str = "minhaozhang/mbti",
        data_files: str | list[str] | dict[str, str] | None = None,
        dataset_split: str = "train",
        text_column: str = "body",
        type_column: str | None = "mbti",
        author_column: str | None = "author",
        axis_columns: dict[str, str] | None = None,
        target: str = "J-P",
        split: Literal["seed"] = "seed",
        keep_fraction: float = 0.1,
        keep_seed: int = 0,
        val_fraction: float = 0.2,
        val_seed: int = 1,
        tokenizer: str = "microsoft/Phi-3-mini-4k-instruct",
        max_length: int = 512,
        pad_to_multiple_of: int | None = 8,
        group_by_length: bool = True,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        preprocessing_workers: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_axis(target)
        if max_length <= 0:
            raise ValueError(f"data.max_length must be positive, got {max_length}")
        if not 0 < keep_fraction <= 1 or not 0 < val_fraction < 1:
            raise ValueError(
                f"data.keep_fraction must be in (0, 1] and data.val_fraction in (0, 1), "
                f"got {keep_fraction} and {val_fraction}"
            )
        if type_column is None and target not in (axis_columns or {}):
            raise ValueError(f"without data.type_column, data.axis_columns must name the column for {target}")
        self.save_hyperparameters()
        self.tokenizer = None
        self.splits: DatasetDict | None = None

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(AXES[self.hparams.target]))

    def prepare_data(self) -> None:
        # Downloads (or generates) once per node; setup() then reads from the local cache.
        self._load_raw()
        load_tokenizer(self.hparams.tokenizer)

    def setup(self, stage: str) -> None:
        if self.splits is not None:
            return
        self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        raw = self._load_raw()
        key = Hasher.hash([CACHE_VERSION, raw._fingerprint, Hasher.hash(self.tokenizer), self._preprocessing_args()])
        path = build_atomically(cache_root() / "tokenized" / key, lambda tmp: self._preprocess(raw).save_to_disk(tmp))
        self.splits = load_from_disk(str(path))
        log.info("tokenized splits from %s: %s", path, {k: len(v) for k, v in self.splits.items()})

    def _preprocessing_args(self) -> dict:
        names = ("dataset", "data_files", "dataset_split", "text_column", "type_column", "axis_columns", "target",
                 "split", "keep_fraction", "keep_seed", "val_fraction", "val_seed", "max_length")  # fmt: skip
        return {name: self.hparams[name] for name in names}

    def _load_raw(self) -> Dataset:
        hp = self.hparams
        if hp.dataset == demo.DEMO:
            raw = load_dataset("parquet", data_files=str(demo.corpus_path()), split="train")
        else:
            raw = load_dataset(hp.dataset, data_files=hp.data_files, split=hp.dataset_split)
        label_column = hp.type_column or hp.axis_columns[hp.target]
        for column in (hp.text_column, label_column):
            if column not in raw.column_names:
                raise ValueError(
                    f"column {column!r} not found in {hp.dataset} {hp.data_files or ''}; "
                    f"it has {raw.column_names}. Set data.text_column / data.type_column / data.axis_columns."
                )
        return raw

    def _labels(self, values: list) -> np.ndarray:
        """Class ids of the target axis for every row, from the type column or the axis's letter column."""
        hp = self.hparams
        column = hp.type_column or hp.axis_columns[hp.target]
        to_id = label2id(hp.target)
        labels = np.empty(len(values), dtype=np.int64)
        for row, value in enumerate(values):
            try:
                labels[row] = (
                    type_to_id(value, hp.target) if hp.type_column else to_id[parse_letter(value, hp.target)]
                )
            except ValueError as err:
                raise ValueError(f"row {row} of {hp.dataset} {hp.data_files or ''}, column {column!r}: {err}") from None
        return labels

    def _preprocess(self, raw: Dataset) -> DatasetDict:
        hp = self.hparams
        strata = raw[hp.type_column or hp.axis_columns[hp.target]][:]
        labels = self._labels(strata)
        train, val, discarded = seed_split(strata, hp.keep_fraction, hp.keep_seed, hp.val_fraction, hp.val_seed)
        rows = {"train": train, "validation": val, "test": discarded[: len(val)]}

        workers = hp.preprocessing_workers
        if workers is None:
            workers = min(os.cpu_count() or 1, 8) if len(train) + len(val) > 50_000 else 1
        # Only the tokenizer travels to worker processes, never the module (or its trainer).
        tokenize_args = {"tokenizer": self.tokenizer, "column": hp.text_column, "max_length": hp.max_length}

        return DatasetDict(
            {
                name: raw.select(idx)
                .select_columns([hp.text_column])
                .add_column("labels", labels[idx].tolist())
                .map(_tokenize, batched=True, remove_columns=[hp.text_column], desc=f"tokenizing {name}",
                     num_proc=workers if workers > 1 else None, fn_kwargs=tokenize_args)
                for name, idx in rows.items()
                if len(idx)
            }
        )

    def train_label_counts(self) -> torch.Tensor:
        """How many training rows each class has, in class-id order."""
        labels = self.splits["train"].with_format("numpy")["labels"]
        return torch.as_tensor(np.bincount(labels, minlength=len(self.id2label)))

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        hp = self.hparams
        sampler = LengthGroupedSampler(
            self.splits[split]["length"][:],
            batch_size=hp.batch_size if shuffle else hp.eval_batch_size or hp.batch_size,
            shuffle=shuffle,
            seed=hp.seed,
            megabatch=50 if hp.group_by_length else 0,
            num_replicas=self.trainer.world_size if self.trainer else 1,
            rank=self.trainer.global_rank if self.trainer else 0,
        )
        return DataLoader(
            _Rows(self.splits[split]),
            sampler=sampler,
            batch_size=None,  # the sampler yields whole batches
            collate_fn=Collator(self.tokenizer, hp.pad_to_multiple_of),
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
