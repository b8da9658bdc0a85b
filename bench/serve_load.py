"""Load on `mbti-lightning serve`: batched against unbatched, then a soak with malformed requests.

Starts the server on a free loopback port (127.0.0.1 only), once with `--max-batch-size 32` (batches of
the requests waiting, the default loop) and once with `--max-batch-size 1` (batching off), and sends one-text
requests at concurrency 1, 8 and 32: prints requests/s, texts/s and p50/p99 latency, and the batched/unbatched texts/s ratio at each
concurrency, measured in the same run; then the time of one request of 256 texts of 100,000 characters
(the default limits). Then a soak on the batched server: `--soak` requests of which
5% are malformed, checking that every valid one gets the answer the same text got alone (none lost
or wrong) and that the server's memory (RSS of it and its workers) at the end is within 10% of its
RSS after warm-up. Every loop is bounded in count and time; the servers are stopped at the end.

    python bench/serve_load.py --model exported/demo-jp              # the recorded run
    python bench/serve_load.py --model exported/demo-jp --smoke      # small counts, for CI
    python bench/serve_load.py --model /tmp/fs/exported --requests 16 --max-seconds 90 --soak 0 --no-long  # 3.7 B
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import psutil

WORDS = "plan list schedule deadline organized whatever improvise flexible chill options the a and to my we".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: bytes, timeout: float = 60) -> tuple[int, dict, float]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict", data=body, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, answer = response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        status, answer = err.code, {}
    return status, answer, time.perf_counter() - start


@contextmanager
def serving(model: str, max_batch_size: int):
    port = free_port()
    command = [sys.executable, "-m", "mbti_lightning", "serve", model, "--port", str(port)]
    command += ["--max-batch-size", str(max_batch_size), "--accelerator", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {' '.join(command)}") from None
                time.sleep(0.5)
        yield port, process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def rss(process: subprocess.Popen) -> int:
    """Bytes resident in the server and all its worker processes."""
    root = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(5, 40))) for _ in range(n)]


def load(port: int, concurrency: int, requests: int, max_seconds: float) -> dict:
    """`requests` one-text requests from `concurrency` threads (stopping early after `max_seconds`)."""
    bodies = [json.dumps({"texts": t}).encode() for t in texts(requests, concurrency)]
    deadline = time.monotonic() + max_seconds
    start = time.perf_counter()

    def send(body: bytes) -> tuple[int, dict, float] | None:
        return post(port, body) if time.monotonic() < deadline else None

    with ThreadPoolExecutor(concurrency) as pool:
        done = [r for r in pool.map(send, bodies) if r is not None]
    seconds = time.perf_counter() - start
    latencies = sorted(r[2] for r in done if r[0] == 200)
    ok = len(latencies)
    return {
        "concurrency": concurrency,
        "requests": len(done),
        "ok": ok,
        "requests_per_s": round(ok / seconds, 1),
        "texts_per_s": round(ok / seconds, 1),  # one text a request
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
    }


def same(answer: dict, expected: dict) -> bool:
    """The same letters, and probabilities within 2e-4: in a batch, a text is padded with others, which moves
    its float sums in the last bits, and a probability rounded to 4 decimals can then move by one."""
    return all(
        abs(value - expected[key]) <= 2e-4 if isinstance(value, float) else value == expected[key]
        for key, value in answer.items()
    )


def soak(port: int, process: subprocess.Popen, requests: int, max_seconds: float) -> dict:
    """`requests` requests at concurrency 8, 5% malformed; valid ones checked against the answer alone."""
    pool_texts = texts(50, seed=99)
    expected = {t: post(port, json.dumps({"texts": t}).encode())[1]["predictions"][0] for t in pool_texts}
    malformed = [b"not json", b'{"text": "x"}', b'{"texts": 5}', b'{"texts": ""}', b"{}"]
    rng = random.Random(0)
    plan = [
        (None, rng.choice(malformed)) if rng.random() < 0.05 else (t, None) for t in rng.choices(pool_texts, k=requests)
    ]
    warm = rss(process)
    deadline = time.monotonic() + max_seconds

    def send(item: tuple[str | None, bytes | None]) -> tuple[str, bool] | None:
        if time.monotonic() > deadline:
            return None
        text, bad = item
        status, answer, _ = post(port, bad or json.dumps({"texts": text}).encode())
        if bad is not None:
            return "malformed", 400 <= status < 500
        return "valid", status == 200 and same(answer["predictions"][0], expected[text])

    with ThreadPoolExecutor(8) as pool:
        results = [r for r in pool.map(send, plan) if r is not None]
    end = rss(process)
    valid = [ok for kind, ok in results if kind == "valid"]
    bad = [ok for kind, ok in results if kind == "malformed"]
    return {
        "requests": len(results),
        "valid": len(valid),
        "valid_answered_right": sum(valid),
        "malformed": len(bad),
        "malformed_refused_4xx": sum(bad),
        "rss_after_warmup_mb": round(warm / 2**20, 1),
        "rss_at_end_mb": round(end / 2**20, 1),
        "rss_growth": round(end / warm - 1, 4),
    }


def long_request(port: int) -> dict:
    """One request of 256 texts of 100,000 characters (the default limits): how long the answer takes, the texts
    being cut to what the model reads before they are tokenized."""
    body = json.dumps({"texts": [((texts(1, i)[0] + " ") * 5_000)[:100_000] for i in range(256)]}).encode()
    status, answer, seconds = post(port, body, timeout=120)
    return {"status": status, "seconds": round(seconds, 2), "truncated": status == 200 and all(answer["truncated"])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="what `mbti-lightning serve` serves (an export or a .ckpt)")
    parser.add_argument("--smoke", action="store_true", help="small counts: a check that it all runs")
    parser.add_argument("--requests", type=int, help="requests per concurrency level (default 600; smoke 40)")
    parser.add_argument("--soak", type=int, help="soak requests (default 10,000; smoke 200; 0: no soak)")
    parser.add_argument(
        "--long", action=argparse.BooleanOptionalAction, default=True, help="the request of 256 long texts (default)"
    )
    parser.add_argument("--max-seconds", type=float, default=120, help="cap on each load level and on the soak")
    args = parser.parse_args(argv)
    requests = args.requests or (40 if args.smoke else 600)
    soak_requests = args.soak if args.soak is not None else 200 if args.smoke else 10_000
    out: dict = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "levels": {}}
    for name, batch in (("batched", 32), ("unbatched", 1)):
        with serving(args.model, batch) as (port, process):
            load(port, 8, min(requests, 64), args.max_seconds)  # warm-up
            out["levels"][name] = [load(port, c, requests, args.max_seconds) for c in (1, 8, 32)]
            if name == "batched" and args.long:
                out["long_request"] = long_request(port)
            if name == "batched" and soak_requests:
                out["soak"] = soak(port, process, soak_requests, 10 * args.max_seconds)
    print(f"{'server':<10} {'conc.':>5} {'req/s':>7} {'texts/s':>8} {'p50 ms':>7} {'p99 ms':>7}")
    for name, levels in out["levels"].items():
        for r in levels:
            print(
                f"{name:<10} {r['concurrency']:>5} {r['requests_per_s']:>7} {r['texts_per_s']:>8} {r['p50_ms']:>7} {r['p99_ms']:>7}"
            )
    out["ratio"] = {
        b["concurrency"]: round(b["texts_per_s"] / u["texts_per_s"], 2)
        for b, u in zip(out["levels"]["batched"], out["levels"]["unbatched"])
    }
    print("batched / unbatched texts/s: " + ", ".join(f"concurrency {c}: {r}x" for c, r in out["ratio"].items()))
    if long := out.get("long_request"):
        print(
            f"one request of 256 texts of 100,000 characters: {long['seconds']} s, all truncated: {long['truncated']}"
        )
    if s := out.get("soak"):
        print(
            f"soak: {s['requests']} requests, {s['valid_answered_right']}/{s['valid']} valid answered right, "
            f"{s['malformed_refused_4xx']}/{s['malformed']} malformed refused with a 4xx, "
            f"RSS {s['rss_after_warmup_mb']} -> {s['rss_at_end_mb']} MB ({s['rss_growth']:+.1%})"
        )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
