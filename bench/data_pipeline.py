"""Preprocessing at full scale: the seed's data path against the DataModule, from parquet to first batch.

    python bench/data_pipeline.py [--rows 2300000]

Generates (once, cached) a corpus with the real schema and shape: author ids, bodies of 110-210
words drawn from a 40,000-word synthetic vocabulary, types in the real data's axis proportions; and
trains a 32k-vocab byte-level BPE tokenizer on a sample of it, as a stand-in for Phi-3's. Then, each
in its own process (so peak RSS is its own), it times:

  (a) the seed's path: load, class-encode the five label columns, tokenize every row, two splits;
  (b) the DataModule's setup("fit") for the same recipe, from a cold cache, to the first batch;
  (c) the same again, which reads the cache.

The raw parquet is converted to Arrow once before (a), untimed: both paths start from it. Datasets'
own transform cache is disabled in (a), (b) and (c), so a second run of the benchmark measures the
same cold work.
Prints wall time, peak RSS and rows tokenized for each, and the ratio a/b; writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_300_000)
    parser.add_argument("--out", type=Path, default=REPO / "bench/out/data_pipeline.json")
    parser.add_argument("--worker", choices=["seed", "datamodule"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def workload(rows: int) -> tuple[Path, Path]:
    """(corpus.parquet, tokenizer folder), generated once per row count and cached."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mbti_lightning.cache import build_atomically, cache_root
    from mbti_lightning.demo import SECOND_LETTER_SHARE
    from mbti_lightning.labels import AXES

    root = cache_root() / "bench-data"

    def build_corpus(tmp: Path) -> None:
        rng = np.random.default_rng(0)
        syllables = np.array([c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")])
        sizes = rng.integers(1, 4, 40_000)
        vocab = np.array(["".join(rng.choice(syllables, n)) for n in sizes])
        zipf = 1 / np.arange(1, len(vocab) + 1)
        zipf /= zipf.sum()
        n_authors = rows // 8
        letters = {
            axis: np.where(rng.random(n_authors) < SECOND_LETTER_SHARE[axis], pair[1], pair[0])
            for axis, pair in AXES.items()
        }
        with pq.ParquetWriter(
            tmp / "train.parquet",
            pa.schema(
                [("author", pa.string()), ("body", pa.string()), ("mbti", pa.string())]
                + [(axis, pa.string()) for axis in AXES]
            ),
        ) as writer:
            for start in range(0, rows, 100_000):
                n = min(100_000, rows - start)
                author = rng.integers(0, n_authors, n)
                lengths = rng.integers(110, 211, n)
                words = vocab[rng.choice(len(vocab), lengths.sum(), p=zipf)]
                bodies = [" ".join(chunk) for chunk in np.split(words, np.cumsum(lengths)[:-1])]
                columns = {axis: letters[axis][author] for axis in AXES}
                mbti = np.char.lower(
                    np.char.add(
                        np.char.add(columns["E-I"], columns["N-S"]), np.char.add(columns["F-T"], columns["J-P"])
                    )
                )
                writer.write_table(
                    pa.table(
                        {
                            "author": [f"user{a}" for a in author],
                            "body": bodies,
                            "mbti": mbti.tolist(),
                            **{k: v.tolist() for k, v in columns.items()},
                        }
                    )
                )

    def build_tokenizer(tmp: Path) -> None:
        import pyarrow.parquet as pq
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        sample = pq.read_table(corpus, columns=["body"]).slice(0, 50_000)["body"].to_pylist()
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=32_000,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(sample, trainer)
        PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="</s>",
            model_max_length=4096,
        ).save_pretrained(tmp)

    corpus = build_atomically(root / f"corpus-{rows}", build_corpus) / "train.parquet"
    return corpus, build_atomically(root / "tokenizer-32k", build_tokenizer)


def peak_rss_gib() -> float:
    """The peak resident memory of this process and of its finished children (datasets' workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 2**20, 2)  # ru_maxrss is in KiB on Linux


def run_seed(corpus: Path, tokenizer_dir: Path) -> dict:
    """seed/tutorial.md, call for call (minus the hub download)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    mbti_data = load_dataset("parquet", data_files=str(corpus), split="train")
    for column in ["mbti", "E-I", "N-S", "F-T", "J-P"]:
        mbti_data = mbti_data.class_encode_column(column)
    tokenized = mbti_data.map(lambda data: tokenizer(data["body"], truncation=True), batched=True)
    rows_tokenized = len(tokenized)
    tokenized = tokenized.train_test_split(test_size=0.1, stratify_by_column="mbti", seed=0)["test"]
    tokenized = tokenized.train_test_split(test_size=0.2, stratify_by_column="mbti", seed=1)
    first = tokenized["train"][0]
    return {
        "seconds": time.perf_counter() - start,
        "rows_tokenized": rows_tokenized,
        "train_rows": len(tokenized["train"]),
        "first_len": len(first["input_ids"]),
    }


def run_datamodule(corpus: Path, tokenizer_dir: Path) -> dict:
    from mbti_lightning.cache import cache_root
    from mbti_lightning.data import MBTIDataModule

    cache = cache_root() / "tokenized"
    cached_before = set(cache.iterdir()) if cache.exists() else set()
    start = time.perf_counter()
    dm = MBTIDataModule(
        dataset="parquet",
        data_files=str(corpus),
        tokenizer=str(tokenizer_dir),
        max_length=4096,
        batch_size=4,
        num_workers=0,
    )
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    hit = not set(cache.iterdir()) - cached_before  # a cache hit writes no new entry
    rows_tokenized = 0 if hit else sum(len(split) for split in dm.splits.values())
    return {
        "seconds": time.perf_counter() - start,
        "rows_tokenized": rows_tokenized,
        "train_rows": len(dm.splits["train"]),
        "first_batch": list(batch["input_ids"].shape),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    corpus, tokenizer_dir = workload(args.rows)
    if args.worker:
        import datasets

        # Transforms must not reuse results of an earlier run of this benchmark: both paths start cold.
        # (The DataModule's own cache is separate: (c) reads it.)
        datasets.disable_caching()
        result = (run_seed if args.worker == "seed" else run_datamodule)(corpus, tokenizer_dir)
        print("RESULT " + json.dumps(result | {"peak_rss_gib": peak_rss_gib()}), flush=True)
        return result

    from datasets import load_dataset

    from mbti_lightning.cache import cache_root

    load_dataset("parquet", data_files=str(corpus), split="train")  # Arrow conversion, shared and untimed
    tokenized_cache = cache_root() / "tokenized"

    def worker(name: str) -> dict:
        command = [sys.executable, __file__, "--worker", name, "--rows", str(args.rows)]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        return json.loads(lines[-1][7:])

    import shutil

    results = {"a_seed": worker("seed")}
    shutil.rmtree(tokenized_cache, ignore_errors=True)  # (b) starts from a cold cache
    results["b_datamodule_cold"] = worker("datamodule")
    results["c_datamodule_cached"] = worker("datamodule")
    summary = {
        "rows": args.rows,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "results": results,
        "ratio_a_over_b": round(results["a_seed"]["seconds"] / results["b_datamodule_cold"]["seconds"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    for name, r in results.items():
        print(
            f"{name:<22} {r['seconds']:>9.1f} s  peak RSS {r['peak_rss_gib']:>6.2f} GiB  rows tokenized {r['rows_tokenized']:>9,}"
        )
    print(f"ratio a/b: {summary['ratio_a_over_b']}   written to {args.out}")
    return summary


if __name__ == "__main__":
    main()
