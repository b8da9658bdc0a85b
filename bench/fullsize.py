"""Peak memory and time of every inference command at full size: Phi-3-mini's exact configuration, in bf16.

A model with `Phi3Config` of Phi-3-mini (hidden 3072, 32 layers, 32 heads, intermediate 8192, vocabulary
32064: 3.8 B parameters), randomly initialised (nothing is downloaded), goes through each command that
loads a trained model, each in its own process, one at a time (this machine has 24 GB):

1. ``fit``: the checkpoint. Training 3.8 B parameters on a CPU is out of reach, so it is a LoRA fit
   (rank 8 on the attention's qkv projection) of one optimizer step at max_length 32, bf16-true; with
   ``from_scratch`` the random base cannot be rebuilt, so the checkpoint holds it whole (7.6 GB), as a
   fully fine-tuned checkpoint would. The data: a 200-row file in the demo corpus's columns, authors
   split 60/20/20 (about 40 validation and 40 test rows).
2. ``mbti-lightning-export`` (merges the LoRA, calibrates on validation, scores the card on test).
3. ``predict`` 200 texts with the checkpoint; ``report`` on the 200-row file; ``serve`` the export,
   answering 20 requests of 10 texts; ``explain`` 2 texts with 8 steps.

Each command's peak memory is the largest sum of PSS over the process and its children (the server's
workers, DataLoader workers), sampled every 50 ms; printed as GB and as a multiple of the bf16 weight
bytes, beside the RSS summed over the processes (which counts a page they share in each of them). The goal: no command
holds an fp32 copy of the backbone or two copies of its weights, so every peak stays within 1.5x the
bf16 weights. ``--tiny`` runs the same commands on a 2-layer model of the same widths' shape (for CI).

    python bench/fullsize.py                 # the recorded run: about 20 minutes on 2 cores, 25 GB of disk
    python bench/fullsize.py --tiny          # the same commands on a tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
PHI3_MINI = {
    "hidden_size": 3072,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 8192,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
}
TINY = PHI3_MINI | {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4}
TINY |= {"intermediate_size": 128}


class Peak:
    """The largest memory of `process` and its children while it runs, sampled every 50 ms: the sum of their PSS
    (each page shared by several of them, as a forked DataLoader worker shares its parent's, counted once, split
    between them; their RSS summed would count it in each), and that sum of RSS beside it."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process, self.bytes, self.rss = process, 0, 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        root = psutil.Process(self.process.pid)
        while self.process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                self.bytes = max(self.bytes, sum(p.memory_full_info().pss for p in tree))
                self.rss = max(self.rss, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.05)

    def join(self) -> dict:
        self._thread.join()
        return {"peak_pss": self.bytes, "peak_rss_summed": self.rss}


def run(name: str, argv: list[str], folder: Path) -> dict:
    """Run a command to its end; its wall time and peak RSS."""
    start = time.perf_counter()
    log = (folder / f"{name.split()[0]}.log").open("w")
    process = subprocess.Popen(argv, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    peak = Peak(process)
    if process.wait() != 0:
        raise RuntimeError(f"{name} failed: see {log.name}")
    return {"command": name, "seconds": round(time.perf_counter() - start, 1)} | peak.join()


def serve(export: Path, folder: Path, requests: int, texts: list[str]) -> dict:
    """Start the server on the export, answer `requests` requests of 10 texts one after another, stop it."""
    start = time.perf_counter()
    log = (folder / "serve.log").open("w")
    command = [sys.executable, "-m", "mbti_lightning", "serve", str(export), "--port", "8765", "--accelerator", "cpu"]
    process = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    peak = Peak(process)
    try:
        deadline = time.monotonic() + 1800
        while True:
            try:
                urllib.request.urlopen("http://127.0.0.1:8765/health", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: see {folder / 'serve.log'}") from None
                time.sleep(1)
        for i in range(requests):
            body = json.dumps({"texts": texts[10 * i : 10 * i + 10]}).encode()
            request = urllib.request.Request("http://127.0.0.1:8765/predict", data=body)
            request.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(request, timeout=600) as response:
                assert response.status == 200
        seconds = time.perf_counter() - start
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the whole group: LitServe's workers too
        process.wait()
    command = f"serve (start, {requests} requests of 10 texts)"
    return {"command": command, "seconds": round(seconds, 1)} | peak.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: the same commands in seconds")
    parser.add_argument("--dir", type=Path, help="working folder (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="fullsize-"))
    folder.mkdir(parents=True, exist_ok=True)
    config = TINY if args.tiny else PHI3_MINI

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mbti_lightning.demo import generate_rows

    rows = generate_rows(num_rows=200, seed=3)
    pq.write_table(pa.table({k: v[:200] for k, v in rows.items()}), folder / "data.parquet")
    texts = generate_rows(num_rows=200, seed=4)["body"][:200]
    (folder / "texts.txt").write_text("\n".join(texts) + "\n")

    cli = [sys.executable, "-m", "mbti_lightning"]
    data = ["--config", str(REPO / "configs/demo.yaml"), "--data.dataset", "parquet"]
    data += ["--data.data_files", str(folder / "data.parquet"), "--data.split", "author", "--data.keep_fraction", "1.0"]
    data += ["--data.test_fraction", "0.2", "--data.max_length", "32", "--data.eval_batch_size", "8"]
    fit = [*cli, "fit", *data, "--model.config_overrides", json.dumps(config), "--trainer.precision", "bf16-true"]
    fit += ["--model.peft", json.dumps({"r": 8, "target_modules": ["qkv_proj"]})]
    fit += ["--data.batch_size", "2", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1"]
    fit += ["--trainer.val_check_interval", "1", "--checkpoint.save_top_k", "0", "--trainer.logger", "false"]
    ckpt = folder / "checkpoints/demo/last.ckpt"
    # A checkpoint left in --dir by an earlier run is used again (the fit is the slow part of making one).
    results = [] if ckpt.is_file() else [run("fit (LoRA, 1 step)", fit, folder)]
    from mbti_lightning import loading

    checkpoint = loading.read_checkpoint(ckpt)
    weights = sum(v.numel() for k, v in checkpoint["state_dict"].items() if k.startswith("model.") and "lora" not in k)
    del checkpoint
    bf16_bytes = 2 * weights
    export = folder / "exported"
    steps = [
        ("export", ["mbti-lightning-export", "--ckpt", str(ckpt), "--out", str(export), "--overwrite"]),
        ("predict (200 texts)", [*cli, "predict", *data, "--ckpt_path", str(ckpt), "--data.predict_file", "texts.txt"]),
        (
            "report (200-row file)",
            [*cli, "report", *data, "--ckpt_path", str(ckpt), "--resamples", "200", "--draws", "2"],
        ),
        (
            "explain (2 texts, 8 steps)",
            [*cli, "explain", *data, "--ckpt_path", str(ckpt), "--steps", "8", "--texts", json.dumps(texts[:2])],
        ),
    ]
    for name, argv in steps:
        results.append(run(name, argv, folder))
        print(json.dumps(results[-1]), flush=True)
    results.append(serve(export, folder, 20, texts))
    print(f"\n{weights / 1e9:.2f} B parameters, bf16 weights {bf16_bytes / 1e9:.2f} GB; goal: peak memory <= 1.5x\n")
    print("| command | wall time (s) | peak PSS (GB) | x bf16 weights | RSS summed over its processes (GB) |")
    print("|---|---|---|---|---|")
    for r in results:
        pss, rss = r["peak_pss"] / 1e9, r["peak_rss_summed"] / 1e9
        print(f"| {r['command']} | {r['seconds']} | {pss:.2f} | {r['peak_pss'] / bf16_bytes:.2f} | {rss:.2f} |")
    (folder / "fullsize.json").write_text(json.dumps({"parameters": weights, "results": results}, indent=2))


if __name__ == "__main__":
    main()
