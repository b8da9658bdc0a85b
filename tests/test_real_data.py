"""Real-world data: local files in other shapes, bad rows, author-disjoint and predefined splits."""

import csv
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO

from mbti_lightning.cli import cli_main
from mbti_lightning.data import MBTIDataModule, author_split
from mbti_lightning.demo import generate_rows
from mbti_lightning.errors import UserError
from mbti_lightning.labels import AXES, TYPES
from mbti_lightning.persons import Persons
from mbti_lightning.predict import per_author, prediction_records


def make_dm(path: Path, builder: str, **kwargs) -> MBTIDataModule:
    args = dict(dataset=builder, data_files=str(path), tokenizer="demo", keep_fraction=1.0, num_workers=0)
    return MBTIDataModule(**(args | kwargs))


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def kaggle_file(path: Path, num_rows: int = 8000) -> Path:
    """Kaggle mbti_1's shape: one row per user, `type,posts`, the posts joined with |||."""
    rows = generate_rows(num_rows=num_rows, seed=3)
    users: dict[str, list] = {}
    for author, body, mbti in zip(rows["author"], rows["body"], rows["mbti"]):
        users.setdefault(author, [mbti.upper(), []])[1].append(body)
    return write_csv(path, ["type", "posts"], [[t, "|||".join(posts)] for t, posts in users.values()])


def kaggle_args(path: Path) -> list[str]:
    """The config keys for a Kaggle-shaped file: posts exploded, type mentions masked, authors split."""
    keys = {
        "dataset": "csv",
        "data_files": str(path),
        "text_column": "posts",
        "type_column": "type",
        "author_column": "null",
        "explode_separator": "|||",
        "mask_type_mentions": "true",
        "split": "author",
    }
    return [arg for key, value in keys.items() for arg in (f"--data.{key}", value)]


def axis_letter_file(path: Path, num_rows: int = 3000) -> Path:
    """One letter column per axis under other names (P/J ...) and the text in `Comment`."""
    rows = generate_rows(num_rows=num_rows, seed=4)
    names = {"E-I": "I/E", "N-S": "S/N", "F-T": "T/F", "J-P": "P/J"}
    table = {"Comment": rows["body"], "user": rows["author"]} | {names[a]: [x.lower() for x in rows[a]] for a in AXES}
    pq.write_table(pa.table(table), path)
    return path


def test_bad_rows_are_dropped_with_counts_and_row_numbers(tmp_path):
    path = write_csv(
        tmp_path / "bad.csv",
        ["body", "mbti"],
        [["hello there", "intj"], ["hi", "INTX"], ["  ", "ENFP"], ["fine", " enfp "]] * 20,
    )
    dm = make_dm(path, "csv", val_fraction=0.25)
    with pytest.warns(
        UserWarning,
        match=r"bad.csv: 40 of 80 rows are unusable; 20 rows with an empty 'body': "
        r"rows 2, 6, 10, 14, 18 and 15 more; 20 rows whose 'mbti' is not an MBTI type: "
        r"rows 1 \('INTX'\), 5 \('INTX'\)",
    ):
        dm.setup("fit")
    assert len(dm.splits["train"]) + len(dm.splits["validation"]) == 40  # the " enfp " rows are kept

    with pytest.raises(ValueError, match=r"rows 1 \('INTX'\).*set data.invalid_rows: drop"):
        make_dm(path, "csv", invalid_rows="error").setup("fit")


def test_nothing_left_after_filtering_is_an_error(tmp_path):
    path = write_csv(tmp_path / "empty.csv", ["body", "mbti"], [["", "INTJ"], ["text", "none"]])
    with pytest.raises(ValueError, match="empty.csv: no usable rows left"):
        make_dm(path, "csv").setup("fit")


def test_a_type_too_rare_to_stratify_is_pooled_and_a_class_that_cannot_be_split_still_stops(tmp_path):
    rows = [["a", "INTJ"]] * 10 + [["b", "ENFP"]] * 10 + [["c", "ESFP"]]
    dm = make_dm(write_csv(tmp_path / "rare.csv", ["body", "mbti"], rows), "csv")
    with pytest.warns(
        UserWarning,
        match=r"rare.csv: a stratified split of 21 rows \(or authors\) into 16 and 5 failed "
        r"because these classes have fewer than 2 rows \(or authors\): 'ESFP' \(1\); "
        r"so 'ESFP' \(1\), 'ENFP' \(10\) were pooled by their target letters",
    ):
        dm.setup("fit")
    assert len(dm.splits["train"]) + len(dm.splits["validation"]) == 21

    # P has a single row: it cannot be in both train and validation, and that is an error.
    path = write_csv(tmp_path / "one_p.csv", ["body", "mbti"], [["a", "INTJ"]] * 10 + [["b", "ESFP"]])
    with pytest.raises(ValueError, match=r"split of csv .*one_p.csv has no rows of class \['P'\] \(J-P\)"):
        make_dm(path, "csv").setup("fit")


@pytest.mark.parametrize("target", ["all", "mbti"])
def test_rare_types_are_pooled_by_coarser_keys_when_the_target_is_the_type(tmp_path, target):
    """For four axes or the 16-way type, the target's letters are the type itself: pooling by them only
    renamed the types and the split still stopped. Coarser keys are tried until the split works."""
    rows = [[f"text {i}", TYPES[i % 16]] for i in range(40)] + [[f"more {i}", "INTJ"] for i in range(40)]
    dm = make_dm(write_csv(tmp_path / "types.csv", ["body", "mbti"], rows), "csv", target=target, val_fraction=0.1)
    with pytest.warns(
        UserWarning, match=r"types.csv: a stratified split of 80 rows .* were pooled by their first letter"
    ):
        dm.setup("fit")
    assert len(dm.splits["train"]) + len(dm.splits["validation"]) == 80


def test_a_class_missing_from_a_split_is_named(tmp_path):
    files = {
        "train": write_csv(tmp_path / "train.csv", ["body", "mbti"], [["a", "INTJ"], ["b", "INTP"]] * 5),
        "validation": write_csv(tmp_path / "val.csv", ["body", "mbti"], [["a", "INTJ"]] * 4),
    }
    dm = MBTIDataModule(
        dataset="csv", data_files={k: str(v) for k, v in files.items()}, split="predefined", tokenizer="demo"
    )
    with pytest.raises(ValueError, match=r"the validation split of csv .* has no rows of class \['P'\] \(J-P\)"):
        dm.setup("fit")


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"could not read .*broken.parquet as parquet"):
        make_dm(path, "parquet").setup("fit")


def test_missing_author_column_for_an_author_split_is_named(tmp_path):
    path = write_csv(tmp_path / "a.csv", ["body", "mbti"], [["a", "INTJ"]])
    with pytest.raises(ValueError, match="needs the author column 'author'.*set data.author_column: null"):
        make_dm(path, "csv", split="author").setup("fit")


def test_author_split_is_disjoint_and_keeps_type_proportions():
    rows = generate_rows(num_rows=16_000, seed=1)
    authors, types = np.array(rows["author"]), np.array(rows["mbti"])
    train, val, test = author_split(
        authors, types, keep_fraction=1.0, keep_seed=0, val_fraction=0.2, val_seed=1, test_fraction=0.2
    )
    parts = [set(authors[idx]) for idx in (train, val, test)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert len(train) + len(val) + len(test) == len(authors)
    assert [round(len(p) / len(set(authors)), 2) for p in parts] == [0.6, 0.2, 0.2]

    def shares(idx):  # share of each type among the authors of a split
        first = {a: t for a, t in zip(authors[idx], types[idx])}
        return {t: n / len(first) for t, n in Counter(first.values()).items()}

    everyone = shares(np.arange(len(authors)))
    for idx in (train, val, test):
        assert max(abs(shares(idx).get(t, 0) - s) for t, s in everyone.items()) < 0.02


def test_kaggle_file_explodes_into_posts_with_the_row_as_author(tmp_path):
    path = kaggle_file(tmp_path / "mbti_1.csv")
    users = sum(1 for _ in csv.reader(path.open())) - 1
    dm = make_dm(
        path,
        "csv",
        text_column="posts",
        type_column="type",
        author_column=None,
        explode_separator="|||",
        split="author",
        keep_fraction=1.0,
        test_fraction=0.2,
    )
    dm.setup("fit")
    assert sum(len(s) for s in dm.splits.values()) == 8000  # every post, once
    authors = {name: set(s["author"][:]) for name, s in dm.splits.items()}
    assert sum(len(a) for a in authors.values()) == users
    assert not authors["train"] & authors["validation"] and not authors["train"] & authors["test"]


def test_axis_letter_columns_under_other_names(tmp_path):
    path = axis_letter_file(tmp_path / "letters.parquet")
    dm = make_dm(
        path,
        "parquet",
        text_column="Comment",
        type_column=None,
        author_column="user",
        target="J-P",
        axis_columns={"E-I": "I/E", "N-S": "S/N", "F-T": "T/F", "J-P": "P/J"},
    )
    dm.setup("fit")
    rows = generate_rows(num_rows=3000, seed=4)
    expected = Counter(rows["J-P"])
    got = Counter(AXES["J-P"][x] for s in dm.splits.values() for x in s["labels"][:])
    assert got == expected  # lower-case letters were read as J / P, no row lost


def test_predefined_splits_are_used_as_they_are(tmp_path):
    rows = generate_rows(num_rows=600, seed=5)
    files = {}
    for name, part in {"train": slice(0, 400), "dev": slice(400, 500), "test": slice(500, 600)}.items():
        files[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.table({k: v[part] for k, v in rows.items()}), files[name])
    dm = MBTIDataModule(dataset="parquet", data_files=files, split="predefined", tokenizer="demo")
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 400, "validation": 100, "test": 100}


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["kaggle", "axis letters"])
def test_other_file_shapes_train_through_the_cli(shape, tmp_path, monkeypatch):
    """Config keys only: a Kaggle-shaped csv, and a parquet file with P/J-style letter columns and `Comment`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mbti-lightning"])
    if shape == "kaggle":
        data = kaggle_args(kaggle_file(tmp_path / "mbti_1.csv"))
    else:
        data = [
            "--data.dataset",
            "parquet",
            "--data.data_files",
            str(axis_letter_file(tmp_path / "l.parquet", 8000)),
            "--data.text_column",
            "Comment",
            "--data.type_column",
            "null",
            "--data.author_column",
            "user",
            "--data.axis_columns",
            '{"E-I": "I/E", "N-S": "S/N", "F-T": "T/F", "J-P": "P/J"}',
        ]
    cli_main(
        [
            "fit",
            "--config",
            str(REPO / "configs/demo.yaml"),
            "--data.keep_fraction",
            "1.0",
            "--trainer.max_epochs",
            "1",
            "--trainer.val_check_interval",
            "100",
            *data,
        ]
    )

    (metrics,) = (tmp_path / "logs/demo").glob("version_*/metrics.csv")
    final = [row for row in csv.DictReader(metrics.open()) if row["val/mcc"]][-1]
    assert float(final["val/mcc"]) > 0.3 and float(final["val/author/mcc"]) > 0.3
    assert float(final["val/majority_acc"]) > 0.5 and float(final["val/author/count"]) > 100
    assert list((tmp_path / "checkpoints/demo").glob("best-*.ckpt"))


def small_kaggle_file(path: Path) -> Path:
    """99 users in Kaggle's shape (`type,posts`), as people collect them: skewed, one user the only ISTJ."""
    rows = generate_rows(num_rows=900, seed=11)
    users: dict[str, list] = {}
    for author, body, mbti in zip(rows["author"], rows["body"], rows["mbti"]):
        users.setdefault(author, [mbti.upper(), []])[1].append(body)
    table = list(users.values())[:99]
    for user in table:
        user[0] = "INTJ" if user[0] == "ISTJ" else user[0]
    table[-1][0] = "ISTJ"
    return write_csv(path, ["type", "posts"], [[t, "|||".join(posts)] for t, posts in table])


def test_per_author_probabilities_add_up_the_posts_evidence_and_count_the_prior_once():
    # Posts of authors "b", "a", "b" (in that order), with log-odds of P of 2, -1 and 0.
    log_odds = torch.tensor([2.0, -1.0, 0.0])
    log_probs = torch.stack([torch.zeros(3), log_odds], 1).log_softmax(-1)
    names, counts, probs = per_author(["b", "a", "b"], {"J-P": log_probs})  # scores with a uniform prior
    assert names == ["b", "a"] and counts.tolist() == [2, 1]
    assert probs["J-P"][:, 1].tolist() == pytest.approx(torch.sigmoid(torch.tensor([2.0, -1.0])).tolist())
    # Scores that carry a prior of log-odds 1 toward P: each post's evidence is its log-odds less 1, the prior once.
    prior = torch.tensor([0.0, 1.0]).log_softmax(-1)
    _, _, probs = per_author(["b", "a", "b"], {"J-P": log_probs}, {"J-P": Persons(prior)})
    assert probs["J-P"][:, 1].tolist() == pytest.approx(torch.sigmoid(torch.tensor([1.0, -1.0])).tolist())
    (b, a) = prediction_records({"J-P": ("J", "P")}, probs)
    assert (b["J-P"], a["J-P"]) == ("P", "J")


@pytest.mark.slow
def test_a_small_skewed_kaggle_file_trains_by_author_and_predicts_a_type_per_person(tmp_path, monkeypatch):
    """Config keys only: 99 users, one the only ISTJ; the author split pools that type with a warning,
    training logs author-level metrics, and predict gives one row per user from their posts' evidence added up."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mbti-lightning"])
    path = small_kaggle_file(tmp_path / "users.csv")
    data = ["--config", str(REPO / "configs/demo.yaml"), *kaggle_args(path), "--data.keep_fraction", "1.0"]
    with pytest.warns(UserWarning) as warned:  # the demo's val_check_interval (100) is longer than an epoch here
        cli_main(["fit", *data, "--trainer.max_epochs", "2"])
    messages = "\n".join(str(w.message) for w in warned)
    assert re.search(r"because these classes have fewer than 2 rows \(or authors\): .*'ISTJ' \(1\)", messages)
    assert re.search(
        r"val_check_interval \(100\) is longer than an epoch \(23 training batches\); validating at", messages
    )
    (metrics,) = (tmp_path / "logs/demo").glob("version_*/metrics.csv")
    validated = [row for row in csv.DictReader(metrics.open()) if row["val/mcc"]]
    assert [int(row["epoch"]) for row in validated] == [0, 1]
    final = validated[-1]
    assert float(final["val/author/count"]) == 20 and final["val/author/mcc"] and final["val/author/majority_acc"]
    assert list(Path("checkpoints/demo").glob("best-*.ckpt"))

    predict = ["predict", *data, "--ckpt_path", "checkpoints/demo/last.ckpt", "--data.predict_file", str(path)]
    cli_main([*predict, "--predictions.output", "posts.csv"])
    cli_main([*predict, "--predictions.output", "people.csv", "--predictions.per", "author"])
    people = list(csv.DictReader(open("people.csv")))
    posts = list(csv.DictReader(open("posts.csv")))
    sources = list(csv.DictReader(path.open()))
    assert [row["author"] for row in people] == [str(i) for i in range(99)]  # each source row is a person, in order
    assert [int(row["posts"]) for row in people] == [len(row["posts"].split("|||")) for row in sources]
    for person in people:  # by hand: the sum of the posts' log-odds of P (class-balanced weights: a uniform prior)
        p = torch.tensor(
            [
                float(r["J-P_prob"]) if r["J-P"] == "P" else 1 - float(r["J-P_prob"])
                for r in posts
                if r["id"] == person["author"]
            ]
        )
        prob_p = torch.sigmoid(torch.log(p / (1 - p)).sum()).item()  # posts' probabilities rounded to 4 decimals
        assert float(person["J-P_prob"]) == pytest.approx(max(prob_p, 1 - prob_p), abs=5e-3)
        assert person["J-P"] == ("P" if prob_p > 0.5 else "J")


def test_a_split_that_fails_says_which_rows_were_dropped_first(tmp_path):
    path = write_csv(tmp_path / "typos.csv", ["body", "mbti"], [["a", "XXXX"], ["b", "QQQQ"], ["c", "INTJ"]])
    with pytest.raises(ValueError, match=r"cannot make a stratified split.*typos.csv: 2 of 3 rows are unusable"):
        make_dm(path, "csv").setup("fit")


@pytest.mark.parametrize("suffix", [".csv", ".txt"])
def test_a_predict_file_that_is_not_utf8_is_named_as_a_training_file_is(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes("body\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"could not read .*latin1{suffix} as .*UnicodeDecodeError"):
        make_dm(path, "csv", predict_file=str(path)).setup("predict")


def test_a_hub_data_sets_revision_reaches_load_dataset_and_the_cache_key(monkeypatch):
    from mbti_lightning.data.sources import load_raw
    from mbti_lightning.data.tokenized import preprocessing_args

    seen = {}

    def fake_load_dataset(name, **kwargs):
        seen.update(kwargs, name=name)
        raise FileNotFoundError("stop here")

    monkeypatch.setattr("mbti_lightning.data.sources.load_dataset", fake_load_dataset)
    dm = MBTIDataModule(dataset="minhaozhang/mbti", revision="abc123", tokenizer="demo")
    with pytest.raises(UserError, match="data minhaozhang/mbti not found: stop here"):
        load_raw(dm.hparams)
    assert seen["name"] == "minhaozhang/mbti" and seen["revision"] == "abc123"
    assert preprocessing_args(dm.hparams)["revision"] == "abc123"


def test_the_baseline_decodes_in_batches_and_caps_its_training_rows(corpus_file, monkeypatch, caplog):
    from mbti_lightning import baseline
    from mbti_lightning.data.tokenized import decode

    dm = make_dm(corpus_file, "parquet")
    dm.setup("fit")
    ids = dm.splits["validation"]["input_ids"][:]
    assert list(decode(dm.splits["validation"], dm.tokenizer, batch_size=7)) == dm.tokenizer.batch_decode(
        ids, skip_special_tokens=True
    )
    monkeypatch.setattr(baseline, "MAX_TRAIN_ROWS", 500)
    with caplog.at_level("INFO"):
        preds = baseline.fit_predict(dm, ("validation",))["validation"]
    assert f"fitted on a random 500 of the {len(dm.splits['train']):,} training rows" in caplog.text
    assert preds.shape == (len(ids), 1)


def test_dropped_posts_of_one_row_are_counted_not_listed(tmp_path):
    users = [["INTJ", "a plan|||a list"], ["ENFP", "||||||||||||"], ["INTP", "x|||y"], ["ENTP", "z|||w"]] * 5
    path = write_csv(tmp_path / "users.csv", ["type", "posts"], users)
    args = dict(text_column="posts", type_column="type", author_column=None, explode_separator="|||", val_fraction=0.5)
    with pytest.warns(UserWarning, match=r"25 rows with an empty 'posts': rows 1 \(5 posts\), 5 \(5 posts\)"):
        make_dm(path, "csv", **args).setup("fit")


@pytest.mark.parametrize(
    ("split", "fix"),
    [("seed", "rows the seed split discards: set data.keep_fraction below 1"), ("author", "set data.test_fraction")],
)
def test_a_missing_test_split_says_what_to_do_for_the_split_in_use(corpus_file, split, fix):
    dm = make_dm(corpus_file, "parquet", split=split)  # keep_fraction 1.0: nothing is left over for testing
    dm.setup("test")
    with pytest.raises(ValueError, match=rf"has no test split with data.split '{split}'; .*{fix}"):
        dm.test_dataloader()
