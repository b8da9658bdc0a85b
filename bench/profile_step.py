"""Where a training step's time goes: the HF model alone, the optimizer alone, then the Lightning path.

Uses the workload of bench/throughput.py (random-init Phi-3-mini shapes; `--tiny` on CPU).

    python bench/profile_step.py [--config configs/phi3_jp.yaml] [--tiny]

Prints milliseconds per forward+backward (with and without the padding mask), per Lightning
micro-batch, and the top operators of a few profiled Lightning steps. (The optimizer step alone:
bench/optimizer_step.py.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import throughput  # noqa: E402  (the shared workload)


def timed(fn, repeat: int) -> float:
    """Mean milliseconds of `fn` over `repeat` calls after one warm-up call."""
    fn()
    throughput.sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    throughput.sync()
    return 1000 * (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/phi3_jp.yaml")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    model_dir, corpus = throughput.workload(args.tiny)
    from mbti_lightning.cli import cli_main

    sys.argv = sys.argv[:1]
    (throughput.REPO / "bench/out").mkdir(parents=True, exist_ok=True)
    os.chdir(throughput.REPO / "bench/out")  # where Lightning writes its config.yaml
    cli = cli_main(
        [
            "--config",
            str(throughput.REPO / args.config),
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
            "--trainer.limit_val_batches",
            "0",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.logger",
            "false",
            "--trainer.max_steps",
            "8",
            "--checkpoint.save_top_k",
            "0",
            "--checkpoint.save_last",
            "false",
        ]
        + (["--trainer.accelerator", "cpu"] if args.tiny else []),
        run=False,
    )
    module, dm = cli.model, cli.datamodule
    dm.setup("fit")
    device = throughput.device()
    batches = [
        {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        for _, b in zip(range(4), dm.train_dataloader())
    ]
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        module.configure_model()
        torch.set_default_dtype(torch.float32)
    model = module.model.train()
    print("dtype", next(model.parameters()).dtype, "shapes", [tuple(b["input_ids"].shape) for b in batches], flush=True)

    def fwd_bwd(mask: bool, cache: bool) -> None:
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"] if mask else None, use_cache=cache)
            F.cross_entropy(out.logits.float(), b["labels"]).backward()

    for mask in (False, True):
        for cache in (False, True):
            ms = timed(lambda mask=mask, cache=cache: fwd_bwd(mask, cache), 2) / len(batches)
            print(f"forward+backward per micro-batch: mask={mask} use_cache={cache}: {ms:.1f} ms", flush=True)

    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache() if device == "cuda" else None

    clock = throughput.Clock(warmup_batches=4)
    cli.trainer.callbacks.append(clock)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else []
    )
    with torch.profiler.profile(
        activities=activities, schedule=torch.profiler.schedule(wait=6, warmup=2, active=4)
    ) as prof:
        cli.trainer.callbacks.append(_Stepper(prof))
        cli.trainer.fit(module, dm)
    syncs = clock.syncs.stop()
    throughput.sync()
    per_batch = 1000 * (time.perf_counter() - clock.start) / (clock.batches - 4)
    print(f"Lightning micro-batch incl. optimizer share (profiled for 4 of them): {per_batch:.1f} ms", flush=True)
    if syncs is not None:
        print(f"device synchronisations per micro-batch: {syncs / (clock.batches - 4):.2f}", flush=True)
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=22, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


class _Stepper(L.Callback):
    def __init__(self, prof) -> None:
        self.prof = prof

    def on_train_batch_end(self, *args) -> None:
        self.prof.step()


if __name__ == "__main__":
    main()
