"""What bounds `mbti-lightning serve` under load: CPU per process, py-spy's samples, and the forward pass alone.

Starts the batched server (`--max-batch-size 32`) on `--model`, warms it up, then sends one-text requests from
32 threads for `--seconds` and prints the CPU each process used (psutil: the model worker, the HTTP
process, the client), and, where py-spy is installed (``pip install py-spy``; it needs ptrace), the share of
the worker's samples in the forward pass, tokenizing, collecting requests and the queues. Then, in this process
and without a server, `serve.answer` on the same kind of texts one at a time and in batches of 8 and 32: the
most batching can give on this machine.

    python bench/serve_profile.py --model <export>
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
from serve_load import load, serving, texts

#: py-spy frames counted, by function name: where the worker's time goes.
PARTS = {
    "forward pass": "forward",
    "tokenizing": "tokenize",
    "collecting requests": "collate_requests",
    "queues": "put",
}


def spy_shares(raw: Path) -> dict[str, float]:
    """Shares of py-spy's raw samples (``stack count`` lines) whose stack holds each of `PARTS`."""
    total, counts = 0, collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        names = {frame.split(" (")[0].rsplit(".", 1)[-1] for frame in stack.split(";")}  # Linear.forward: forward
        total += int(n)
        for part, name in PARTS.items():
            counts[part] += int(n) * (name in names)
    return {part: counts[part] / max(total, 1) for part in PARTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    with serving(args.model, 32) as (port, process), tempfile.TemporaryDirectory() as tmp:
        load(port, 8, 64, 60)
        procs = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        spies = {}
        if shutil.which("py-spy"):
            for p in procs:
                out = Path(tmp) / f"{p.pid}.txt"
                command = ["py-spy", "record", "-p", str(p.pid), "-d", str(int(args.seconds)), "-f", "raw", "-o"]
                spies[p.pid] = (subprocess.Popen([*command, str(out), "--nonblocking"], stderr=subprocess.DEVNULL), out)
        before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
        client, start = time.process_time(), time.perf_counter()
        result = load(port, 32, 100_000, args.seconds)
        wall = time.perf_counter() - start
        print(f"concurrency 32: {result['texts_per_s']} texts/s, p50 {result['p50_ms']} ms")
        print(f"client: {(time.process_time() - client) / wall:.2f} cores")
        for p in procs:
            used = (sum(p.cpu_times()[:2]) - before[p.pid]) / wall
            print(f"server process {p.pid} ({' '.join(p.cmdline())[-50:]}): {used:.2f} cores")
        for pid, (spy, out) in spies.items():
            spy.wait()
            if out.exists() and out.stat().st_size:
                shares = ", ".join(f"{part} {share:.1%}" for part, share in spy_shares(out).items())
                print(f"py-spy, process {pid}: {shares}")

    import torch

    from mbti_lightning import loading, serve

    loaded = loading.load(args.model)
    requests = [{"texts": [t], "person": False} for t in texts(640, 0)]
    for size in (1, 8, 32):
        serve.answer(loaded, requests[:size])
        start = time.perf_counter()
        for i in range(0, len(requests), size):
            serve.answer(loaded, requests[i : i + size])
        rate = len(requests) / (time.perf_counter() - start)
        print(f"forward pass alone ({torch.get_num_threads()} threads), batches of {size}: {rate:.1f} texts/s")


if __name__ == "__main__":
    main()
