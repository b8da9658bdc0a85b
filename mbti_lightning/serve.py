"""`mbti-lightning serve MODEL`: a batched HTTP endpoint on LitServe.

MODEL is an exported folder, a hub id, or a `fit` checkpoint (``.ckpt``), loaded as every command loads a
model (`loading`: in the dtype it was trained in, with its max_length and masking). ``POST /predict``
takes ``{"texts": "..."}`` or ``{"texts": ["...", ...]}`` (one answer per text) or ``{"posts": ["...",
...]}`` (one person's posts: one answer, their evidence added up as `persons` does) and answers each
head's letter and probability exactly as ``mbti-lightning predict`` writes them, after the same
type-mention masking and truncation as training (a text is cut to what the model can read before it is
tokenized); ``GET /health``; FastAPI's ``/docs`` unless there is an API key. Requests that arrive
together are run as one batch (``--max-batch-size``, ``--batch-timeout``). With ``--api-key-env``, the
`Doorman` refuses a request without the key before its body is read. SIGTERM or Ctrl-C stops it
gracefully (`stop_on_signals`). See docs/serving.md.
"""

# No `from __future__ import annotations`: LitServe and FastAPI read decode_request's request model at run time.
import argparse
import contextlib
import functools
import multiprocessing
import os
import secrets
import signal
import time
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from mbti_lightning import loading, person_head
from mbti_lightning.data.tokenized import tokenize
from mbti_lightning.folding import head_inputs
from mbti_lightning.loading import Loaded
from mbti_lightning.predict import per_author, prediction_records
from mbti_lightning.sampling import runs_within

try:  # the `serve` extra
    import litserve as ls
    import psutil
    from fastapi import HTTPException
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from litserve.loops import BatchedLoop
    from litserve.loops.base import collate_requests
    from litserve.transport.process_transport import MPQueueTransport
except ImportError as err:
    raise ImportError('mbti-lightning serve needs LitServe: pip install "mbti-lightning[serve]"') from err

#: Tokens one forward pass holds (rows x the longest; the texts sorted by length, so they pad little), on a CPU
#: and on an accelerator. A CPU's larger passes fall out of its caches: MiniLM, texts of 7-50 tokens sorted,
#: 168 texts/s in passes of 16 texts against 131 in passes of 32 (unsorted passes of 32: 128).
PASS_TOKENS = {"cpu": 512, "accelerator": 32_768}


#: Per-request limits, set by `main` before the server starts: its HTTP processes are forked from this one.
LIMITS = {"max_texts": 256, "max_chars": 100_000}


class PredictRequest(BaseModel):
    """One text or a list of texts (``texts``), or one person's posts (``posts``).

    Checked here, in the HTTP process, so that a bad request is refused alone: LitServe fails every request
    of a batch when decoding one of them raises.
    """

    model_config = ConfigDict(extra="forbid")

    texts: str | list[str] | None = None
    posts: list[str] | None = None

    @model_validator(mode="after")
    def _check(self) -> "PredictRequest":
        if (self.texts is None) == (self.posts is None):
            raise ValueError('send either "texts" (a text or a list of texts) or "posts" (one person\'s posts)')
        what, texts = ("posts", self.posts) if self.posts is not None else ("texts", self.texts)
        texts = [texts] if isinstance(texts, str) else texts
        if not texts:
            raise ValueError(f'"{what}" is empty')
        if len(texts) > LIMITS["max_texts"]:
            raise ValueError(f"{len(texts)} {what} in one request; at most {LIMITS['max_texts']} (--max-texts)")
        for i, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"{what}[{i}] is empty")
            if len(text) > LIMITS["max_chars"]:
                raise ValueError(
                    f"{what}[{i}] has {len(text):,} characters; at most {LIMITS['max_chars']:,} (--max-chars)"
                )
        return self


@functools.cache
def longest_token(tokenizer) -> int:
    """The most characters one token of `tokenizer` stands for (its longest vocabulary entry, which counts the
    word-piece marks too, so it errs long)."""
    return max(len(token) for token in tokenizer.get_vocab())


@torch.inference_mode()
def answer(served: Loaded, requests: list[dict]) -> list[dict]:
    """The answers to `requests` (each ``{"texts": [...], "person": bool}``), run as one batch of texts."""
    texts = [text for request in requests for text in request["texts"]]
    # The model reads max_length tokens; no token is longer than the tokenizer's longest, so a text cut at
    # max_length x that many characters reads the same. (A normaliser that drops characters, such as runs of
    # spaces, can leave a cut text shorter: then the whole text is tokenized.)
    bound = served.max_length * longest_token(served.tokenizer)
    cut = [text[:bound] for text in texts]
    encoded = tokenize({"text": cut}, served.tokenizer, "text", served.max_length, served.mask, flag=True)
    for i, (text, short) in enumerate(zip(texts, cut)):
        if len(text) > len(short) and not encoded["truncated"][i]:
            whole = tokenize({"text": [text]}, served.tokenizer, "text", served.max_length, served.mask, flag=True)
            encoded["input_ids"][i], encoded["truncated"][i] = whole["input_ids"][0], whole["truncated"][0]
    truncated = encoded["truncated"]
    device = served.model.device
    on_cpu = device.type == "cpu"
    parts: dict[str, list[torch.Tensor]] = {head: [] for head in served.model.heads}
    wanted = person_head.uses_features(served.model)  # the person head reads the posts' features
    collected: list[torch.Tensor] = []
    runs = runs_within([len(ids) for ids in encoded["input_ids"]], PASS_TOKENS["cpu" if on_cpu else "accelerator"])
    multiple = None if on_cpu else 8  # tensor cores want multiples of 8; a CPU only pays for them
    for run in runs:
        ids = [encoded["input_ids"][i] for i in run]
        batch = served.tokenizer.pad({"input_ids": ids}, pad_to_multiple_of=multiple, return_tensors="pt").to(device)
        with head_inputs(served.model.model) if wanted else contextlib.nullcontext() as inputs:
            logits = served.model.head_logits(served.model(batch["input_ids"], batch["attention_mask"]))
        for head, x in zip(served.model.heads, logits):
            parts[head].append(x.float().log_softmax(-1).cpu())
        collected.extend(inputs or [])
    order = torch.tensor([i for run in runs for i in run]).argsort()  # back to the requests' order
    log_probs = {head: torch.cat(p)[order] for head, p in parts.items()}
    features = torch.cat(collected)[order] if wanted else None
    out, start = [], 0
    for request in requests:
        rows = slice(start, start + len(request["texts"]))
        start = rows.stop
        mine = {head: lp[rows] for head, lp in log_probs.items()}
        if request["person"]:
            posts = features[rows] if wanted else None
            _, counts, probs = per_author(["person"] * len(request["texts"]), mine, model=served.model, features=posts)
            (record,) = prediction_records(served.model.heads, probs)
            answer = {"person": {"posts": int(counts[0])} | record}
        else:
            answer = {"predictions": prediction_records(served.model.heads, {h: lp.exp() for h, lp in mine.items()})}
        out.append({"model": served.name, "revision": served.revision} | answer | {"truncated": truncated[rows]})
    return out


class _Gathering:
    """A request queue whose first item was already taken (`collate_requests` reads it back first) and that, while
    fewer than `expected` requests have been read, waits for the next until `deadline`."""

    def __init__(self, first: Any, queue: Any, expected: int, deadline: float) -> None:
        self.first, self.queue, self.expected, self.deadline, self.read = first, queue, expected, deadline, 0

    def get_nowait(self) -> Any:
        self.read += 1
        if self.read == 1:
            return self.first
        wait = self.deadline - time.monotonic() if self.read <= self.expected else 0
        return self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()


#: Seconds a batch waits for requests still expected (see `WhatIsWaiting`). MiniLM on this project's 2-core CPU,
#: 32 clients, three runs each: 30 ms gave 137-149 texts/s (batches of 26-31) against 126-145 with no wait
#: (batches of 12-21, in uneven pairs); one client waits for nothing either way.
PATIENCE_S = 0.03


class WhatIsWaiting(BatchedLoop):
    """Batches of the requests that are waiting, with a wait only for those the last batch says are coming: the
    worker sleeps until a request comes, then runs it with every request queued meanwhile (up to
    --max-batch-size), waiting up to `patience` seconds while the batch is smaller than the last one. A lone client
    is answered at once (its last batch was one request); under load, the clients answered by one batch ask again
    together and make up the next, rather than splitting into a small batch and a large one. (LitServe's own loop
    with a batch timeout waits out the timeout for a lone request, and with none it polls the queue without
    sleeping.)

    It reuses LitServe's `collate_requests` (litserve.loops.base; pyproject bounds litserve, and
    tests/test_private_apis.py checks the names)."""

    def __init__(self, patience: float = PATIENCE_S) -> None:
        super().__init__()
        self.patience, self.expected = patience, 1

    def get_batch_requests(self, lit_api, request_queue, transport):
        first = request_queue.get()  # sleeps while nothing is asked
        queue = _Gathering(first, request_queue, self.expected, time.monotonic() + self.patience)
        payloads, timed_out = collate_requests(self, lit_api, queue, transport)
        self.expected = max(len(payloads), 1)
        return payloads, timed_out


class DirectQueues(ls.LitServer):
    """A LitServer whose requests and answers go through pipes between the HTTP process and the worker
    (`multiprocessing` queues), not through queues held by a manager process: there every put and get is a round
    trip to a third process, which a busy CPU may not schedule at once, and the HTTP process's put blocks its event
    loop. MiniLM, 32 clients on this project's 2-core CPU, three alternating runs: 113-140 texts/s against
    103-130 (bench/RESULTS.md). LitServe's own `fast_queue` (ZeroMQ answers) would help too, but 0.2.19 ignores it
    (Lightning-AI/LitServe#751).

    It replaces what LitServer._init_manager made (`litapi_request_queues`, `_transport`): pyproject bounds
    litserve, tests/test_private_apis.py checks the names it imports or overrides, and tests/test_serve.py that
    the server reads the queues made here."""

    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)
        spawn = multiprocessing.get_context("spawn")  # as LitServe starts its workers
        self.litapi_request_queues = {path: spawn.Queue() for path in self.litapi_request_queues}
        self._transport = MPQueueTransport(manager, [spawn.Queue() for _ in range(num_api_servers)])
        return manager


class MBTIAPI(ls.LitAPI):
    """LitServe's shape: the model is loaded once per worker in `setup`; requests are checked in
    `PredictRequest`, run together in `predict`, and answered one by one."""

    def __init__(self, source: str, runtime: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(api_path="/predict", **kwargs)
        self.source, self.runtime = source, runtime

    def setup(self, device: str) -> None:
        self.served = loading.load(self.source, self.runtime)
        self.served.model.to(device)

    def decode_request(self, request: PredictRequest) -> dict:
        person = request.posts is not None
        texts = request.posts if person else [request.texts] if isinstance(request.texts, str) else request.texts
        return {"texts": texts, "person": person}

    def batch(self, inputs: list[dict]) -> list[dict]:
        return inputs

    def predict(self, requests: list[dict] | dict) -> list[dict] | dict:
        if isinstance(requests, dict):  # max_batch_size 1: one request at a time
            return answer(self.served, [requests])[0]
        return answer(self.served, requests)

    def unbatch(self, answers: list[dict]) -> list[dict]:
        return answers

    def encode_response(self, output: dict) -> dict:
        return output


#: Routes that answer without the key: a load balancer's or supervisor's health check.
OPEN_ROUTES = ("/health",)
#: Bytes of a refused body received (and dropped) before the refusal is sent.
DISCARDED = 64 * 1024 * 1024
#: Characters of a request's input quoted back in an error.
QUOTED = 80


class Doorman:
    """The first thing a request meets (a pure ASGI middleware): with an API key, a request without it is refused
    with 401 before its body is read, on every route but `OPEN_ROUTES`; a body whose Content-Length is over the cap
    is refused with 413 before it is read (LitServe's own cap counts the bytes of a body that streams in)."""

    def __init__(self, app, api_key: str | None, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            authorised = self.expected is None or secrets.compare_digest(
                headers.get(b"authorization", b""), self.expected
            )
            length = headers.get(b"content-length", b"0")
            refusal = None
            if not authorised and scope["path"] not in OPEN_ROUTES:
                refusal = 401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
            elif length.isdigit() and int(length) > self.max_body:
                refusal = (
                    413,
                    f"the body has {int(length):,} bytes; at most {self.max_body:,} (--max-texts x --max-chars)",
                )
            if refusal:
                await _discard(receive)
                return await JSONResponse({"detail": refusal[1]}, refusal[0])(scope, receive, send)
        await self.app(scope, receive, send)


async def _discard(receive, limit: int = DISCARDED) -> None:
    """Receive a refused request's body and drop each chunk as it comes (up to `limit` bytes), so that its client,
    still sending, can read the refusal instead of a reset connection; nothing of it is kept."""
    seen = 0
    while seen <= limit:
        try:
            message = await receive()
        except HTTPException:  # LitServe's cap, counting the bytes that stream in, stopped it first
            return
        seen += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return


async def short_errors(request, error: RequestValidationError) -> JSONResponse:
    """A 422 that names each field and position at fault and quotes at most `QUOTED` characters of the input."""
    errors = []
    for e in error.errors():
        shown = e.get("input")
        shown = shown if isinstance(shown, int | float | bool | None) else str(shown)
        if isinstance(shown, str) and len(shown) > QUOTED:
            shown = f"{shown[:QUOTED]}... ({len(shown):,} characters)"
        errors.append({"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:500], "input": shown})
    return JSONResponse({"detail": errors[:10]}, 422)


def stop_on_signals() -> None:
    """SIGTERM (a supervisor's stop) and SIGINT (Ctrl-C) stop the server as LitServe stops on Ctrl-C: it stops
    accepting, lets requests in flight finish (--grace-period), stops every worker and frees the port; a second
    signal ends the server and its workers at once."""
    received = []

    def stop(signum, frame) -> None:
        if received:
            for child in psutil.Process().children(recursive=True):
                child.kill()
            os._exit(128 + signum)
        received.append(signum)
        raise KeyboardInterrupt  # LitServer.run shuts down gracefully on it

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mbti-lightning serve", description=__doc__)
    parser.add_argument("model", help="an exported folder, a hub id, or a checkpoint written by `fit` (.ckpt)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests run together; 1 turns batching off")
    parser.add_argument(
        "--batch-timeout",
        type=float,
        default=0.0,
        help="seconds to wait for a batch to fill; 0 (the default): run what is waiting at once (`WhatIsWaiting`)",
    )
    parser.add_argument("--workers-per-device", type=int, default=1)
    parser.add_argument("--devices", default="auto", help="how many devices, or auto")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--max-texts", type=int, default=256, help="texts (or posts) per request at most")
    parser.add_argument("--max-chars", type=int, default=100_000, help="characters per text at most")
    parser.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="require 'Authorization: Bearer <key>' on every route but /health (and turn /docs and /openapi.json "
        "off), the key read from environment variable NAME",
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=30,
        help="seconds requests in flight get to finish after SIGTERM or Ctrl-C (a second signal stops at once)",
    )
    parser.add_argument("--model-option", action="append", metavar="KEY=VALUE", help=loading.MODEL_OPTION_HELP)
    args = parser.parse_args(argv)
    runtime = loading.parse_runtime(args.model_option)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.exit(2, f"mbti-lightning serve: error: environment variable {args.api_key_env} is not set\n")
    loading.load(args.model, runtime)  # a MODEL that cannot be served stops here, in one line, not in a worker
    LIMITS.update(max_texts=args.max_texts, max_chars=args.max_chars)
    greedy = args.max_batch_size > 1 and args.batch_timeout == 0
    api = MBTIAPI(
        args.model,
        runtime,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        loop=WhatIsWaiting() if greedy else "auto",
    )
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    # Bytes: JSON may escape a character as \\uXXXX twice (12 bytes, a surrogate pair), plus the keys and quotes.
    max_body = args.max_chars * args.max_texts * 12 + 64 * 1024
    server = DirectQueues(
        api,
        accelerator=args.accelerator,
        devices=devices,
        workers_per_device=args.workers_per_device,
        max_payload_size=max_body,
        disable_openapi_url=api_key is not None,
        middlewares=[(Doorman, {"api_key": api_key, "max_body": max_body})],
    )
    server.app.add_exception_handler(RequestValidationError, short_errors)
    server.uvicorn_graceful_timeout = args.grace_period  # uvicorn's grace for requests in flight, then LitServe's join
    stop_on_signals()
    server.run(host=args.host, port=args.port, generate_client_file=False)
