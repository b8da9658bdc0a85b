"""Heads on a frozen backbone's features against fine-tuning, in one run (CPU; a GPU where one is lent).

Three measurements, each against its baseline in the same run:

1. **Rows/s**: a no-gradient feature pass (`features.compute`, `model.frozen`'s first step) against fine-tuning
   steps (forward, backward, AdamW) of the same model on the same rows and batch size. `--model` picks the
   backbone (default: the demo's tiny Phi-3; a local folder such as ``~/.cache/real-models/gemma-3-270m``).
2. **Heads on 100k cached features**: `mbti-lightning fit --data.target all --model.frozen {}` on `--rows` posts
   whose 1,024-wide features are already in the cache (written where `fit` looks for them, so no backbone pass
   runs): the whole command's seconds, and the head fit's own (Lightning's fit loop); beside it scikit-learn's
   `LogisticRegression` on the same features, one axis at a time, and each one's validation MCC.
3. **The demo**: `fit --config configs/demo.yaml` as shipped (a fine-tune) against the same fit with
   ``--model.frozen {}`` and the head's settings (features included, computed afresh), both in this process: the
   ratio of seconds.

    python bench/frozen.py                       # about 6 minutes on a 2-core CPU
    python bench/frozen.py --tiny                # seconds: a smoke run
    python bench/frozen.py --model ~/.cache/real-models/gemma-3-270m --skip heads demo

Writes the same as JSON to `--out/frozen.json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
AXES = ["E-I", "N-S", "F-T", "J-P"]
#: The head's settings in `frozen_demo`: what configs/frozen_minilm.yaml uses.
HEAD = ["--model.optimizer", "adamw", "--model.learning_rate", "1e-3", "--data.batch_size", "256"]


def cli(folder: Path, *args: str, env: dict | None = None) -> float:
    """Seconds `mbti-lightning ARGS` takes in `folder`, in its own process (as a user pays it)."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (folder / "log.txt").open("w") as log:
        subprocess.run(
            [sys.executable, "-m", "mbti_lightning", *args],
            cwd=folder,
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | (env or {}),
        )
    return time.perf_counter() - start


def demo_module(rows: int, model: str, max_length: int, batch_size: int):
    from mbti_lightning.data import MBTIDataModule

    dm = MBTIDataModule(
        dataset="demo", tokenizer=model, keep_fraction=min(1.0, rows / 12800), max_length=max_length,
        batch_size=batch_size, eval_batch_size=batch_size, num_workers=0,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    return dm


def rows_per_second(model_name: str, rows: int, batch_size: int, max_length: int, steps: int) -> dict:
    """Feature rows/s against fine-tuning rows/s, same model, same rows, same batch size."""
    from mbti_lightning import features
    from mbti_lightning.model import MBTIClassifier
    from mbti_lightning.optim import configure_optimizers

    demo = model_name == "demo"
    model = MBTIClassifier(model_name_or_path=model_name, from_scratch=demo, optimizer="adamw")
    model.configure_model()
    dm = demo_module(rows, model_name, max_length, batch_size)
    part = dm.splits["train"].select(range(min(rows, len(dm.splits["train"]))))
    hf = model.model

    def embed(ids):
        batch = dm.tokenizer.pad({"input_ids": ids}, pad_to_multiple_of=8, return_tensors="pt")
        return features.pooled(hf, batch["input_ids"], batch["attention_mask"], "model", None)

    with tempfile.TemporaryDirectory() as tmp:
        hf.eval()
        start = time.perf_counter()
        features.compute(embed, part, batch_size, Path(tmp) / "train.npy", "features")
        feature_s = time.perf_counter() - start
    hf.train()
    optimizer = configure_optimizers(hf, model._param_group, model.hparams, steps)["optimizer"]
    order = np.argsort(-np.asarray(part["length"][:]), kind="stable")  # the feature pass's batches, in its order
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(part), batch_size)]
    done, start = 0, time.perf_counter()
    for picked in batches[:steps]:
        rows_ = part[picked]
        batch = dm.tokenizer.pad({"input_ids": rows_["input_ids"]}, pad_to_multiple_of=8, return_tensors="pt")
        logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits.float(), torch.tensor(rows_["labels"])).backward()
        optimizer.step()
        optimizer.zero_grad()
        done += len(picked)
    tune_s = time.perf_counter() - start
    result = {
        "model": model_name,
        "rows": len(part),
        "batch_size": batch_size,
        "max_length": max_length,
        "feature_rows_per_s": round(len(part) / feature_s, 1),
        "fine_tune_rows_per_s": round(done / tune_s, 1),
        "fine_tune_rows_timed": done,
    }
    result["ratio"] = round(result["feature_rows_per_s"] / result["fine_tune_rows_per_s"], 1)
    return result


def heads_on_cached_features(rows: int, width: int, out: Path) -> dict:
    """`fit --data.target all --model.frozen {}` on `rows` training posts whose `width`-wide features are in the
    cache, and scikit-learn's `LogisticRegression` on the same features."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.linear_model import LogisticRegression

    from mbti_lightning import features
    from mbti_lightning.data import MBTIDataModule
    from mbti_lightning.demo import generate_rows
    from mbti_lightning.metrics import confusion, confusion_metrics
    from mbti_lightning.model import MBTIClassifier
    from mbti_lightning.tokenizer import load_tokenizer

    env = {"MBTI_LIGHTNING_CACHE": str(out / "cache")}
    os.environ.update(env)
    corpus = out / "corpus.parquet"  # train is 80% of it (the demo config's val_fraction 0.2)
    pq.write_table(pa.table(generate_rows(num_rows=int(rows / 0.8) + 1, seed=5)), corpus)
    # A saved backbone (random, one layer, `width` wide): `fit` loads the same weights, so the features' key is the
    # one computed here.
    backbone = out / "backbone"
    overrides = {"hidden_size": width, "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 8}
    model = MBTIClassifier(model_name_or_path="demo", target="all", from_scratch=True, config_overrides=overrides)
    model.configure_model()
    model.model.save_pretrained(backbone)
    load_tokenizer("demo").save_pretrained(backbone)
    model = MBTIClassifier(model_name_or_path=str(backbone), target="all", frozen={})
    model.configure_model()
    data = {"dataset": "parquet", "data_files": str(corpus), "target": "all", "keep_fraction": 1.0, "max_length": 128}
    dm = MBTIDataModule(tokenizer=str(backbone), num_workers=0, **data)
    dm.prepare_data()
    dm.setup("fit")
    folder = out / "cache/features" / features.key(model.model, dm.tokenized_key, model.frozen, torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    # Drawn from each row's type, as a backbone that reads it would give: a weak cue per axis in noisy dimensions.
    rng = np.random.default_rng(0)
    direction = rng.normal(size=(4, width)).astype(np.float32)
    split_data = {}
    for split in ("train", "validation"):
        labels = np.asarray(dm.splits[split]["labels"][:])
        x = (
            rng.normal(size=(len(labels), width)).astype(np.float32)
            + 0.05 * (2 * labels - 1).astype(np.float32) @ direction
        )
        np.save(folder / f"{split}.npy", x)
        split_data[split] = (x, labels)
    args = [
        "fit", "--config", str(REPO / "configs/demo.yaml"), "--model.model_name_or_path", str(backbone),
        "--model.from_scratch", "false", "--model.frozen", "{}", *[f"--data.{k}={v}" for k, v in data.items()],
        "--trainer.max_epochs", "3", "--trainer.val_check_interval", "1.0", *HEAD,
        "--data.batch_size", "1024", "--data.eval_batch_size", "8192",
    ]  # fmt: skip
    seconds = cli(out / "heads", *args, env=env)
    log = (out / "heads/log.txt").read_text()
    if "(no backbone pass)" not in log:
        raise RuntimeError(f"fit did not read the cached features:\n{log[-3000:]}")
    fit_s = float(next(line.split()[2] for line in log.splitlines() if line.startswith("head fit: ")))
    metrics = sorted((out / "heads").glob("logs/demo/version_*/metrics.csv"))[-1]
    val = [r for r in csv.DictReader(metrics.open()) if r.get("val/mcc")]
    head_mcc = {axis: round(float(val[-1][f"val/{axis}/mcc"]), 4) for axis in AXES}

    def mcc(truth: np.ndarray, votes: np.ndarray) -> float:
        return round(float(confusion_metrics(confusion(truth, votes, np.arange(len(truth)), 2).sum(0))["mcc"]), 4)

    start, sk_mcc = time.perf_counter(), {}
    (x, y), (vx, vy) = split_data["train"], split_data["validation"]
    for h, axis in enumerate(AXES):
        probe = LogisticRegression(class_weight="balanced", max_iter=100).fit(x, y[:, h])
        sk_mcc[axis] = mcc(vy[:, h], probe.predict(vx))
    sk_s = time.perf_counter() - start
    return {
        "rows": len(x),
        "width": width,
        "command_seconds": round(seconds, 1),
        "head_fit_seconds": fit_s,
        "val_mcc": head_mcc,
        "sklearn_seconds": round(sk_s, 1),
        "sklearn_val_mcc": sk_mcc,
    }


def frozen_demo(out: Path, extra: list[str]) -> dict:
    """The demo's fine-tune against the same fit on frozen features (computed afresh), in this process (Python's
    imports, 5 s here, are paid once by either): seconds of each `fit` command."""
    import shutil

    from mbti_lightning.cli import cli_main

    os.environ["MBTI_LIGHTNING_CACHE"] = str(out / "demo-cache")
    config = ["fit", "--config", str(REPO / "configs/demo.yaml"), *extra]

    def seconds(folder: Path, *args: str) -> float:
        folder.mkdir(parents=True, exist_ok=True)
        here = os.getcwd()
        os.chdir(folder)
        try:
            start = time.perf_counter()
            cli_main([*config, *args])
            return time.perf_counter() - start
        finally:
            os.chdir(here)

    seconds(out / "warm", "--trainer.max_steps", "1")  # the corpus and tokenizer, made once for both
    shutil.rmtree(out / "demo-cache/features", ignore_errors=True)
    fine_tune = seconds(out / "fine-tune")
    frozen = seconds(out / "frozen", "--model.frozen", "{}", *HEAD)
    return {"fine_tune_seconds": round(fine_tune, 1), "frozen_seconds": round(frozen, 1),
            "ratio": round(fine_tune / frozen, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="backbone for the rows/s comparison")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch in the rows/s comparison")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per post in the rows/s comparison")
    parser.add_argument("--steps", type=int, default=8, help="fine-tuning steps timed in the rows/s comparison")
    parser.add_argument("--rows", type=int, default=100_000, help="posts with cached features for the heads' fit")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true", help="a smoke run: few rows, one demo epoch")
    parser.add_argument("--skip", nargs="*", default=[], choices=["rows", "heads", "demo"])
    parser.add_argument("--out", type=Path, default=REPO / "bench/out/frozen")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if "rows" not in args.skip:
        steps = 2 if args.tiny else args.steps
        rows = steps * args.batch_size  # the same rows, in the same batches, for both
        summary["rows_per_s"] = rows_per_second(args.model, rows, args.batch_size, args.max_length, steps)
        r = summary["rows_per_s"]
        print(f"feature pass {r['feature_rows_per_s']} rows/s, fine-tuning {r['fine_tune_rows_per_s']} rows/s: "
              f"{r['ratio']}x ({r['model']}, {r['rows']} rows, batch {r['batch_size']})")  # fmt: skip
    if "heads" not in args.skip:
        rows = 2000 if args.tiny else args.rows
        h = summary["heads"] = heads_on_cached_features(rows, 64 if args.tiny else args.width, args.out)
        print(f"four axes' heads on {h['rows']} cached {h['width']}-wide features: fit {h['head_fit_seconds']} s "
              f"(the whole command {h['command_seconds']} s), val MCC {h['val_mcc']}; scikit-learn "
              f"LogisticRegression {h['sklearn_seconds']} s, val MCC {h['sklearn_val_mcc']}")  # fmt: skip
    if "demo" not in args.skip:
        extra = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "20"] if args.tiny else []
        d = summary["demo"] = frozen_demo(args.out, extra)
        print(f"demo fit: fine-tune {d['fine_tune_seconds']} s, frozen {d['frozen_seconds']} s: {d['ratio']}x")
    (args.out / "frozen.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
