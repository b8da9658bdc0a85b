"""`mbti-lightning serve MODEL`: a batched HTTP endpoint on LitServe.

MODEL is an exported folder, a hub id, or a `fit` checkpoint (``.ckpt``), loaded as every command loads a
model (`loading`: in the dtype it was trained in, with its max_length and masking). ``POST /predict`` takes ``{"texts": "..."}`` or ``{"texts": ["...", ...]}`` (one answer per text)
or ``{"posts": ["...", ...]}`` (one person's posts: one answer, their evidence added up as `persons` does) and answers
each head's letter and probability exactly as ``mbti-lightning predict`` writes them, after the same
type-mention masking and truncation as training; ``GET /health``; FastAPI's ``/docs``. Requests
that arrive together are run as one batch (``--max-batch-size``, ``--batch-timeout``). See
docs/serving.md.
"""

# No `from __future__ import annotations`: LitServe and FastAPI read decode_request's request model at run time.
import argparse
import os
import secrets
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from mbti_lightning import loading
from mbti_lightning.data.tokenized import tokenize
from mbti_lightning.loading import Loaded
from mbti_lightning.predict import per_author, prediction_records

try:  # the `serve` extra
    import litserve as ls
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
except ImportError as err:
    raise ImportError('mbti-lightning serve needs LitServe: pip install "mbti-lightning[serve]"') from err

#: The API key, when there is one, comes as ``Authorization: Bearer <key>``.
BEARER = HTTPBearer(auto_error=False)
#: Texts are padded and run in chunks of this many.
CHUNK = 64


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


@torch.no_grad()
def answer(served: Loaded, requests: list[dict]) -> list[dict]:
    """The answers to `requests` (each ``{"texts": [...], "person": bool}``), run as one batch of texts."""
    texts = [text for request in requests for text in request["texts"]]
    encoded = tokenize({"text": texts}, served.tokenizer, "text", served.max_length, served.mask)
    # A text as long as the limit may have been cut: count its tokens untruncated to know.
    truncated = [
        n == served.max_length and len(served.tokenizer(text)["input_ids"]) > n
        for text, n in zip(texts, encoded["length"])
    ]
    device = served.model.device
    log_probs: dict[str, list[torch.Tensor]] = {head: [] for head in served.model.heads}
    for start in range(0, len(texts), CHUNK):
        ids = encoded["input_ids"][start : start + CHUNK]
        batch = served.tokenizer.pad({"input_ids": ids}, pad_to_multiple_of=8, return_tensors="pt").to(device)
        logits = served.model.head_logits(served.model(batch["input_ids"], batch["attention_mask"]))
        for head, x in zip(served.model.heads, logits):
            log_probs[head].append(x.float().log_softmax(-1).cpu())
    log_probs = {head: torch.cat(parts) for head, parts in log_probs.items()}
    out, start = [], 0
    for request in requests:
        rows = slice(start, start + len(request["texts"]))
        start = rows.stop
        mine = {head: lp[rows] for head, lp in log_probs.items()}
        if request["person"]:
            _, counts, probs = per_author(["person"] * len(request["texts"]), mine, served.model.persons)
            (record,) = prediction_records(served.model.heads, probs)
            answer = {"person": {"posts": int(counts[0])} | record}
        else:
            answer = {"predictions": prediction_records(served.model.heads, {h: lp.exp() for h, lp in mine.items()})}
        out.append({"model": served.name, "revision": served.revision} | answer | {"truncated": truncated[rows]})
    return out


class MBTIAPI(ls.LitAPI):
    """LitServe's shape: the model is loaded once per worker in `setup`; requests are checked in
    `PredictRequest`, run together in `predict`, and answered one by one."""

    def __init__(self, source: str, api_key: str | None, **kwargs: Any) -> None:
        super().__init__(api_path="/predict", **kwargs)
        self.source = source
        self._api_key = api_key  # never logged or written

    def setup(self, device: str) -> None:
        self.served = loading.load(self.source)
        self.served.model.to(device)

    def authorize(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if self._api_key is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), self._api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mbti-lightning serve", description=__doc__)
    parser.add_argument("model", help="an exported folder, a hub id, or a checkpoint written by `fit` (.ckpt)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests run together; 1 turns batching off")
    parser.add_argument("--batch-timeout", type=float, default=0.01, help="seconds to wait for a batch to fill")
    parser.add_argument("--workers-per-device", type=int, default=1)
    parser.add_argument("--devices", default="auto", help="how many devices, or auto")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--max-texts", type=int, default=256, help="texts (or posts) per request at most")
    parser.add_argument("--max-chars", type=int, default=100_000, help="characters per text at most")
    parser.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="require 'Authorization: Bearer <key>', the key read from environment variable NAME",
    )
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.exit(2, f"mbti-lightning serve: error: environment variable {args.api_key_env} is not set\n")
    LIMITS.update(max_texts=args.max_texts, max_chars=args.max_chars)
    api = MBTIAPI(
        args.model,
        api_key,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
    )
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    server = ls.LitServer(
        api,
        accelerator=args.accelerator,
        devices=devices,
        workers_per_device=args.workers_per_device,
        max_payload_size=max(args.max_chars * args.max_texts * 4, 1_000_000),  # bytes: UTF-8 is up to 4 a character
    )
    server.run(host=args.host, port=args.port, generate_client_file=False)
