"""Cleaning and labelling: one row per post, class ids per head, and the report of rows dropped."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from lightning.fabric.utilities.data import AttributeDict

from mbti_lightning.data.sources import where
from mbti_lightning.errors import UserError
from mbti_lightning.labels import AXES, AXIS_POSITION, TYPES


def _column(ds: Dataset, name: str) -> pa.ChunkedArray:
    return ds.with_format("arrow")[name]


def _normalized(ds: Dataset, name: str) -> np.ndarray:
    """A label column as upper-case, stripped strings ('' where missing), without a Python string per row."""
    values = pc.utf8_upper(pc.utf8_trim_whitespace(pc.cast(_column(ds, name), pa.string()))).fill_null("")
    encoded = pc.dictionary_encode(values.combine_chunks())
    return np.asarray(encoded.dictionary.to_pylist(), dtype=str)[encoded.indices.to_numpy()]


def _ids(ds: Dataset, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Each row's number for its value in column `name` (e.g. author names -> 0, 1, 2, ...; missing is one value),
    and that value as a string ('' where missing), without a Python string per row."""
    encoded = pc.dictionary_encode(pc.cast(_column(ds, name), pa.string()).combine_chunks(), null_encoding="encode")
    ids = encoded.indices.to_numpy().astype(np.int64)
    return ids, np.asarray([value or "" for value in encoded.dictionary.to_pylist()], dtype=object)[ids]


def _empty(ds: Dataset, name: str) -> np.ndarray:
    """Rows whose text is missing, empty or only whitespace; no copy of the texts is made."""
    texts = _column(ds, name)
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        texts = pc.cast(texts, pa.string())
    empty = pc.or_(pc.equal(pc.utf8_length(texts), 0), pc.utf8_is_space(texts))
    return empty.fill_null(True).to_numpy(zero_copy_only=False)


def _explode(batch: dict[str, list], indices: list[int], column: str, separator: str) -> dict[str, list]:
    """One row per post of each row's `separator`-joined posts; other columns repeat, `__row__` is the source row and
    `__post__` the post's number in it (from 0)."""
    out: dict[str, list] = {name: [] for name in [*batch, "__row__", "__post__"]}
    for i, row in enumerate(indices):
        posts = (batch[column][i] or "").split(separator)
        for name in batch:
            out[name] += posts if name == column else [batch[name][i]] * len(posts)
        out["__row__"] += [row] * len(posts)
        out["__post__"] += list(range(len(posts)))
    return out


def clean(ds: Dataset, hp: AttributeDict, heads: dict) -> tuple[Dataset, dict[str, np.ndarray], list[str]]:
    """Explode, label and validate `ds`: (usable rows, their per-row arrays, messages on dropped rows).

    The arrays, aligned with the usable rows: ``labels`` (class ids), ``strata`` (type, or the axis
    letters there are), ``author`` (author ids), ``author_name`` (the author column's value, else the source
    row), ``source_row`` (row number in the source, from 0) and, with `explode_separator`, ``post`` (the post's
    number within its source row).
    """
    if hp.author_column and hp.author_column not in ds.column_names and hp.split == "author":
        raise UserError(
            f"data.split 'author' needs the author column {hp.author_column!r}, which {where(hp)} lacks "
            f"(it has {ds.column_names}); set data.author_column: null to treat each row as one author"
        )
    author_column = hp.author_column if hp.author_column in ds.column_names else None
    if hp.explode_separator:
        keep = {hp.text_column, hp.type_column, author_column, *(hp.axis_columns or {}).values()} - {None}
        ds = ds.select_columns(list(keep)).map(
            _explode,
            batched=True,
            with_indices=True,
            desc="one row per post",
            fn_kwargs={"column": hp.text_column, "separator": hp.explode_separator},
        )
        source, post = np.asarray(_column(ds, "__row__")), np.asarray(_column(ds, "__post__"))
    else:
        source, post = np.arange(len(ds)), None
    # Each person's number, and what a user calls them: the author column's value, else the source row.
    authors, names = _ids(ds, author_column) if author_column else (source, source.astype(str))
    anonymous = _empty(ds, author_column) if author_column else np.zeros(len(ds), dtype=bool)
    # Rows without an author are not one person: each source row of them is a person of its own.
    authors = np.where(anonymous, authors.max(initial=-1) + 1 + source, authors)
    names = np.where(anonymous, source.astype(str), names)

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
    labels = np.stack([head_labels(head, types, None if hp.type_column else columns) for head in heads], 1)

    invalid = np.logical_or.reduce([bad for _, bad, _ in problems])
    messages = []
    for what, bad, values in problems:
        if bad.any():
            # One entry per source row: the posts of an exploded row are counted, not listed ("55 (5 posts)").
            rows, first, posts = np.unique(source[bad], return_index=True, return_counts=True)
            order = np.argsort(first)[:5]
            shown = [
                f"{rows[k]}"
                + (f" ({str(values[np.flatnonzero(bad)[first[k]]])!r})" if values is not None else "")
                + (f" ({posts[k]} posts)" if posts[k] > 1 else "")
                for k in order
            ]
            more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
            messages.append(f"{bad.sum()} rows {what}: rows {', '.join(shown)}{more}")
    if messages:
        summary = f"{where(hp)}: {invalid.sum()} of {len(invalid)} rows are unusable; " + "; ".join(messages)
        if hp.invalid_rows == "error":
            raise UserError(f"{summary}. Fix them, or set data.invalid_rows: drop to leave them out.")
        messages = [f"{summary}. They were dropped (data.invalid_rows: drop)."]
    if invalid.all():
        raise UserError(f"{where(hp)}: no usable rows left. {' '.join(messages)}")
    # What a shipped config does quietly to one's own file, said once.
    if anonymous[~invalid].any():
        rows = len(np.unique(source[anonymous & ~invalid]))
        messages.append(
            f"{where(hp)}: {rows} rows have no {author_column!r}; each is taken as a person of its own (not one "
            "person together)"
        )
    if hp.author_column and author_column is None:
        messages.append(
            f"{where(hp)} has no author column {hp.author_column!r}, so each row is its own person "
            "(set data.author_column to the column that names the writer)"
        )
    if hp.data_files and hp.keep_fraction < 1:
        messages.append(
            f"data.keep_fraction is {hp.keep_fraction}: only that share of the rows (or authors) of {where(hp)} is "
            "used, the rest discarded (set data.keep_fraction: 1.0 to use them all)"
        )
    valid = np.flatnonzero(~invalid)
    arrays = {"labels": labels, "strata": strata, "author": authors, "author_name": names, "source_row": source}
    arrays |= {"post": post} if post is not None else {}
    return ds.select(valid), {name: values[valid] for name, values in arrays.items()}, messages


def head_labels(head: str, types: np.ndarray | None, columns: dict[str, np.ndarray] | None) -> np.ndarray:
    """Class ids of one head per row, from the types or the axis letter columns (junk where invalid)."""
    if head == "mbti":
        return np.searchsorted(TYPES, types).clip(0, len(TYPES) - 1)
    # A type's letters as a (rows, 4) array; rows that are not types are dropped later anyway.
    letters = columns[head] if columns else types.astype("U4").view("U1").reshape(len(types), 4)[:, AXIS_POSITION[head]]
    return (letters == AXES[head][1]).astype(np.int64)


def target_letters(heads: dict, labels: np.ndarray) -> np.ndarray:
    """Each row's letters of the target axes ("P", or "ISTP" for all four; "" for the 16-way type): the
    coarser stratum that types too rare to stratify are pooled into."""
    letters = [np.asarray(AXES[head])[labels[:, h]] for h, head in enumerate(heads) if head in AXES]
    return functools.reduce(np.char.add, letters) if letters else np.full(len(labels), "")
