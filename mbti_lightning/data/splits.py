"""The splits: the seed's two stratified row splits, author-disjoint splits, or the data set's own."""

from __future__ import annotations

import math

import numpy as np
from datasets import Dataset, DatasetDict

# Internal to datasets, but the exact routine the seed's train_test_split uses (seed parity); datasets is
# bounded in pyproject.toml and tests/test_private_apis.py checks it is there.
from datasets.utils.stratify import stratified_shuffle_split_generate_indices
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.utilities import rank_zero_warn

from mbti_lightning.data.cleaning import clean, target_letters
from mbti_lightning.data.sources import where
from mbti_lightning.errors import UserError
from mbti_lightning.labels import AXES

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


#: A coarse key: how it is described in the note, and each row's value.
Coarse = list[tuple[str, np.ndarray]]


def _pool(strata: np.ndarray, coarse: np.ndarray, n_train: int, n_test: int) -> tuple[np.ndarray, dict[str, int]]:
    """`strata` with its rarest classes pooled by their `coarse` value, rarest first, until a stratified split
    works; then any pool still of one joins the largest class. Also returns the pooled classes and their sizes."""
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


def coarse_keys(heads: dict, labels: np.ndarray, strata: np.ndarray) -> Coarse:
    """What rare types are pooled by, finest first: the target's letters (for one axis, J or P); with
    several axes or the 16-way type, where those are the types themselves, also the first letter; last,
    one pool for all."""
    keys: Coarse = []
    if any(head in AXES for head in heads):
        keys.append(("their target letters", target_letters(heads, labels)))
    if len(heads) > 1 or "mbti" in heads:
        keys.append(("their first letter", np.asarray(strata, dtype=str).astype("U1")))
    return [*keys, ("one pool for all of them", np.full(len(strata), ""))]


def stratified_split(
    strata: np.ndarray, test_size: float, seed: int, coarse: Coarse | None = None, notes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`Dataset.train_test_split(test_size, stratify_by_column=..., seed)` on per-row classes `strata`, as indices.

    The same sizes, generator and stratification routine as datasets uses, over the classes present
    (as datasets does), without its reading the label column one row at a time (minutes at 2.3M rows).
    Where datasets would fail, classes too rare to stratify are pooled by the first of the `coarse` keys
    with which the split works (see `_pool`), and a note saying so is added to `notes`; without `coarse`
    the error names them.
    """
    n_test = math.ceil(test_size * len(strata))
    n_train = len(strata) - n_test
    problem = _unsplittable(strata, n_train, n_test)
    for described, key in coarse if problem else ():
        pooled_strata, pooled = _pool(strata, key, n_train, n_test)
        if _unsplittable(pooled_strata, n_train, n_test) is None:
            shown = ", ".join(f"{name!r} ({count})" for name, count in pooled.items())
            notes.append(
                f"a stratified split of {n_train + n_test} rows (or authors) into {n_train} and {n_test} failed "
                f"because {problem}; so {shown} were pooled by {described} for that split"
            )
            strata, problem = pooled_strata, None
            break
    if problem:
        raise UserError(f"cannot make a stratified split: {problem}. Use more data or other fractions.")
    y = np.unique(np.asarray(strata, dtype=str), return_inverse=True)[1]
    return next(stratified_shuffle_split_generate_indices(y, n_train, n_test, np.random.default_rng(seed)))


def _keep(
    strata: np.ndarray, keep_fraction: float, keep_seed: int, coarse: Coarse | None, notes: list[str]
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
    coarse: Coarse | None = None,
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


def _at(coarse: Coarse | None, rows: np.ndarray) -> Coarse | None:
    return None if coarse is None else [(described, key[rows]) for described, key in coarse]


def author_split(
    authors: np.ndarray,
    strata: np.ndarray,
    keep_fraction: float,
    keep_seed: int,
    val_fraction: float,
    val_seed: int,
    test_fraction: float = 0.0,
    coarse: Coarse | None = None,
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


def split(
    raw: Dataset | DatasetDict, hp: AttributeDict, heads: dict
) -> tuple[dict[str, tuple[Dataset, dict]], list[str]]:
    """{split name: (usable rows, their arrays)} for train / validation / test, and the messages on dropped and
    pooled rows. A split that cannot be made says which rows were dropped first: they may be why."""
    parts, messages = _split(raw, hp, heads)
    try:
        check_classes(parts, hp, heads)
    except ValueError as err:
        raise UserError(" ".join([str(err), *messages])) from None
    return parts, messages


def _split(
    raw: Dataset | DatasetDict, hp: AttributeDict, heads: dict
) -> tuple[dict[str, tuple[Dataset, dict]], list[str]]:
    if hp.split == "predefined":
        names = {"train": "train", "validation": next((n for n in VALIDATION_NAMES if n in raw), None), "test": "test"}
        if names["validation"] is None or "train" not in raw:
            raise UserError(
                f"data.split 'predefined' needs a train and a validation split; {where(hp)} has {list(raw)}"
            )
        cleaned = {ours: clean(raw[theirs], hp, heads) for ours, theirs in names.items() if theirs in raw}
        messages = [message for _, _, split_messages in cleaned.values() for message in split_messages]
        return {name: (ds, arrays) for name, (ds, arrays, _) in cleaned.items()}, messages
    ds, arrays, messages = clean(raw, hp, heads)
    try:
        train, val, test, notes = _split_rows(arrays, hp, heads)
    except ValueError as err:
        raise UserError(" ".join([str(err), *messages])) from None
    messages += [f"data.split {hp.split!r} on {where(hp)}: {note}" for note in notes]
    rows = {"train": train, "validation": val, "test": test}
    return {
        name: (ds.select(idx), {k: v[idx] for k, v in arrays.items()}) for name, idx in rows.items() if len(idx)
    }, messages


def _split_rows(
    arrays: dict[str, np.ndarray], hp: AttributeDict, heads: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Train, validation and test row numbers for `hp.split` (seed or author), and notes on pooled types."""
    notes: list[str] = []
    coarse = coarse_keys(heads, arrays["labels"], arrays["strata"])
    if hp.split == "seed":
        train, val, discarded = seed_split(
            arrays["strata"], hp.keep_fraction, hp.keep_seed, hp.val_fraction, hp.val_seed, coarse, notes
        )
        test = discarded[: len(val)]
    else:
        train, val, test = author_split(
            arrays["author"],
            arrays["strata"],
            hp.keep_fraction,
            hp.keep_seed,
            hp.val_fraction,
            hp.val_seed,
            hp.test_fraction,
            coarse,
            notes,
        )
    return train, val, test, notes


def check_classes(parts: dict[str, tuple[Dataset, dict]], hp: AttributeDict, heads: dict) -> None:
    """Stop if a class has no training or validation rows (for the 16-way type: no training rows)."""
    for name in ("train", "validation"):
        for h, (head, classes) in enumerate(heads.items()):
            counts = np.bincount(parts[name][1]["labels"][:, h], minlength=len(classes))
            missing = [classes[i] for i in np.flatnonzero(counts == 0)]
            if missing and (head != "mbti" or name == "train"):
                raise UserError(
                    f"the {name} split of {where(hp)} has no rows of class {missing} ({head}); a classifier "
                    "cannot be trained or scored without them. Use more data or other split fractions."
                )
            if missing:
                rank_zero_warn(f"the validation split has no rows of the types {missing}")
