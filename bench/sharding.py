"""One process, two DDP processes and two sharded (FSDP2) processes on this CPU, the same demo run each: steps/s,
and per process the peak memory and the bytes of weights and optimizer states it holds.

The demo's corpus, with a wider Phi-3 than the demo's (`--overrides`, 25M weights by default) so that weights and
AdamW's states (fp32: 16 bytes a weight) are a visible part of a process's memory; random batches of 32, one
process accumulating two of them (the steps two processes take), torch's AdamW. Goal: sharding halves the weights
and states each process holds.

    python bench/sharding.py               # about 3 minutes on a 2-core CPU
    python bench/sharding.py --steps 6 --overrides "{hidden_size: 64}"   # a smoke run

Writes the same as JSON to `--out/sharding.json`.
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

import lightning as L
from torch.distributed.tensor import DTensor

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "1 process": ["--trainer.accumulate_grad_batches", "2"],
    "2 processes, ddp": ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
    "2 processes, fsdp2": ["--trainer.devices", "2", "--trainer.strategy", "fsdp2"],
}


class Probe(L.Callback):
    """Per rank, into `out`.RANK.json: steps/s after the first two steps, peak resident memory, and the bytes of
    the weights and optimizer states this process holds (a shard's local size)."""

    def __init__(self, out: str) -> None:
        self.out, self.start = out, None

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 2 and self.start is None:
            self.start = (trainer.global_step, time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        def nbytes(t) -> int:
            t = t.to_local() if isinstance(t, DTensor) else t
            return t.numel() * t.element_size()

        states = [v for s in trainer.optimizers[0].state.values() for v in s.values() if getattr(v, "ndim", 0) > 0]
        steps, started = trainer.global_step - self.start[0], self.start[1]
        result = {
            "steps_per_s": steps / (time.perf_counter() - started),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "weights_mib": sum(nbytes(p) for p in pl_module.parameters()) / 2**20,
            "states_mib": sum(nbytes(v) for v in states) / 2**20,
        }
        Path(f"{self.out}.{trainer.global_rank}.json").write_text(json.dumps(result))


def run(name: str, extra: list[str], args: argparse.Namespace) -> dict:
    folder = args.out / name.replace(" ", "_").replace(",", "")
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "mbti_lightning", "fit", "--config", str(REPO / "configs/demo.yaml"),
        "--model.config_overrides", args.overrides, "--model.optimizer", "adamw", "--data.group_by_length", "false",
        "--data.keep_fraction", "0.2", "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
        "--trainer.enable_checkpointing", "false", "--trainer.callbacks+=sharding.Probe",
        f"--trainer.callbacks.out={folder / 'probe'}", *extra,
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO / "bench"), "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    with (folder / "log.txt").open("w") as log:
        subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1200)
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob("probe.*.json"))]
    return {
        "variant": name,
        "steps_per_s": round(min(r["steps_per_s"] for r in ranks), 2),
        "per_process": [{k: round(v, 1) for k, v in r.items() if k != "steps_per_s"} for r in ranks],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--overrides",
        default="{hidden_size: 512, intermediate_size: 2048, num_hidden_layers: 8, num_attention_heads: 8, "
        "num_key_value_heads: 8}",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench/out/sharding")
    args = parser.parse_args(argv)
    results = [run(name, extra, args) for name, extra in VARIANTS.items()]
    base = results[0]
    for r in results:
        held = [p["weights_mib"] + p["states_mib"] for p in r["per_process"]]
        r["held_vs_one_process"] = round(max(held) / (base["per_process"][0]["weights_mib"] +
                                                      base["per_process"][0]["states_mib"]), 2)  # fmt: skip
        print(
            f"{r['variant']}: {r['steps_per_s']} steps/s; per process: "
            + "; ".join(
                f"peak {p['peak_rss_mib']} MiB, weights {p['weights_mib']} MiB + states {p['states_mib']} MiB"
                for p in r["per_process"]
            )
            + f" ({r['held_vs_one_process']}x one process's weights and states)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharding.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
