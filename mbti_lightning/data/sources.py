"""Reading sources: the training data (hub, local files or the demo corpus) and predict files."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.utilities import rank_zero_warn

from mbti_lightning import demo
from mbti_lightning.data.tokenized import tokenize
from mbti_lightning.errors import UserError


def where(hp: AttributeDict) -> str:
    """The data's name in messages: the data set and its files."""
    return " ".join(str(x) for x in (hp.dataset, hp.data_files) if x)


def read(builder: str, files, split: str | None, revision: str | None = None) -> Dataset | DatasetDict:
    """`load_dataset(builder, data_files=files, split=split, revision=revision)`; a local file that cannot be parsed (not UTF-8,
    not the format) is named in a ValueError. Every file the project reads as a table comes through here."""
    try:
        return load_dataset(builder, data_files=files, split=split, revision=revision)
    except FileNotFoundError as err:  # a local file, or a hub data set, that is not there
        raise UserError(f"data {builder} {files or ''} not found: {err}".replace("  ", " ")) from None
    except Exception as err:  # datasets wraps a parser's error in its own
        if files is None:
            raise
        cause = err.__cause__ or err
        raise UserError(f"could not read {files} as {builder}: {type(cause).__name__}: {cause}") from err


def load_raw(hp: AttributeDict) -> Dataset | DatasetDict:
    """The source data (`data.dataset`, `data.data_files`, or the demo corpus), checked for its columns."""
    builder, files = ("parquet", str(demo.corpus_path())) if hp.dataset == demo.DEMO else (hp.dataset, hp.data_files)
    raw = read(builder, files, None if hp.split == "predefined" else hp.dataset_split, hp.revision)
    for part in raw.values() if isinstance(raw, DatasetDict) else [raw]:
        label_columns = [hp.type_column] if hp.type_column else list(hp.axis_columns.values())
        for column in (hp.text_column, *label_columns):
            if column not in part.column_names:
                raise UserError(
                    f"column {column!r} not found in {where(hp)}; it has {part.column_names}. "
                    "Set data.text_column / data.type_column / data.axis_columns."
                )
    return raw


def read_predict_file(hp: AttributeDict, heads: dict, tokenize_kwargs: dict) -> tuple[Dataset, dict[str, list]]:
    """The predict file's texts, exploded and masked as in training and tokenized, and per text its ``id``,
    ``text``, ``author`` (the author column, else the source row's id) and, when exploded, ``post``
    (its number within the source row, from 0)."""
    path = Path(hp.predict_file)
    if not path.is_file():
        raise UserError(f"data.predict_file {path} not found")
    if path.suffix == ".txt":
        try:
            texts: list = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise UserError(f"could not read {path} as text: {type(err).__name__}: {err}") from None
        ids = authors = list(range(1, len(texts) + 1))
    elif path.suffix in (".csv", ".jsonl", ".json"):
        ds = read("csv" if path.suffix == ".csv" else "json", str(path), "train")
        if hp.text_column not in ds.column_names:
            raise UserError(
                f"column {hp.text_column!r} not found in {path}; it has {ds.column_names}. Set data.text_column."
            )
        texts = ds[hp.text_column][:]
        ids = ds["id"][:] if "id" in ds.column_names else list(range(len(ds)))
        authors = ds[hp.author_column][:] if hp.author_column in ds.column_names else ids
        # A row without an author is a person of its own, named by its id (not one person with every such row).
        authors = [a if a is not None and str(a).strip() else i for a, i in zip(authors, ids)]
    else:
        raise UserError(f"data.predict_file must be a .txt, .csv or .jsonl file, got {path.name}")
    rows = [(i, 0, "" if text is None else str(text)) for i, text in enumerate(texts)]
    if hp.explode_separator:
        rows = [(i, k, post) for i, _, text in rows for k, post in enumerate(text.split(hp.explode_separator))]
    empty = [ids[i] for i, _, text in rows if not text.strip()]
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        rank_zero_warn(f"{path}: skipped {len(empty)} empty texts (ids {shown})")
    rows = [row for row in rows if row[2].strip()]
    inputs = {
        "id": [ids[i] for i, _, _ in rows],
        "text": [text for _, _, text in rows],
        "author": [authors[i] for i, _, _ in rows],
    } | ({"post": [k for _, k, _ in rows]} if hp.explode_separator else {})
    no_label = [0] * len(heads) if len(heads) > 1 else 0
    author_ids = {author: n for n, author in enumerate(dict.fromkeys(inputs["author"]))}
    table = Dataset.from_dict(
        {
            hp.text_column: inputs["text"],
            "labels": [no_label] * len(rows),
            "author": [author_ids[a] for a in inputs["author"]],
        }
    )
    tokenized = table.map(
        tokenize,
        batched=True,
        remove_columns=[hp.text_column],
        desc="tokenizing predict_file",
        fn_kwargs=tokenize_kwargs,
    )
    return tokenized, inputs
