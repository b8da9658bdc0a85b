"""The LightningDataModule: MBTI data -> cleaned, labelled, split and tokenized splits -> batches.

The steps live beside it: `sources` (reading), `cleaning` (labels and dropped rows), `splits`,
`tokenized` (tokenizing and the cache) and `loaders` (batches).

Rows are read from the hub, local files or the demo corpus; `explode_separator` turns rows of
joined posts into one row per post. Rows with an empty text or an invalid label are dropped and
reported (or, with ``invalid_rows: error``, stop the run). Splits:

- ``seed``: the seed recipe's two stratified row splits, exactly. Test (and predict) take rows that
  split discards, as many as validation has: never seen in training or model selection.
- ``author``: the same fractions over authors instead of rows (stratified by each author's type),
  so no author has posts on both sides; see `author_split`.
- ``predefined``: the data set's own ``train``, ``validation`` (or ``valid``/``val``/``dev``) and
  ``test`` splits.

Types too rare to stratify are pooled by their target letters, with a warning (see
`splits.stratified_split`).

Training batches group rows of similar length (see `LengthGroupedSampler`) unless
`group_by_length` is false; evaluation batches are sorted by length and carry their row numbers
(`batch["row"]`) and author ids (`batch["author"]`). Splits are tokenized once and cached under
``$MBTI_LIGHTNING_CACHE/tokenized`` (default ``~/.cache/mbti_lightning``), keyed by the data,
the tokenizer and every setting of `MBTIDataModule` that changes them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from mbti_lightning.cache import build_atomically, cache_root
from mbti_lightning.data import splits, tokenized
from mbti_lightning.data.loaders import (
    Collator,
    _FeatureRows,
    _ResumableLoader,
    _Rows,
    validate_where_training_reaches,
)
from mbti_lightning.data.sources import load_raw, read_predict_file, where
from mbti_lightning.errors import UserError
from mbti_lightning.labels import AXES, check_axis, heads
from mbti_lightning.sampling import LengthGroupedSampler
from mbti_lightning.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


#: What to do where a split a command reads is missing, per `data.split`.
NO_SPLIT = {
    "seed": "its test rows are rows the seed split discards: set data.keep_fraction below 1",
    "author": "set data.test_fraction, or data.keep_fraction below 1",
    "predefined": "the data set has no such split",
}


def check_arguments(
    found_heads: dict,
    max_length: int,
    keep_fraction: float,
    val_fraction: float,
    test_fraction: float,
    type_column: str | None,
    axis_columns: dict[str, str] | None,
) -> None:
    """Stop on data settings that cannot work, naming them."""
    if max_length <= 0:
        raise UserError(f"data.max_length must be positive, got {max_length}")
    if not 0 < keep_fraction <= 1 or not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 - val_fraction:
        raise UserError(
            f"data.keep_fraction must be in (0, 1], data.val_fraction in (0, 1) and data.test_fraction in "
            f"[0, 1 - val_fraction), got {keep_fraction}, {val_fraction} and {test_fraction}"
        )
    for axis in axis_columns or {}:
        check_axis(axis)
    needed = list(AXES) if "mbti" in found_heads else list(found_heads)
    if type_column is None and set(needed) - set(axis_columns or {}):
        raise UserError(f"without data.type_column, data.axis_columns must name a column for each of {needed}")


class MBTIDataModule(L.LightningDataModule):
    """MBTI posts -> cleaned, labelled, split and tokenized train / validation / test splits (see the module's
    docstring for the splits, batches and cache).

    Args:
        dataset: Hugging Face dataset id, a builder name (``csv``, ``json`` for .json/.jsonl,
            ``parquet``) used with `data_files`, or ``demo`` for the generated offline corpus.
        data_files: Path, glob, list or ``{split: path}`` mapping for local files.
        dataset_split: Which split of `dataset` to read (all of them for ``split: predefined``).
        revision: The hub data set's revision (a commit hash, tag or branch) to read; pin it so that
            the data cannot change under a run (the export checks that the splits are the same).
        text_column: Column with the text.
        type_column: Column with the 4-letter type (any case), or null when `axis_columns` is used.
        author_column: Column with the author id. Null, or a column the data lacks, makes each source
            row its own author (with `explode_separator`: all posts of a row share an author).
        axis_columns: ``{axis: column}`` for data with one letter column per axis, e.g.
            ``{J-P: P/J}``; used when `type_column` is null.
        target: What to classify: an axis (``E-I``, ``N-S``, ``F-T``, ``J-P``), a list of axes or
            ``all`` (one binary head per axis), or ``mbti`` (one 16-way head over the types).
        split: ``seed``, ``author`` or ``predefined`` (see above).
        keep_fraction: Share of all rows (or authors) kept (the seed keeps 10%); the rest is discarded.
        keep_seed: Seed of the first split.
        val_fraction: Share of the kept rows (or authors) used for validation.
        val_seed: Seed of the second split.
        test_fraction: ``split: author`` only: share of the kept authors held out for testing
            (0.2 with `val_fraction` 0.2 gives the published 60/20/20). At 0, test takes discarded authors.
        explode_separator: Split each text on this string (Kaggle's ``|||``) into one row per post.
        mask_type_mentions: Replace type names, their x-variants (INxJ) and function abbreviations
            (Ni, Fe, ...) in the text with ``[MBTI]``; see `mbti_lightning.masking`.
        invalid_rows: ``drop`` rows with an empty text or an invalid label (with a warning that
            counts them and names some), or stop with an ``error``.
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
        predict_file: Texts for ``predict``: a .txt file (one text per line), or a .csv / .jsonl
            file with `text_column` (and optional ``id`` and `author_column` columns). Its texts are
            split with `explode_separator` and masked with `mask_type_mentions`, as in training.
            Without it, ``predict`` runs on the test split.
    """

    def __init__(
        self,
        dataset: str = "minhaozhang/mbti",
        data_files: str | list[str] | dict[str, str] | None = None,
        dataset_split: str = "train",
        revision: str | None = None,
        text_column: str = "body",
        type_column: str | None = "mbti",
        author_column: str | None = "author",
        axis_columns: dict[str, str] | None = None,
        target: str | list[str] = "J-P",
        split: Literal["seed", "author", "predefined"] = "seed",
        keep_fraction: float = 0.1,
        keep_seed: int = 0,
        val_fraction: float = 0.2,
        val_seed: int = 1,
        test_fraction: float = 0.0,
        explode_separator: str | None = None,
        mask_type_mentions: bool = False,
        invalid_rows: Literal["drop", "error"] = "drop",
        tokenizer: str = "microsoft/Phi-3-mini-4k-instruct",
        max_length: int = 512,
        pad_to_multiple_of: int | None = 8,
        group_by_length: bool = True,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        preprocessing_workers: int | None = None,
        seed: int = 0,
        predict_file: str | None = None,
    ) -> None:
        super().__init__()
        self.heads = heads(target)
        check_arguments(self.heads, max_length, keep_fraction, val_fraction, test_fraction, type_column, axis_columns)
        self.save_hyperparameters()
        self.tokenizer = None
        self.splits: DatasetDict | None = None
        self._train_loader: _ResumableLoader | None = None
        self._resume_at: dict[str, int] | None = None
        self.predict_rows: Dataset | None = None  # the tokenized predict_file
        self.predict_inputs: dict[str, list] = {}  # "id" and "text" of each predicted row, for the writer
        self.tokenized_key: str | None = None  # the tokenized splits' cache key (the data and how it is prepared)
        # Per split, a frozen backbone's features of its rows (`features.cached`): its batches then carry these.
        self.features: dict[str, np.ndarray] = {}

    def state_dict(self) -> dict[str, int]:
        """Where training is in its epoch, saved in every checkpoint."""
        return self._train_loader.state_dict() if self._train_loader else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Lightning restores the data module before it first builds the training loader, and may
        # build that loader (to count the steps of the schedule) before it restores its own loader
        # states, too late for the first iteration. So the skip is set up here. A strategy that restores
        # after its setup (FSDP2's) has built the loader already: the skip goes to it.
        if self._train_loader is not None and state:
            self._train_loader.load_state_dict(state)
        else:
            self._resume_at = state or None

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node while the others wait: the download (or the
        # demo's generation) and the tokenizing happen once per node, and setup() reads the cache.
        if not self.hparams.predict_file:
            self._tokenized_splits()
        load_tokenizer(self.hparams.tokenizer)

    def _tokenized_splits(self) -> Path:
        """The folder of the tokenized splits in the cache, built first if it is not there."""
        self.tokenizer = self.tokenizer or load_tokenizer(self.hparams.tokenizer)
        raw = load_raw(self.hparams)
        key = self.tokenized_key = tokenized.cache_key(raw, self.tokenizer, self.hparams)
        return build_atomically(cache_root() / "tokenized" / key, lambda tmp: self._build(raw, tmp))

    def _build(self, raw: Dataset | DatasetDict, out: os.PathLike) -> None:
        parts, messages = splits.split(raw, self.hparams, self.heads)
        tokenized.build(parts, messages, self.hparams, self.heads, self.tokenizer, out)

    def setup(self, stage: str) -> None:
        self.tokenizer = self.tokenizer or load_tokenizer(self.hparams.tokenizer)
        if stage == "predict" and self.hparams.predict_file:
            kwargs = tokenized.tokenize_kwargs(self.tokenizer, self.hparams)
            self.predict_rows, self.predict_inputs = read_predict_file(self.hparams, self.heads, kwargs)
            return
        if self.splits is not None:
            return
        path = self._tokenized_splits()  # prepare_data built it, unless it was not called (a data module on its own)
        self.splits = load_from_disk(str(path))
        for message in json.loads((path / "dropped.json").read_text()):
            rank_zero_warn(message)
        for name, part in self.splits.items():
            summary = f"{name}: {len(part)} rows, {len(np.unique(part['author'][:]))} authors"
            if "mentions" in part.column_names:
                mentions = np.asarray(part["mentions"][:])
                summary += f", type mentions masked in {np.count_nonzero(mentions)} rows ({mentions.sum()} mentions)"
            rank_zero_info(summary)
        log.info("tokenized splits from %s", path)

    def check_inputs(self, split: str | None) -> None:
        """A `UserError` where what a command reads is not there: the predict file, or `split` (after `setup`)."""
        hp = self.hparams
        if hp.predict_file and not Path(hp.predict_file).is_file():
            raise UserError(f"data.predict_file {hp.predict_file} not found")
        if split and split != "predict" and split not in (self.splits or {}):
            raise UserError(f"{where(hp)} has no {split} split with data.split {hp.split!r}; {NO_SPLIT[hp.split]}")

    def split_fingerprint(self) -> str:
        """A hash of which source rows are in which split, with their labels, authors and token counts: what the
        checkpoint records at fit time and the export checks, so that edited data cannot slip training rows
        into its figures."""
        columns = ("source_row", "labels", "author", "length")
        return Hasher.hash({name: [np.asarray(part[c][:]) for c in columns] for name, part in self.splits.items()})

    def train_label_counts(self) -> list[torch.Tensor]:
        """How many training rows each class has, per head, in class-id order."""
        labels = np.asarray(self.splits["train"]["labels"][:]).reshape(len(self.splits["train"]), -1)
        return [
            torch.as_tensor(np.bincount(labels[:, h], minlength=len(classes)))
            for h, classes in enumerate(self.heads.values())
        ]

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        hp = self.hparams
        rows = self.predict_rows if split == "predict" else self.splits.get(split)
        if rows is None:
            self.check_inputs(split)
        sampler = LengthGroupedSampler(
            rows["length"][:],
            batch_size=hp.batch_size if train else hp.eval_batch_size or hp.batch_size,
            shuffle=train,
            seed=hp.seed,
            megabatch=50 if hp.group_by_length else 0,
            num_replicas=self.trainer.world_size if self.trainer else 1,
            rank=self.trainer.global_rank if self.trainer else 0,
        )
        # Page-locked batches go to the GPU asynchronously (Lightning copies with non_blocking); from
        # pageable memory the driver may first wait for the work already queued.
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        features = self.features.get(split)
        dataset = _Rows(rows) if features is None else _FeatureRows(rows, features)
        kwargs = {
            "batch_size": None,  # the sampler yields whole batches
            "collate_fn": Collator(self.tokenizer, hp.pad_to_multiple_of) if features is None else None,
            "pin_memory": pin,
            "num_workers": hp.num_workers,
            "persistent_workers": hp.num_workers > 0,
        }
        if train and self.trainer:
            validate_where_training_reaches(self.trainer, len(sampler))
            loop = self.trainer.fit_loop.epoch_loop
            self._train_loader = _ResumableLoader(
                dataset, sampler=sampler, batches_done=lambda: loop.batch_progress.current.processed, **kwargs
            )
            if self._resume_at:
                self._train_loader.load_state_dict(self._resume_at)
                self._resume_at = None
            return self._train_loader
        return DataLoader(dataset, sampler=sampler, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        if self.hparams.predict_file:
            return self._loader("predict")
        self.check_inputs("test")
        test = self.splits["test"]  # ids are rows of the source data; authors by name; texts as the model saw them
        text = list(tokenized.decode(test, self.tokenizer))
        self.predict_inputs = {"id": test["source_row"][:], "author": test["author_name"][:], "text": text}
        if "post" in test.column_names:  # one source row's posts share its id
            self.predict_inputs["post"] = test["post"][:]
        return self._loader("test")
