"""`mbti-lightning serve`: the real server, on a loopback port, answering as `predict` does and refusing bad input."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from queue import Queue
from threading import Timer
from types import SimpleNamespace

import psutil
import pytest
from conftest import REPO, fit_demo

from mbti_lightning.cli import cli_main
from mbti_lightning.export import main as export_main

pytest.importorskip("litserve")

TEXTS = ["i made a list and a schedule for the whole week", "whatever lol lets just improvise", "the the the"] * 3
KEY = "serve-test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, body: bytes | dict, key: str | None = None, path: str = "/predict") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@contextmanager
def server(model: Path, log: Path, *args: str, env: dict | None = None):
    """`mbti-lightning serve MODEL` in a subprocess (its own process group: LitServe starts workers)."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mbti_lightning", "serve", str(model), "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | (env or {}),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except urllib.error.HTTPError:  # up, but asks for the key
                break
            except OSError:
                assert process.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
        yield port, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("serve")
    ckpt = fit_demo(
        run, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "60", "--trainer.val_check_interval", "30"
    )
    return ckpt / "last.ckpt"


def predicted(run: Path, per: str, *model_args: str) -> list[dict]:
    """`mbti-lightning predict` on TEXTS (as one person's posts for `per` author), read back."""
    path = run / "people.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["body", "author"], *[[text, "someone"] for text in TEXTS]])
    out = run / f"predicted-{per}.csv"
    mp = pytest.MonkeyPatch()
    mp.chdir(run)
    mp.setattr(sys, "argv", ["mbti-lightning"])
    try:
        cli_main(
            ["predict", "--config", str(REPO / "configs/demo.yaml"), *model_args, "--data.predict_file", str(path)]
            + ["--predictions.output", str(out), "--predictions.per", per, "--predictions.text", "none"]
        )
    finally:
        mp.undo()
    return [{k: float(v) if k.endswith("_prob") else v for k, v in row.items()} for row in csv.DictReader(out.open())]


def assert_same_answers(port: int, run: Path, key: str | None, *model_args: str) -> None:
    status, answer = call(port, {"texts": TEXTS}, key)
    assert status == 200, answer
    per_text = predicted(run, "text", *model_args)
    assert [{k: v for k, v in row.items() if k != "id"} for row in per_text] == answer["predictions"]
    status, answer = call(port, {"posts": TEXTS}, key)
    (person,) = predicted(run, "author", *model_args)
    assert status == 200 and answer["person"] == {k: v for k, v in person.items() if k != "author"} | {"posts": 9}
    assert answer["truncated"] == [False] * len(TEXTS)


@pytest.mark.slow
def test_a_served_checkpoint_answers_as_predict_refuses_bad_input_and_keeps_its_key_secret(trained, tmp_path):
    log = tmp_path / "server.log"
    args = ["--api-key-env", "MBTI_KEY", "--max-texts", "16", "--max-chars", "5000"]
    with server(trained, log, *args, env={"MBTI_KEY": KEY}) as (port, _):
        assert call(port, {"texts": "hello"})[0] == 401
        assert call(port, {"texts": "hello"}, "wrong")[0] == 401
        assert_same_answers(port, trained.parents[2], KEY, "--ckpt_path", str(trained))

        bad = [
            (b"not json", 422, "JSON decode error"),
            (b'{"text": "x"}', 422, "Extra inputs are not permitted"),
            (b'{"texts": 5}', 422, "Input should be a valid string"),
            (b"{}", 422, 'send either "texts"'),
            (b'{"texts": ""}', 422, "texts[0] is empty"),
            (b'{"posts": []}', 422, '"posts" is empty'),
            (json.dumps({"texts": ["a"] * 17}).encode(), 422, "17 texts in one request; at most 16 (--max-texts)"),
            (json.dumps({"texts": "a" * 20_000}).encode(), 422, "texts[0] has 20,000 characters; at most 5,000"),
            (json.dumps({"texts": "a" * 2_000_000}).encode(), 413, "(--max-texts x --max-chars)"),  # the body cap
            (b'{"texts": "caf\xe9"}', 400, "error parsing the body"),
        ]
        for body, status, message in bad:
            got, answer = call(port, body, KEY)
            assert (got, message in str(answer)) == (status, True), (body[:40], got, answer)
        # Sent together, so that they share batches: a bad request must not take the good ones with it.
        mixed = [{"texts": text} for text in TEXTS] * 3 + [{"texts": ""}, {"posts": []}, {}] * 9
        order = sorted(range(len(mixed)), key=lambda i: (i * 7919) % len(mixed))  # interleaved
        mixed = [mixed[i] for i in order]
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda body: call(port, body, KEY)[0], mixed))
        assert statuses == [422 if i >= 27 else 200 for i in order]
        status, answer = call(port, {"texts": "a plan and a list"}, KEY)  # still answering
        assert status == 200 and answer["predictions"][0]["J-P"] in {"J", "P"}
        status, answer = call(port, {"texts": "plan " * 400}, KEY)  # longer than max_length (128 tokens)
        assert status == 200 and answer["truncated"] == [True]
        # Within both limits, whatever JSON's escaping makes of them: an emoji is 12 bytes as two \uXXXX.
        status, answer = call(port, {"texts": ["😀" * 5000] * 16}, KEY)
        assert status == 200 and len(answer["predictions"]) == 16
    assert KEY not in log.read_text()


@pytest.mark.slow
def test_a_served_export_answers_as_predict_on_the_export(trained, tmp_path):
    out = tmp_path / "model"
    export_main(["--ckpt", str(trained), "--out", str(out)])
    with server(out, tmp_path / "server.log", "--max-batch-size", "4") as (port, _):
        model = ["--model.model_name_or_path", str(out), "--model.from_scratch", "false"]
        assert_same_answers(port, tmp_path, None, *model)
        assert call(port, {"texts": "x"})[1]["model"] == str(out)


@pytest.mark.slow
def test_the_load_bench_runs_small(trained, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import serve_load

    out = serve_load.main(["--model", str(trained), "--smoke"])
    soak = out["soak"]
    assert soak["valid_answered_right"] == soak["valid"] > 0 and soak["malformed_refused_4xx"] == soak["malformed"]
    assert set(out["ratio"]) == {1, 8, 32} and all(r > 0 for r in out["ratio"].values())


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("served") / "model"
    export_main(["--ckpt", str(trained), "--out", str(out), "--no-calibrate"])
    return out


def tree(pid: int) -> list:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@pytest.mark.slow
def test_the_key_is_checked_before_the_body_is_read_and_long_texts_are_cut_before_tokenizing(exported, tmp_path):
    log = tmp_path / "server.log"
    with server(exported, log, "--api-key-env", "MBTI_KEY", env={"MBTI_KEY": KEY}) as (port, process):
        pid = process.pid
        before = sum(p.memory_info().rss for p in tree(pid))
        assert call(port, b"not json at all")[0] == 401  # refused before parsing: 401, not 422
        status, _ = call(port, b'{"texts": "' + b"a" * 50_000_000 + b'"}')
        assert status == 401 and sum(p.memory_info().rss for p in tree(pid)) - before < 20_000_000
        for path in ("/openapi.json", "/docs"):
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code in (401, 404)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)  # open, for health checks

        long = ["plan " * 20_000] * 256  # 100,000 characters each, the defaults' limits
        status, answer = call(port, {"texts": long}, KEY)
        assert status == 200 and answer["truncated"] == [True] * 256
        status, answer = call(port, {"texts": ["as an INTJ i plan everything"]}, KEY)
        assert status == 200 and answer["truncated"] == [False]  # masking is no truncation

        status, answer = call(port, {"texts": ["x" * 100_000, 5]}, KEY)
        assert status == 422 and len(json.dumps(answer)) < 2000  # the field and position, a short quote
        assert ["body", "texts", "list[str]", 1] in [error["loc"] for error in answer["detail"]]

        # Stopped as a supervisor stops it: SIGTERM to the server's process alone.
        children = tree(pid)[1:]
        os.kill(pid, signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        _, alive = psutil.wait_procs(children, timeout=2)
        assert not alive
        with socket.socket() as s:  # nothing listens on the port (connections in TIME_WAIT may stay)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    assert "Shutting down LitServe" in log.read_text()


def test_a_batch_waits_for_the_clients_the_last_batch_answered_and_a_lone_client_waits_for_nothing():
    from mbti_lightning.serve import WhatIsWaiting

    loop = WhatIsWaiting(patience=1.0)
    loop.put_response = lambda **_: None  # the START message to each client, not under test here
    api = SimpleNamespace(batch_timeout=0, max_batch_size=8, request_timeout=-1, stream=False)
    queue = Queue()

    def batch(now: int, later: int = 0) -> tuple[int, float]:
        """The size of the next batch when `now` requests wait and `later` come 0.2 s later, and its wait."""
        for i in range(now):
            queue.put((0, f"now{i}", time.monotonic(), i))
        for i in range(later):
            Timer(0.2, queue.put, [(0, f"later{i}", time.monotonic(), i)]).start()
        start = time.monotonic()
        payloads, _ = loop.get_batch_requests(api, queue, None)
        return len(payloads), time.monotonic() - start

    size, took = batch(1, later=1)
    assert size == 1 and took < 0.15  # a lone client is answered at once
    assert batch(0) == (1, pytest.approx(0.2, abs=0.15))  # the later one, alone
    assert batch(3)[0] == 3
    assert batch(1, later=2)[0] == 3  # three were answered together: three are awaited
    assert batch(1)[0] == 1  # one client left: a wait of at most `patience`, once
    size, took = batch(1, later=1)
    assert size == 1 and took < 0.15


def test_requests_and_answers_go_through_pipes_not_a_manager_process():
    """Each put and get on a manager's queue is a round trip to a third process (bench/RESULTS.md: 32 clients
    got 7-13% more texts/s without it); `DirectQueues` replaces both directions with pipes."""
    import asyncio
    import multiprocessing.queues

    import litserve as ls

    from mbti_lightning.serve import MBTIAPI, DirectQueues

    servers = [DirectQueues(MBTIAPI("unused"), accelerator="cpu"), ls.LitServer(MBTIAPI("unused"), accelerator="cpu")]
    managers = [server._init_manager(1) for server in servers]
    try:
        direct, plain = servers
        assert isinstance(direct._get_request_queue("/predict"), multiprocessing.queues.Queue)
        assert isinstance(direct._transport._queues[0], multiprocessing.queues.Queue)
        direct._transport.send(("uid", "answer"), consumer_id=0)
        assert asyncio.run(direct._transport.areceive(0)) == ("uid", "answer")
        assert not isinstance(plain._get_request_queue("/predict"), multiprocessing.queues.Queue)  # what it replaces
    finally:
        for manager in managers:
            manager.shutdown()
