"""Tokenizing the splits once, and caching them keyed by everything that changes them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict
from datasets.fingerprint import Hasher
from lightning.fabric.utilities.data import AttributeDict
from transformers import PreTrainedTokenizerBase

from mbti_lightning.masking import mask_type_mentions

#: Bump when preprocessing changes in a way that makes older cached splits wrong.
CACHE_VERSION = "4"  # 4: rows without an author are persons of their own; author names and post numbers


def tokenize(
    batch: dict, tokenizer: PreTrainedTokenizerBase, column: str, max_length: int, mask: bool, flag: bool = False
) -> dict:
    """The texts of `batch[column]` masked (with `mask`) and tokenized, truncated at `max_length` tokens; with
    `flag`, also whether each was truncated (``truncated``), from the same tokenization where the tokenizer is
    a fast one (its overflowing tokens)."""
    texts, out = batch[column], {}
    if mask:
        masked = [mask_type_mentions(text) for text in texts]
        texts, out["mentions"] = [text for text, _ in masked], [n for _, n in masked]
    if not flag:
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        return out | {"input_ids": ids, "length": [len(x) for x in ids]}
    if not tokenizer.is_fast:  # slow tokenizers say nothing of what they cut: count the whole text
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        truncated = [len(x) == max_length and len(tokenizer(t)["input_ids"]) > max_length for t, x in zip(texts, ids)]
        return out | {"input_ids": ids, "length": [len(x) for x in ids], "truncated": truncated}
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_overflowing_tokens=True)
    first: dict[int, int] = {}
    truncated = [False] * len(texts)
    for row, text in enumerate(encoded["overflow_to_sample_mapping"]):
        truncated[text] = text in first
        first.setdefault(text, row)
    ids = [encoded["input_ids"][first[i]] for i in range(len(texts))]
    return out | {"input_ids": ids, "length": [len(x) for x in ids], "truncated": truncated}


def decode(
    split: Dataset, tokenizer: PreTrainedTokenizerBase, rows: np.ndarray | None = None, batch_size: int = 10_000
) -> Iterator[str]:
    """The texts of a tokenized split (or of its `rows`) as the model sees them (masked, truncated), decoded a
    batch at a time: never all token ids as Python lists at once (hundreds of millions of ints at full scale)."""
    part = split if rows is None else split.select(rows)
    for batch in part.select_columns(["input_ids"]).iter(batch_size=batch_size):
        yield from tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)


def tokenize_kwargs(tokenizer: PreTrainedTokenizerBase, hp: AttributeDict) -> dict:
    """`tokenize`'s arguments: only the tokenizer travels to worker processes, never the data module."""
    return {
        "tokenizer": tokenizer,
        "column": hp.text_column,
        "max_length": hp.max_length,
        "mask": hp.mask_type_mentions,
    }


#: The data settings that decide which rows make each split and how a text is prepared (with the tokenizer, the
#: settings a model is trained with: `loading` gives every command a model's own).
SETTINGS = (
    "dataset",
    "data_files",
    "dataset_split",
    "revision",
    "text_column",
    "type_column",
    "author_column",
    "axis_columns",
    "target",
    "split",
    "keep_fraction",
    "keep_seed",
    "val_fraction",
    "val_seed",
    "test_fraction",
    "explode_separator",
    "mask_type_mentions",
    "invalid_rows",
    "max_length",
)


def preprocessing_args(hp: AttributeDict) -> dict:
    return {name: hp[name] for name in SETTINGS}


def cache_key(raw: Dataset | DatasetDict, tokenizer: PreTrainedTokenizerBase, hp: AttributeDict) -> str:
    """The data's fingerprint, the tokenizer and every setting that changes the splits."""
    parts = raw.values() if isinstance(raw, DatasetDict) else [raw]
    fingerprint = [part._fingerprint for part in parts]  # private: see tests/test_private_apis.py
    return Hasher.hash([CACHE_VERSION, fingerprint, Hasher.hash(tokenizer), preprocessing_args(hp)])


def build(
    parts: dict[str, tuple[Dataset, dict]],
    messages: list[str],
    hp: AttributeDict,
    heads: dict,
    tokenizer: PreTrainedTokenizerBase,
    out: os.PathLike,
) -> None:
    """Tokenize each split's usable rows with their labels, authors and source rows, and save them to `out`
    with the messages on dropped and pooled rows."""
    workers = hp.preprocessing_workers
    if workers is None:
        kept = sum(len(parts[name][0]) for name in ("train", "validation"))
        workers = min(os.cpu_count() or 1, 8) if kept > 50_000 else 1
    splits = DatasetDict()
    for name, (ds, arrays) in parts.items():
        columns = ds.select_columns([hp.text_column])
        labels = arrays["labels"] if len(heads) > 1 else arrays["labels"][:, 0]
        columns = columns.add_column("labels", labels.tolist())
        for key in ("author", "author_name", "source_row", "post"):
            if key in arrays:
                columns = columns.add_column(key, arrays[key].tolist())
        splits[name] = columns.map(
            tokenize,
            batched=True,
            remove_columns=[hp.text_column],
            desc=f"tokenizing {name}",
            num_proc=workers if workers > 1 else None,
            fn_kwargs=tokenize_kwargs(tokenizer, hp),
        )
    splits.save_to_disk(out)
    (Path(out) / "dropped.json").write_text(json.dumps(messages))
