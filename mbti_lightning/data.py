"""The data module: load MBTI data, clean and label it, split it, tokenize once, batch."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from datasets.fingerprint import Hasher
# Internal to datasets, but the exact routine the seed's train_test_split uses (seed parity); datasets is
# bounded in pyproject.toml and tests/test_private_apis.py checks it is there.
from datasets.utils.stratify import stratified_shuffle_split_generate_indices
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from mbti_lightning import demo
from mbti_lightning.cache import build_atomically, cache_root
from mbti_lightning.labels import AXES, AXIS_POSITION, TYPES, check_axis, heads
from mbti_lightning.masking import mask_type_mentions
from mbti_lightning.sampling import PADDING, LengthGroupedSampler
from mbti_lightning.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

#: Bump when preprocessing changes in a way that makes older cached splits wrong.
CACHE_VERSION = "3"
#: Names a data set's own validation split may have, for `split: predefined`.
VALIDATION_NAMES = ("validation", "valid", "val", "dev")


def _unsplittable(strata: np.ndarray, n_train: int, n_test: int) -> str | None:
    """Why datasets' stratified split of `strata` into `n_train` and `n_test` would fail, or None."""
    names, counts = np.unique(strata, return_counts=True)
    if (counts < 2).any():
        few = ", ".join(f"{str(name)!r} ({count})" for name, count in zip(names, counts) if count < 2)
        return f"these classes have fewer than 2 rows (or authors): {few}"
    if min(n_train, n_test) < len(names):
        return (
            f"each part of {n_train + n_test} rows (or authors) split into {n_train} and {n_test} needs at least "
            f"one of each of the {len(names)} classes"
        )
    return None


def _pool(strata: np.ndarray, coarse: np.ndarray, n_train: int, n_test: int) -> tuple[np.ndarray, dict[str, int]]:
    """`strata` with its rarest classes pooled by their `coarse` value (the target's letters), rarest first,
    until a stratified split works; then any pool still of one joins the largest class. Also returns the
    pooled classes and their sizes."""
    strata, pooled = strata.astype(object), {}
    names, counts = np.unique(strata, return_counts=True)
    for name, count in sorted(zip(names, counts), key=lambda item: item[1]):
        if _unsplittable(strata, n_train, n_test) is None:
            break
        rows = strata == name
        strata[rows] = np.char.add("pooled ", coarse[rows].astype(str))
        pooled[str(name)] = int(count)
    names, counts = np.unique(strata, return_counts=True)
    strata[np.isin(strata, names[counts < 2])] = names[counts.argmax()]
    return strata, pooled


def stratified_split(
    strata: np.ndarray, test_size: float, seed: int, coarse: np.ndarray | None = None, notes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`Dataset.train_test_split(test_size, stratify_by_column=..., seed)` on per-row classes `strata`, as indices.

    The same sizes, generator and stratification routine as datasets uses, over the classes present
    (as datasets does), without its reading the label column one row at a time (minutes at 2.3M rows).
    Where datasets would fail, classes too rare to stratify are pooled by `coarse` (see `_pool`) and
    a note saying so is added to `notes`; without `coarse` the error names them.
    """
    n_test = math.ceil(test_size * len(strata))
    n_train = len(strata) - n_test
    problem = _unsplittable(strata, n_train, n_test)
    if problem and coarse is not None:
        strata, pooled = _pool(strata, coarse, n_train, n_test)
        shown = ", ".join(f"{name!r} ({count})" for name, count in pooled.items())
        notes.append(
            f"a stratified split of {n_train + n_test} rows (or authors) into {n_train} and {n_test} failed because "
            f"{problem}; so {shown} were pooled by their target letters for that split"
        )
        problem = _unsplittable(strata, n_train, n_test)
    if problem:
        raise ValueError(f"cannot make a stratified split: {problem}. Use more data or other fractions.")
    y = np.unique(np.asarray(strata, dtype=str), return_inverse=True)[1]
    return next(stratified_shuffle_split_generate_indices(y, n_train, n_test, np.random.default_rng(seed)))


def _keep(
    strata: np.ndarray, keep_fraction: float, keep_seed: int, coarse: np.ndarray | None, notes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, discarded): the seed keeps the `test` part of a stratified split of size `keep_fraction`."""
    if keep_fraction == 1:
        return np.arange(len(strata)), np.array([], dtype=np.int64)
    discarded, kept = stratified_split(strata, keep_fraction, keep_seed, coarse, notes)
    return kept, discarded


def seed_split(
    strata: np.ndarray,
    keep_fraction: float,
    keep_seed: int,
    val_fraction: float,
    val_seed: int,
    coarse: np.ndarray | None = None,
    notes: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seed recipe's two stratified splits, as row numbers: (train, validation, discarded).

    The seed class-encodes the type column (ids follow the sorted values), keeps the `test` part of
    ``train_test_split(test_size=keep_fraction, stratify_by_column=..., seed=keep_seed)`` and splits
    that again with `val_fraction` / `val_seed`. The same splits on the types alone give the same
    rows without touching, let alone tokenizing, the text; a test compares them with the seed's calls.
    Where the seed's calls would fail, rare types are pooled by `coarse` instead (see `stratified_split`).
    """
    kept, discarded = _keep(strata, keep_fraction, keep_seed, coarse, notes)
    train, val = stratified_split(strata[kept], val_fraction, val_seed, _at(coarse, kept), notes)
    return kept[train], kept[val], discarded


def _at(values: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    return None if values is None else values[rows]


def author_split(
    authors: np.ndarray,
    strata: np.ndarray,
    keep_fraction: float,
    keep_seed: int,
    val_fraction: float,
    val_seed: int,
    test_fraction: float = 0.0,
    coarse: np.ndarray | None = None,
    notes: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Author-disjoint (train, validation, test) row numbers, stratified by each author's type.

    Authors, not rows, are split: `keep_fraction` of them are kept (stratified, `keep_seed`), then
    `val_fraction` and `test_fraction` of the kept authors go to validation and test (`val_seed`).
    Without a test fraction, the test split takes as many discarded authors as validation has.
    An author's type is the type of their first row. Types with too few authors are pooled by
    `coarse` (see `stratified_split`).
    """
    _, first, author = np.unique(authors, return_index=True, return_inverse=True)
    strata, coarse = strata[first], _at(coarse, first)
    kept, discarded = _keep(strata, keep_fraction, keep_seed, coarse, notes)
    rest, test = kept, np.array([], dtype=np.int64)
    if test_fraction:
        rest_idx, test_idx = stratified_split(strata[kept], test_fraction, val_seed + 1, _at(coarse, kept), notes)
        rest, test = kept[rest_idx], kept[test_idx]
    train_idx, val_idx = stratified_split(
        strata[rest], val_fraction / (1 - test_fraction), val_seed, _at(coarse, rest), notes
    )
    train, val = rest[train_idx], rest[val_idx]
    if not test_fraction:
        test = discarded[: len(val)]
    return tuple(np.flatnonzero(np.isin(author, part)) for part in (train, val, test))


def _column(ds: Dataset, name: str) -> pa.ChunkedArray:
    return ds.with_format("arrow")[name]


def _normalized(ds: Dataset, name: str) -> np.ndarray:
    """A label column as upper-case, stripped strings ('' where missing), without a Python string per row."""
    values = pc.utf8_upper(pc.utf8_trim_whitespace(pc.cast(_column(ds, name), pa.string()))).fill_null("")
    encoded = pc.dictionary_encode(values.combine_chunks())
    return np.asarray(encoded.dictionary.to_pylist(), dtype=str)[encoded.indices.to_numpy()]


def _ids(ds: Dataset, name: str) -> np.ndarray:
    """Each row's number for its value in column `name` (e.g. author names -> 0, 1, 2, ...; missing is one value)."""
    encoded = pc.dictionary_encode(pc.cast(_column(ds, name), pa.string()).combine_chunks(), null_encoding="encode")
    return encoded.indices.to_numpy().astype(np.int64)


def _empty(ds: Dataset, name: str) -> np.ndarray:
    """Rows whose text is missing, empty or only whitespace; no copy of the texts is made."""
    texts = _column(ds, name)
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        texts = pc.cast(texts, pa.string())
    empty = pc.or_(pc.equal(pc.utf8_length(texts), 0), pc.utf8_is_space(texts))
    return empty.fill_null(True).to_numpy(zero_copy_only=False)


def _explode(batch: dict[str, list], indices: list[int], column: str, separator: str) -> dict[str, list]:
    """One row per post of each row's `separator`-joined posts; other columns repeat, `__row__` is the source row."""
    out: dict[str, list] = {name: [] for name in [*batch, "__row__"]}
    for i, row in enumerate(indices):
        posts = (batch[column][i] or "").split(separator)
        for name in batch:
            out[name] += posts if name == column else [batch[name][i]] * len(posts)
        out["__row__"] += [row] * len(posts)
    return out


def _tokenize(batch: dict, tokenizer: PreTrainedTokenizerBase, column: str, max_length: int, mask: bool) -> dict:
    texts, out = batch[column], {}
    if mask:
        masked = [mask_type_mentions(text) for text in texts]
        texts, out["mentions"] = [text for text, _ in masked], [n for _, n in masked]
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return out | {"input_ids": ids, "length": [len(x) for x in ids]}


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
        batch["padded"] = min(rows.get("row", [0]), default=0) < 0  # holds copies that only keep ranks in step
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


class MBTIDataModule(L.LightningDataModule):
    """MBTI posts -> cleaned, labelled, split and tokenized train / validation / test splits.

    Rows are read from the hub, local files or the demo corpus; `explode_separator` turns rows of
    joined posts into one row per post. Rows with an empty text or an invalid label are dropped and
    reported (or, with ``invalid_rows: error``, stop the run). Splits:

    - ``seed``: the seed recipe's two stratified row splits, exactly. Test (and predict) take rows that
      split discards, as many as validation has: never seen in training or model selection.
    - ``author``: the same fractions over authors instead of rows (stratified by each author's type),
      so no author has posts on both sides; see `author_split`.
    - ``predefined``: the data set's own ``train``, ``validation`` (or ``valid``/``val``/``dev``) and
      ``test`` splits.

    Training batches group rows of similar length (see `LengthGroupedSampler`) unless
    `group_by_length` is false; evaluation batches are sorted by length and carry their row numbers
    (`batch["row"]`) and author ids (`batch["author"]`). Splits are tokenized once and cached under
    ``$MBTI_LIGHTNING_CACHE/tokenized`` (default ``~/.cache/mbti_lightning``), keyed by the data,
    the tokenizer and every setting below that changes them.

    Args:
        dataset: Hugging Face dataset id, a builder name (``csv``, ``json`` for .json/.jsonl,
            ``parquet``) used with `data_files`, or ``demo`` for the generated offline corpus.
        data_files: Path, glob, list or ``{split: path}`` mapping for local files.
        dataset_split: Which split of `dataset` to read (all of them for ``split: predefined``).
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
        if max_length <= 0:
            raise ValueError(f"data.max_length must be positive, got {max_length}")
        if not 0 < keep_fraction <= 1 or not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 - val_fraction:
            raise ValueError(
                f"data.keep_fraction must be in (0, 1], data.val_fraction in (0, 1) and data.test_fraction in "
                f"[0, 1 - val_fraction), got {keep_fraction}, {val_fraction} and {test_fraction}"
            )
        for axis in axis_columns or {}:
            check_axis(axis)
        needed = list(AXES) if "mbti" in self.heads else list(self.heads)
        if type_column is None and set(needed) - set(axis_columns or {}):
            raise ValueError(f"without data.type_column, data.axis_columns must name a column for each of {needed}")
        self.save_hyperparameters()
        self.tokenizer = None
        self.splits: DatasetDict | None = None
        self._train_loader: _ResumableLoader | None = None
        self._resume_at: dict[str, int] | None = None
        self.predict_rows: Dataset | None = None  # the tokenized predict_file
        self.predict_inputs: dict[str, list] = {}  # "id" and "text" of each predicted row, for the writer

    @property
    def _where(self) -> str:
        return " ".join(str(x) for x in (self.hparams.dataset, self.hparams.data_files) if x)

    def state_dict(self) -> dict[str, int]:
        """Where training is in its epoch, saved in every checkpoint."""
        return self._train_loader.state_dict() if self._train_loader else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Lightning restores the data module before it first builds the training loader, and may
        # build that loader (to count the steps of the schedule) before it restores its own loader
        # states, too late for the first iteration. So the skip is set up here.
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
        raw = self._load_raw()
        parts = raw.values() if isinstance(raw, DatasetDict) else [raw]
        fingerprint = [part._fingerprint for part in parts]  # private: see tests/test_private_apis.py
        key = Hasher.hash([CACHE_VERSION, fingerprint, Hasher.hash(self.tokenizer), self._preprocessing_args()])
        return build_atomically(cache_root() / "tokenized" / key, lambda tmp: self._build(raw, tmp))

    def setup(self, stage: str) -> None:
        self.tokenizer = self.tokenizer or load_tokenizer(self.hparams.tokenizer)
        if stage == "predict" and self.hparams.predict_file:
            self.predict_rows = self._read_predict_file()
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

    def _read_predict_file(self) -> Dataset:
        """The predict file's texts, exploded and masked as in training, tokenized; `predict_inputs` gets each
        text's ``id``, ``text``, ``author`` (the author column, else the source row's id) and, when
        exploded, ``post`` (its number within the source row, from 0)."""
        hp = self.hparams
        path = Path(hp.predict_file)
        if not path.is_file():
            raise FileNotFoundError(f"data.predict_file {path} not found")
        if path.suffix == ".txt":
            texts: list = path.read_text().splitlines()
            ids = authors = list(range(1, len(texts) + 1))
        elif path.suffix in (".csv", ".jsonl", ".json"):
            ds = load_dataset("csv" if path.suffix == ".csv" else "json", data_files=str(path), split="train")
            if hp.text_column not in ds.column_names:
                raise ValueError(
                    f"column {hp.text_column!r} not found in {path}; it has {ds.column_names}. Set data.text_column."
                )
            texts = ds[hp.text_column][:]
            ids = ds["id"][:] if "id" in ds.column_names else list(range(len(ds)))
            authors = ds[hp.author_column][:] if hp.author_column in ds.column_names else ids
        else:
            raise ValueError(f"data.predict_file must be a .txt, .csv or .jsonl file, got {path.name}")
        rows = [(i, 0, "" if text is None else str(text)) for i, text in enumerate(texts)]
        if hp.explode_separator:
            rows = [(i, k, post) for i, _, text in rows for k, post in enumerate(text.split(hp.explode_separator))]
        empty = [ids[i] for i, _, text in rows if not text.strip()]
        if empty:
            shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
            rank_zero_warn(f"{path}: skipped {len(empty)} empty texts (ids {shown})")
        rows = [row for row in rows if row[2].strip()]
        self.predict_inputs = {
            "id": [ids[i] for i, _, _ in rows],
            "text": [text for _, _, text in rows],
            "author": [authors[i] for i, _, _ in rows],
        } | ({"post": [k for _, k, _ in rows]} if hp.explode_separator else {})
        no_label = [0] * len(self.heads) if len(self.heads) > 1 else 0
        author_ids = {author: n for n, author in enumerate(dict.fromkeys(self.predict_inputs["author"]))}
        table = Dataset.from_dict(
            {
                hp.text_column: self.predict_inputs["text"],
                "labels": [no_label] * len(rows),
                "author": [author_ids[a] for a in self.predict_inputs["author"]],
            }
        )
        return table.map(
            _tokenize, batched=True, remove_columns=[hp.text_column], desc="tokenizing predict_file",
            fn_kwargs=self._tokenize_args(),
        )  # fmt: skip

    def _tokenize_args(self) -> dict:
        # Only the tokenizer travels to worker processes, never the module (or its trainer).
        hp = self.hparams
        return {"tokenizer": self.tokenizer, "column": hp.text_column, "max_length": hp.max_length,
                "mask": hp.mask_type_mentions}  # fmt: skip

    def _preprocessing_args(self) -> dict:
        names = ("dataset", "data_files", "dataset_split", "text_column", "type_column", "author_column",
                 "axis_columns", "target", "split", "keep_fraction", "keep_seed", "val_fraction", "val_seed",
                 "test_fraction", "explode_separator", "mask_type_mentions", "invalid_rows", "max_length")  # fmt: skip
        return {name: self.hparams[name] for name in names}

    def _load_raw(self) -> Dataset | DatasetDict:
        hp = self.hparams
        builder, files = ("parquet", str(demo.corpus_path())) if hp.dataset == demo.DEMO else (hp.dataset, hp.data_files)
        try:
            raw = load_dataset(builder, data_files=files, split=None if hp.split == "predefined" else hp.dataset_split)
        except FileNotFoundError:
            raise
        except Exception as err:  # datasets wraps a parser's error in its own
            if files is None:
                raise
            cause = err.__cause__ or err
            raise ValueError(f"could not read {files} as {builder}: {type(cause).__name__}: {cause}") from err
        for part in raw.values() if isinstance(raw, DatasetDict) else [raw]:
            label_columns = [hp.type_column] if hp.type_column else list(hp.axis_columns.values())
            for column in (hp.text_column, *label_columns):
                if column not in part.column_names:
                    raise ValueError(
                        f"column {column!r} not found in {self._where}; it has {part.column_names}. "
                        "Set data.text_column / data.type_column / data.axis_columns."
                    )
        return raw

    def _clean(self, ds: Dataset) -> tuple[Dataset, dict[str, np.ndarray], list[str]]:
        """Explode, label and validate `ds`: (usable rows, their per-row arrays, messages on dropped rows).

        The arrays, aligned with the usable rows: ``labels`` (class ids), ``strata`` (type, or the axis
        letters there are), ``author`` (author ids) and ``source_row`` (row number in the source, from 0).
        """
        hp = self.hparams
        if hp.author_column and hp.author_column not in ds.column_names and hp.split == "author":
            raise ValueError(
                f"data.split 'author' needs the author column {hp.author_column!r}, which {self._where} lacks "
                f"(it has {ds.column_names}); set data.author_column: null to treat each row as one author"
            )
        author_column = hp.author_column if hp.author_column in ds.column_names else None
        if hp.explode_separator:
            keep = {hp.text_column, hp.type_column, author_column, *(hp.axis_columns or {}).values()} - {None}
            ds = ds.select_columns(list(keep)).map(
                _explode, batched=True, with_indices=True, desc="one row per post",
                fn_kwargs={"column": hp.text_column, "separator": hp.explode_separator},
            )  # fmt: skip
            source = np.asarray(_column(ds, "__row__"))
        else:
            source = np.arange(len(ds))
        authors = _ids(ds, author_column) if author_column else source

        problems = [(f"with an empty {hp.text_column!r}", _empty(ds, hp.text_column), None)]
        if hp.type_column:
            strata = _normalized(ds, hp.type_column)
            problems.append((f"whose {hp.type_column!r} is not an MBTI type", ~np.isin(strata, TYPES), strata))
            types = strata
        else:
            columns = {axis: _normalized(ds, column) for axis, column in hp.axis_columns.items()}
            strata = functools.reduce(np.char.add, columns.values())
            for axis, column in hp.axis_columns.items():
                bad = ~np.isin(columns[axis], AXES[axis])
                problems.append((f"whose {column!r} is not a letter of {axis} {AXES[axis]}", bad, columns[axis]))
            types = strata if len(columns) == 4 else None
        labels = np.stack([self._head_labels(head, types, None if hp.type_column else columns) for head in self.heads], 1)

        invalid = np.logical_or.reduce([bad for _, bad, _ in problems])
        messages = []
        for what, bad, values in problems:
            if bad.any():
                shown = [f"{source[i]}" + (f" ({str(values[i])!r})" if values is not None else "")
                         for i in np.flatnonzero(bad)[:5]]  # fmt: skip
                more = f" and {bad.sum() - 5} more" if bad.sum() > 5 else ""
                messages.append(f"{bad.sum()} rows {what}: rows {', '.join(shown)}{more}")
        if messages:
            summary = f"{self._where}: {invalid.sum()} of {len(invalid)} rows are unusable; " + "; ".join(messages)
            if hp.invalid_rows == "error":
                raise ValueError(f"{summary}. Fix them, or set data.invalid_rows: drop to leave them out.")
            messages = [f"{summary}. They were dropped (data.invalid_rows: drop)."]
        if invalid.all():
            raise ValueError(f"{self._where}: no usable rows left. {' '.join(messages)}")
        valid = np.flatnonzero(~invalid)
        arrays = {"labels": labels, "strata": strata, "author": authors, "source_row": source}
        return ds.select(valid), {name: values[valid] for name, values in arrays.items()}, messages

    def _head_labels(self, head: str, types: np.ndarray | None, columns: dict[str, np.ndarray] | None) -> np.ndarray:
        """Class ids of one head per row, from the types or the axis letter columns (junk where invalid)."""
        if head == "mbti":
            return np.searchsorted(TYPES, types).clip(0, len(TYPES) - 1)
        # A type's letters as a (rows, 4) array; rows that are not types are dropped later anyway.
        letters = columns[head] if columns else types.astype("U4").view("U1").reshape(len(types), 4)[:, AXIS_POSITION[head]]
        return (letters == AXES[head][1]).astype(np.int64)

    def _target_letters(self, labels: np.ndarray) -> np.ndarray:
        """Each row's letters of the target axes ("P", or "ISTP" for all four; "" for the 16-way type): the
        coarser stratum that types too rare to stratify are pooled into."""
        letters = [np.asarray(AXES[head])[labels[:, h]] for h, head in enumerate(self.heads) if head in AXES]
        return functools.reduce(np.char.add, letters) if letters else np.full(len(labels), "")

    def train_label_counts(self) -> list[torch.Tensor]:
        """How many training rows each class has, per head, in class-id order."""
        labels = np.asarray(self.splits["train"]["labels"][:]).reshape(len(self.splits["train"]), -1)
        return [torch.as_tensor(np.bincount(labels[:, h], minlength=len(classes)))
                for h, classes in enumerate(self.heads.values())]  # fmt: skip

    def _split(self, raw: Dataset | DatasetDict) -> tuple[dict[str, tuple[Dataset, dict]], list[str]]:
        """{split name: (usable rows, their arrays)} for train / validation / test, and the drop messages."""
        hp = self.hparams
        if hp.split == "predefined":
            names = {"train": "train", "validation": next((n for n in VALIDATION_NAMES if n in raw), None), "test": "test"}
            if names["validation"] is None or "train" not in raw:
                raise ValueError(
                    f"data.split 'predefined' needs a train and a validation split; {self._where} has {list(raw)}"
                )
            cleaned = {ours: self._clean(raw[theirs]) for ours, theirs in names.items() if theirs in raw}
            messages = [message for _, _, split_messages in cleaned.values() for message in split_messages]
            return {name: (ds, arrays) for name, (ds, arrays, _) in cleaned.items()}, messages
        ds, arrays, messages = self._clean(raw)
        notes: list[str] = []
        coarse = self._target_letters(arrays["labels"])
        if hp.split == "seed":
            train, val, discarded = seed_split(
                arrays["strata"], hp.keep_fraction, hp.keep_seed, hp.val_fraction, hp.val_seed, coarse, notes
            )
            test = discarded[: len(val)]
        else:
            train, val, test = author_split(
                arrays["author"], arrays["strata"], hp.keep_fraction, hp.keep_seed, hp.val_fraction, hp.val_seed,
                hp.test_fraction, coarse, notes,
            )  # fmt: skip
        messages += [f"data.split {hp.split!r} on {self._where}: {note}" for note in notes]
        rows = {"train": train, "validation": val, "test": test}
        return {name: (ds.select(idx), {k: v[idx] for k, v in arrays.items()}) for name, idx in rows.items()
                if len(idx)}, messages  # fmt: skip

    def _build(self, raw: Dataset | DatasetDict, out: os.PathLike) -> None:
        hp = self.hparams
        parts, messages = self._split(raw)
        for name in ("train", "validation"):
            for h, (head, classes) in enumerate(self.heads.items()):
                counts = np.bincount(parts[name][1]["labels"][:, h], minlength=len(classes))
                missing = [classes[i] for i in np.flatnonzero(counts == 0)]
                if missing and (head != "mbti" or name == "train"):
                    raise ValueError(
                        f"the {name} split of {self._where} has no rows of class {missing} ({head}); a classifier "
                        "cannot be trained or scored without them. Use more data or other split fractions."
                    )
                if missing:
                    rank_zero_warn(f"the validation split has no rows of the types {missing}")
        workers = hp.preprocessing_workers
        if workers is None:
            kept = sum(len(parts[name][0]) for name in ("train", "validation"))
            workers = min(os.cpu_count() or 1, 8) if kept > 50_000 else 1
        splits = DatasetDict()
        for name, (ds, arrays) in parts.items():
            columns = ds.select_columns([hp.text_column])
            labels = arrays["labels"] if len(self.heads) > 1 else arrays["labels"][:, 0]
            columns = columns.add_column("labels", labels.tolist())
            for key in ("author", "source_row"):
                columns = columns.add_column(key, arrays[key].tolist())
            splits[name] = columns.map(_tokenize, batched=True, remove_columns=[hp.text_column], desc=f"tokenizing {name}",
                                       num_proc=workers if workers > 1 else None, fn_kwargs=self._tokenize_args())  # fmt: skip
        splits.save_to_disk(out)
        (Path(out) / "dropped.json").write_text(json.dumps(messages))

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        hp = self.hparams
        rows = self.predict_rows if split == "predict" else self.splits.get(split)
        if rows is None:
            raise ValueError(f"{self._where} has no {split} split with data.split {hp.split!r}; "
                             "for split 'author' set data.test_fraction or data.keep_fraction below 1")  # fmt: skip
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
        kwargs = {"batch_size": None,  # the sampler yields whole batches
                  "collate_fn": Collator(self.tokenizer, hp.pad_to_multiple_of), "pin_memory": pin,
                  "num_workers": hp.num_workers, "persistent_workers": hp.num_workers > 0}  # fmt: skip
        if train and self.trainer:
            loop = self.trainer.fit_loop.epoch_loop
            self._train_loader = _ResumableLoader(_Rows(rows), sampler=sampler,
                                                  batches_done=lambda: loop.batch_progress.current.processed, **kwargs)  # fmt: skip
            if self._resume_at:
                self._train_loader.load_state_dict(self._resume_at)
                self._resume_at = None
            return self._train_loader
        return DataLoader(_Rows(rows), sampler=sampler, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        if self.hparams.predict_file:
            return self._loader("predict")
        test = self.splits["test"]  # ids are rows of the source data; authors are numbered
        self.predict_inputs = {"id": test["source_row"][:], "author": test["author"][:]}
        return self._loader("test")
