"""Training throughput: the seed recipe (HF Trainer) against this project's presets, in one run.

A synthetic workload with the shapes of the real one: random-init Phi-3-mini (from `Phi3Config`, no
download; `--tiny` uses a 2-layer model on CPU) and rows of 150-290 tokens, like minhaozhang/mbti.
Every variant trains on one fixed subset of the tokenized rows (`--samples` rows): one whole pass to
warm up, not timed, then `--passes` whole passes, timed. So every variant times exactly the same rows
and real tokens (the JSON records them, and a ratio whose two sides timed different tokens says so):
a ratio of real tokens/s is a ratio of times for the same work. Each variant runs in its own process,
so peak memory is its own and an out-of-memory ends only that variant.

    python bench/throughput.py                 # GPU: seed vs configs/phi3_jp.yaml and phi3_jp_40gb.yaml
    python bench/throughput.py --tiny          # CPU smoke run, a few minutes

A `peer CONFIG [overrides]` variant is HF `Trainer` with the *same* settings as that config's
variant (batch size, accumulation, length grouping, optimizer, precision, padding mask), so that
the ratio between the two (printed on the line `same-settings ratio:`) measures the frameworks'
overhead rather than the seed's small batches.

Prints, per variant: samples/s, real (non-pad) tokens/s, pad share, peak GPU memory (allocated, as
anchors.md measures it; and reserved by PyTorch's caching allocator, what a card must hold), MFU as defined
in anchors.md ((6 x non-embedding params + 12 x layers x hidden x 220) x real tokens/s / peak), the
device synchronisations per timed micro-batch (PyTorch's sync debug mode; each one stops the CPU
from queueing work ahead of the GPU), and each preset's ratio of real tokens/s to the seed's.
Writes the same as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ["seed", "peer configs/phi3_jp.yaml", "configs/phi3_jp.yaml", "configs/phi3_jp_40gb.yaml"]
PEER = "HF Trainer, same settings"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="2-layer model on CPU: a smoke run")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=DEFAULT_VARIANTS,
        help="'seed' or a config path, optionally followed by CLI overrides in one string",
    )
    parser.add_argument(
        "--samples", type=int, help="rows in the subset every variant trains on (default 1024; tiny 256)"
    )
    parser.add_argument("--passes", type=int, default=2, help="timed passes over the subset, after one untimed pass")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak for MFU (anchors.md)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/out/throughput.json")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args(argv)
    args.samples = args.samples or (256 if args.tiny else 1024)
    return args


# --------------------------------------------------------------------------- the workload


def workload(tiny: bool) -> tuple[Path, Path]:
    """A model folder (the demo tokenizer + a Phi-3 config) and a parquet corpus of 150-290-token rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer, Phi3Config

    from mbti_lightning import demo
    from mbti_lightning.cache import build_atomically, cache_root

    name = "tiny" if tiny else "phi3-mini"
    tokenizer_dir = demo.model_dir()

    def build_model(tmp: Path) -> None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
        shape = (
            dict(
                hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
            )
            if tiny
            else {}
        )
        # Phi-3-mini-4k: vocab 32064, hidden 3072, 32 layers; token ids stay below the demo's 1024.
        Phi3Config(pad_token_id=None, sliding_window=2047, **shape).save_pretrained(tmp)

    def build_corpus(tmp: Path) -> None:
        rng = random.Random(0)
        rows = demo.generate_rows(num_rows=4096, seed=1)
        words = " ".join(rows["body"]).split()
        # Most demo words are one token; aim each body at a length drawn from 150-290 tokens.
        rows["body"] = [" ".join(rng.choices(words, k=rng.randint(150, 290) - 12)) for _ in rows["body"]]
        pq.write_table(pa.table(rows), tmp / "train.parquet")

    root = cache_root() / f"bench-{demo.VERSION}"
    corpus = build_atomically(root / "corpus", build_corpus) / "train.parquet"
    return build_atomically(root / f"model-{name}", build_model), corpus


def datamodule(model_dir: Path, corpus: Path):
    """The project's DataModule over the workload; its train split is what every variant trains on."""
    from mbti_lightning.data import MBTIDataModule

    dm = MBTIDataModule(
        dataset="parquet",
        data_files=str(corpus),
        tokenizer=str(model_dir),
        keep_fraction=1.0,
        val_fraction=0.05,
        num_workers=0,
    )
    dm.setup("fit")
    return dm


def flops_per_token(config) -> float:
    """anchors.md: 6 x non-embedding params + 12 x layers x hidden x 220 (the mean length)."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    params = sum(p.numel() for p in model.parameters()) - config.vocab_size * config.hidden_size
    return 6 * params + 12 * config.num_hidden_layers * config.hidden_size * 220


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class SyncCounter:
    """Counts the synchronising CUDA calls that PyTorch's sync debug mode reports between start and stop."""

    def start(self) -> None:
        if torch.cuda.is_available():
            self._catching = warnings.catch_warnings(record=True)
            self._records = self._catching.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> int | None:
        if not torch.cuda.is_available():
            return None
        torch.cuda.set_sync_debug_mode("default")
        self._catching.__exit__(None, None, None)
        return sum("synchroniz" in str(w.message) for w in self._records)


# --------------------------------------------------------------------------- (a) the seed recipe


def run_hf_trainer(
    args: argparse.Namespace,
    name: str,
    dm,
    model_dir: Path,
    batch: int,
    accumulation: int,
    dtype: torch.dtype = torch.float32,
    skip_padding_mask: bool = False,
    use_cache: bool = True,
    pad_to_multiple_of: int | None = None,
    **training_args,
) -> dict:
    """HF Trainer on the subset's rows with the seed's class-weighted loss (its CustomTrainer), timed over the
    passes after the first; `training_args` go to TrainingArguments."""
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    train = subset(dm, args)
    rows = [{"input_ids": ids, "labels": y} for ids, y in zip(train["input_ids"][:], train["labels"][:])]
    counts = {"samples": 0, "real": torch.zeros((), dtype=torch.long, device=device()), "padded": 0}
    clock, syncs = {}, SyncCounter()

    class WeightedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels, mask = inputs.pop("labels"), inputs.pop("attention_mask")
            if clock:  # (collating runs in the loader's worker processes)
                counts["samples"] += len(labels)
                counts["real"] += mask.sum()
                counts["padded"] += mask.numel()
            # As the project's option: without the mask, pooling finds the last real token from the ids.
            outputs = model(**inputs, attention_mask=None if skip_padding_mask else mask)
            weight = torch.tensor([0.6, 0.4], device=labels.device)
            loss = torch.nn.functional.cross_entropy(outputs.logits.float(), labels, weight=weight)
            return (loss, outputs) if return_outputs else loss

    class Clock(TrainerCallback):
        def on_epoch_begin(self, args_, state, control, **kwargs):
            if round(state.epoch) == 1:  # the second pass: the first warmed up
                sync()
                clock["start"] = time.perf_counter()
                syncs.start()

    config = AutoConfig.from_pretrained(
        model_dir,
        num_labels=2,
        id2label={0: "J", 1: "P"},
        label2id={"J": 0, "P": 1},
        pad_token_id=dm.tokenizer.pad_token_id,
        use_cache=use_cache,
    )
    torch.manual_seed(0)
    with torch.device(device()):
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    training_args = TrainingArguments(
        output_dir=str(REPO / "bench/out/hf_trainer"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=1 + args.passes,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10**6,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=42,
        remove_unused_columns=False,
        **training_args,
    )
    collate = DataCollatorWithPadding(dm.tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    trainer = WeightedTrainer(
        model=model, args=training_args, train_dataset=rows, data_collator=collate, callbacks=[Clock()]
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    sync_count = syncs.stop()
    sync()
    seconds = time.perf_counter() - clock["start"]
    real = int(counts["real"])
    return measurement(
        name, args, config, seconds, counts["samples"], real, counts["padded"], sync_count, counts["samples"] // batch
    )


def subset(dm, args: argparse.Namespace):
    """The fixed rows every variant trains on: the first `--samples` rows of the training split."""
    train = dm.splits["train"]
    if len(train) < args.samples:
        raise ValueError(f"--samples {args.samples} is more than the {len(train)} training rows")
    return train.select(range(args.samples))


def run_seed(args: argparse.Namespace, model_dir: Path, corpus: Path) -> dict:
    """The seed's CustomTrainer and TrainingArguments (seed/tutorial.md), with eval and saving off."""
    return run_hf_trainer(
        args,
        "seed: HF Trainer, fp32 + tf32, bnb AdamW8bit, batch 4 x accumulation 2",
        datamodule(model_dir, corpus),
        model_dir,
        batch=4,
        accumulation=2,
        learning_rate=2e-5,
        weight_decay=0.01,
        optim="adamw_bnb_8bit",
        tf32=torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def run_peer(args: argparse.Namespace, variant: str, model_dir: Path, corpus: Path) -> dict:
    """HF Trainer with the settings of the project's `variant` (a config and overrides), as a user of
    transformers alone would set them: same rows, batch size, accumulation, length grouping, optimizer,
    precision and padding mask; the seed's weighted loss."""
    cli = project_cli(args, variant, model_dir, corpus)
    dm, hp, precision = cli.datamodule, cli.model.hparams, str(cli.trainer.precision)
    dm.setup("fit")
    batch, accumulation = dm.hparams.batch_size, cli.trainer.accumulate_grad_batches
    name = f"{PEER} as {variant}: {precision}, batch {batch} x accumulation {accumulation}"
    return run_hf_trainer(
        args,
        name,
        dm,
        model_dir,
        batch,
        accumulation,
        dtype=torch.bfloat16 if precision == "bf16-true" else torch.float32,
        skip_padding_mask=hp.skip_padding_mask,
        use_cache=False,  # as the project's model config
        pad_to_multiple_of=dm.hparams.pad_to_multiple_of,
        learning_rate=hp.learning_rate,
        weight_decay=hp.weight_decay,
        train_sampling_strategy="group_by_length" if dm.hparams.group_by_length else "random",
        optim="adamw_bnb_8bit" if hp.optimizer == "adamw8bit" else "adamw_torch",
        bf16=precision == "bf16-mixed",
        tf32=torch.cuda.is_available() and hp.tf32,
        max_grad_norm=cli.trainer.gradient_clip_val or 0.0,
        dataloader_num_workers=dm.hparams.num_workers,
    ) | {"peer_of": variant}


# --------------------------------------------------------------------------- (b) the project's code path


def project_cli(args: argparse.Namespace, variant: str, model_dir: Path, corpus: Path):
    """The CLI built (not run) from a variant: a config file and overrides, on the workload."""
    from mbti_lightning.cli import cli_main

    config_path, *overrides = shlex.split(variant)
    sys.argv = sys.argv[:1]  # the CLI reads `args` below, not this script's flags
    return cli_main(
        [
            "--config",
            str(REPO / config_path),
            "--model.model_name_or_path",
            str(model_dir),
            "--model.from_scratch",
            "true",
            "--data.dataset",
            "parquet",
            "--data.data_files",
            str(corpus),
            "--data.keep_fraction",
            "1.0",
            "--data.val_fraction",
            "0.05",
            "--data.num_workers",
            "2",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.logger",
            "false",
            "--trainer.max_epochs",
            "-1",
            "--checkpoint.save_top_k",
            "0",
            "--checkpoint.save_last",
            "false",
            "--seed_everything",
            "0",
            *(["--trainer.accelerator", "cpu"] if args.tiny else []),
            *overrides,
        ],
        run=False,
    )


def run_config(args: argparse.Namespace, variant: str, model_dir: Path, corpus: Path) -> dict:
    """DataModule + LightningModule + Lightning Trainer, built by the CLI from a config file."""
    cli = project_cli(args, variant, model_dir, corpus)
    dm, trainer = cli.datamodule, cli.trainer
    dm.setup("fit")  # fit's own setup then keeps the subset
    dm.splits["train"] = subset(dm, args)
    trainer.fit_loop.max_epochs = 1 + args.passes
    clock = Clock()
    trainer.callbacks.append(clock)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(cli.model, dm)
    sync_count = clock.syncs.stop()
    sync()
    name = f"{variant}: precision {trainer.precision}, batch {dm.hparams.batch_size} x accumulation {trainer.accumulate_grad_batches}"
    return measurement(
        name,
        args,
        cli.model.model.config,
        time.perf_counter() - clock.start,
        clock.samples,
        clock.real,
        clock.padded,
        sync_count,
        clock.batches,
    ) | {"config": variant}


class Clock(L.Callback):
    """Times the passes after the first, counting micro-batches, samples and real/padded tokens."""

    def __init__(self) -> None:
        self.start, self.batches, self.samples, self.real, self.padded = None, 0, 0, 0, 0
        self.syncs = SyncCounter()

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:  # the second pass: the first warmed up
            sync()
            self.start = time.perf_counter()
            self.syncs.start()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += self.start is not None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.samples += len(batch["labels"])
            self.real += batch["num_tokens"]
            self.padded += batch["input_ids"].numel()


def measurement(
    name: str, args, config, seconds: float, samples: int, real: int, padded: int, syncs: int | None, batches: int
) -> dict:
    cuda = torch.cuda.is_available()
    return {
        "variant": name,
        "timed_samples": samples,
        "timed_real_tokens": real,
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 2),
        "real_tokens_per_s": round(real / seconds, 1),
        "pad_share": round(1 - real / padded, 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "mfu_pct": round(100 * flops_per_token(config) * real / seconds / (args.peak_tflops * 1e12), 2)
        if cuda
        else None,
        "syncs_per_batch": None if syncs is None else round(syncs / batches, 2),
    }


# --------------------------------------------------------------------------- orchestration


def same_settings_ratios(results: list[dict]) -> dict[str, list[float]]:
    """Per config: the project's real tokens/s over its HF Trainer peer's, for each peer and the run of its
    config that follows it (list `peer X, X` repeatedly to get several pairs: a machine is noisy). Both sides
    timed the same rows; a pair that timed different real tokens is left out, with a warning."""
    ratios: dict[str, list[float]] = {}
    for i, peer in enumerate(results):
        if "peer_of" not in peer or "error" in peer:
            continue
        later = [r for r in results[i + 1 :] + results[:i] if r.get("config") == peer["peer_of"] and "error" not in r]
        if not later:
            continue
        if later[0]["timed_real_tokens"] != peer["timed_real_tokens"]:
            warnings.warn(
                f"{peer['peer_of']}: the project timed {later[0]['timed_real_tokens']} real tokens and its peer "
                f"{peer['timed_real_tokens']}; that pair is left out",
                stacklevel=2,
            )
            continue
        ratios.setdefault(peer["peer_of"], []).append(later[0]["real_tokens_per_s"] / peer["real_tokens_per_s"])
    return ratios


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    model_dir, corpus = workload(args.tiny)
    if args.worker:
        (REPO / "bench/out").mkdir(parents=True, exist_ok=True)
        os.chdir(REPO / "bench/out")  # where Lightning writes its config.yaml
        if args.worker == "seed":
            result = run_seed(args, model_dir, corpus)
        elif args.worker.startswith("peer "):
            result = run_peer(args, args.worker.removeprefix("peer "), model_dir, corpus)
        else:
            result = run_config(args, args.worker, model_dir, corpus)
        print("RESULT " + json.dumps(result), flush=True)
        return [result]

    results = []
    for variant in args.variants:
        command = [
            sys.executable,
            __file__,
            "--worker",
            variant,
            "--samples",
            str(args.samples),
            "--passes",
            str(args.passes),
            "--peak-tflops",
            str(args.peak_tflops),
        ] + (["--tiny"] if args.tiny else [])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            result = json.loads(lines[-1][7:]) if lines else {"variant": variant, "error": done.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            result = {"variant": variant, "error": f"timed out after {args.timeout} s"}
        results.append(result)
        print(json.dumps(result), flush=True)

    seed = next((r for r in results if r["variant"].startswith("seed") and "error" not in r), None)
    for result in results:
        if seed and "error" not in result:
            result["ratio_vs_seed"] = round(result["real_tokens_per_s"] / seed["real_tokens_per_s"], 2)
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "samples": args.samples,
        "passes": args.passes,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(
        f"\n{'variant':<90} {'samples/s':>9} {'real tok/s':>10} {'pad':>6} {'peak GiB':>8} {'reserved':>8} {'MFU %':>6} {'syncs':>5} {'ratio':>6}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<90} ERROR: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
        else:
            print(
                f"{r['variant'][:90]:<90} {r['samples_per_s']:>9} {r['real_tokens_per_s']:>10} {r['pad_share']:>6} "
                f"{r['peak_gib'] or '-':>8} {r['peak_reserved_gib'] or '-':>8} {r['mfu_pct'] or '-':>6} {'-' if r['syncs_per_batch'] is None else r['syncs_per_batch']:>5} "
                f"{r.get('ratio_vs_seed', '-'):>6}"
            )
    for config, ratios in same_settings_ratios(results).items():
        pairs = f"; pairs: {', '.join(f'{r:.2f}' for r in ratios)}, spread {max(ratios) - min(ratios):.2f}"
        print(f"same-settings ratio: {statistics.median(ratios):.2f} ({config} / {PEER}, real tokens/s{pairs})")
    print(f"written to {args.out}")
    return results


if __name__ == "__main__":
    main()
