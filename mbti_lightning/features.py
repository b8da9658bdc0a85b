"""Features once: a frozen backbone's pooled post features, computed in one no-gradient pass and kept on disk, for
heads trained in seconds (``model.frozen``; see docs/frozen-features.md).

`pooled` gives a post's features the way ``model.frozen`` asks: ``model``, what the model's own classification head
reads (a decoder's last real token, an encoder's pooler output), or ``mean``, the mean over real tokens, at a chosen
hidden layer. `cached` computes a run's splits once and stores each as a ``.npy`` file under
``$MBTI_LIGHTNING_CACHE/features/<key>``: memory-mapped, its header states its shape (so a truncated file is
refused, not read), and numpy reads any rows of it without a copy of the rest. The key covers everything that
changes the features: the backbone's weights (a sample of every tensor, so a local folder edited in place or another
hub revision is a new key), the tokenized splits' own cache key (data, tokenizer, max_length, masking), the pooling,
the layer and the dtype. A pass writes ``.<split>.partial.npy`` and, every few seconds, how many rows it holds (`SAVE_EVERY`); a pass
killed half way resumes there, and only a whole file is renamed to ``<split>.npy``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from mbti_lightning.cache import atomic_open, cache_root
from mbti_lightning.errors import UserError
from mbti_lightning.folding import classification_head

#: Bump when pooling changes in a way that makes older cached features wrong.
FEATURES_VERSION = "1"
POOLINGS = ("model", "mean")
#: Seconds between saves of a pass's progress (its rows flushed to disk, then their count): a pass killed loses
#: at most this much work, and a fast pass does not wait on a disk sync per batch.
SAVE_EVERY = 5.0
#: ``model.frozen``'s settings and their defaults: the mean over a post's tokens of the backbone's output, which
#: read persons best of the poolings and layers tried on MiniLM and Gemma-3-270M (docs/frozen-features.md).
DEFAULTS = {"pooling": "mean", "layer": None}


def settings(frozen: dict[str, Any]) -> dict[str, Any]:
    """``model.frozen`` with its defaults filled in; a `UserError` naming a setting that cannot work."""
    unknown = set(frozen) - set(DEFAULTS)
    if unknown:
        raise UserError(f"model.frozen: unknown setting {', '.join(sorted(unknown))}; it takes pooling and layer")
    found = DEFAULTS | frozen
    if found["pooling"] not in POOLINGS:
        raise UserError(f"model.frozen.pooling {found['pooling']!r}: use one of {', '.join(POOLINGS)}")
    if found["pooling"] == "model" and found["layer"] is not None:
        raise UserError(
            f"model.frozen.layer {found['layer']}: pooling 'model' reads what the model's head reads, at its output; "
            "use pooling 'mean' for another layer"
        )
    return found


def _last_real_token(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Per row, the position a Hugging Face decoder classifier reads: the rightmost token that is not padding."""
    if pad_token_id is None:
        return torch.full((len(input_ids),), input_ids.shape[1] - 1, device=input_ids.device)
    real = (input_ids != pad_token_id).int()
    return (torch.arange(input_ids.shape[1], device=input_ids.device) * real).argmax(-1)


def pooled(
    hf_model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pooling: str,
    layer: int | None,
    pass_mask: bool = True,
) -> torch.Tensor:
    """(batch, hidden) features of right-padded posts: ``model`` pooling is the input of `hf_model`'s classification
    head (a whole forward pass of the classifier: pooler and all); ``mean`` the mean over real tokens of hidden
    layer `layer` (None: the backbone's output, after its final norm; an int: ``hidden_states[layer]``, 0 the
    embeddings). `pass_mask` false leaves the padding mask out of the model, as ``model.skip_padding_mask``."""
    mask = attention_mask if pass_mask else None
    if pooling == "model":
        grabbed = []
        hook = classification_head(hf_model).register_forward_hook(lambda m, args, out: grabbed.append(args[0]))
        try:
            hf_model(input_ids=input_ids, attention_mask=mask)
        finally:
            hook.remove()
        x = grabbed[0]
        if x.dim() == 3:  # a decoder's head runs on every position; the classifier keeps the last real token's
            x = x[torch.arange(len(x), device=x.device), _last_real_token(input_ids, hf_model.config.pad_token_id)]
        return x
    out = hf_model.base_model(input_ids=input_ids, attention_mask=mask, output_hidden_states=layer is not None)
    if layer is None:
        hidden = out.last_hidden_state
    else:
        layers = len(out.hidden_states)
        if not -layers <= layer < layers:
            raise UserError(f"model.frozen.layer {layer}: the model has hidden layers 0 to {layers - 1}")
        hidden = out.hidden_states[layer]
    real = attention_mask[..., None].to(hidden.dtype)
    return (hidden * real).sum(1) / real.sum(1).clamp(min=1)


def _weights_sample(hf_model: torch.nn.Module) -> str:
    """A fingerprint of the backbone's weights (not the head's, which the features do not depend on): each tensor's
    name, shape, dtype and 1,024 of its values, evenly spaced."""
    head = {id(p) for p in classification_head(hf_model).parameters()}
    sample = []
    for name, p in hf_model.state_dict(keep_vars=True).items():
        if id(p) in head:
            continue
        flat = p.detach().reshape(-1)
        picked = flat[:: max(1, len(flat) // 1024)][:1024]
        sample.append((name, tuple(p.shape), str(p.dtype), picked.float().cpu().numpy().tobytes()))
    return Hasher.hash(sample)


def key(hf_model: torch.nn.Module, tokenized_key: str, found: dict[str, Any], dtype: torch.dtype) -> str:
    """The features' cache key: everything that changes them (see the module's docstring)."""
    return Hasher.hash([FEATURES_VERSION, _weights_sample(hf_model), tokenized_key, found, str(dtype)])


def read(path: Path, rows: int) -> np.ndarray:
    """The features file at `path`, memory-mapped; a `UserError` naming it where it is not a whole file of `rows`."""
    try:
        features = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"features file {path} is damaged ({err}); delete it to compute it again") from None
    if features.ndim != 2 or len(features) != rows:
        raise UserError(
            f"features file {path} holds {features.shape} features, not one row per post of its split ({rows}); "
            "delete it to compute it again"
        )
    return features


class _Progress:
    """A bar on a terminal; in a log file, a line every tenth of the pass."""

    def __init__(self, total: int, done: int, desc: str) -> None:
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=done, desc=desc, unit="post", disable=not self.tty)
        self.total, self.done, self.desc, self.start = total, done, desc, time.perf_counter()
        self.shown = done * 10 // max(total, 1)

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        if not self.tty and self.done * 10 // max(self.total, 1) > self.shown:
            self.shown = self.done * 10 // max(self.total, 1)
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            rank_zero_info(f"{self.desc}: {self.done}/{self.total} posts, {rate:.1f} posts/s")

    def close(self) -> None:
        self.bar.close()


@torch.inference_mode()
def compute(
    embed: Callable[[list[list[int]]], torch.Tensor],
    rows: Dataset,
    batch_size: int,
    path: Path,
    desc: str,
) -> None:
    """`embed` (token ids -> (batch, hidden) features) over every row of tokenized `rows`, longest first in
    batches of `batch_size`, into ``path`` (a ``.npy`` file), resuming a partial pass of an earlier run."""
    partial = path.with_name(f".{path.stem}.partial.npy")
    progress = path.with_name(f".{path.stem}.progress.json")
    order = np.argsort(-np.asarray(rows["length"][:]), kind="stable")
    done = json.loads(progress.read_text())["rows"] if progress.is_file() and partial.is_file() else 0
    tokens = rows.select_columns(["input_ids"])
    features = np.load(partial, mmap_mode="r+") if done else None
    if done:
        rank_zero_info(f"{desc}: resuming {partial} at row {done} of {len(rows)}")
    bar, saved = _Progress(len(rows), done, desc), time.perf_counter()
    try:
        for start in range(done, len(rows), batch_size):
            picked = order[start : start + batch_size]
            x = embed(tokens[picked.tolist()]["input_ids"]).float().cpu().numpy()
            if features is None:
                features = np.lib.format.open_memmap(
                    partial, mode="w+", dtype=np.float32, shape=(len(rows), x.shape[1])
                )
            features[picked] = x
            if time.perf_counter() - saved > SAVE_EVERY:  # what a resumed pass may skip: flushed rows only
                features.flush()
                with atomic_open(progress, "w") as f:
                    f.write(json.dumps({"rows": start + len(picked)}))
                saved = time.perf_counter()
            bar.update(len(picked))
    finally:
        bar.close()
    if features is None:  # a split without rows
        np.save(partial, np.zeros((0, 0), np.float32))
    else:
        features.flush()
        del features
    os.replace(partial, path)
    progress.unlink(missing_ok=True)


def cached(
    hf_model: torch.nn.Module,
    dm: Any,
    splits: tuple[str, ...],
    found: dict[str, Any],
    context: Callable[[], Any],
    pass_mask: bool = True,
) -> dict[str, np.ndarray]:
    """Per split of data module `dm`, the features of each of its rows (memory-mapped), read from the cache or
    computed first with `hf_model` in eval mode under `context` (the trainer's precision)."""
    dtype = next(hf_model.parameters()).dtype
    folder = cache_root() / "features" / key(hf_model, dm.tokenized_key, found, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "settings.json"
    if not meta.is_file():
        with atomic_open(meta, "w") as f:
            described = {"model": hf_model.config.name_or_path, "dtype": str(dtype), **found}
            f.write(json.dumps(described | {"data": dm.tokenized_key}, indent=1))
    device = next(hf_model.parameters()).device
    was_training = hf_model.training
    hf_model.eval()

    def embed(ids: list[list[int]]) -> torch.Tensor:
        batch = dm.tokenizer.pad(
            {"input_ids": ids}, pad_to_multiple_of=dm.hparams.pad_to_multiple_of, return_tensors="pt"
        )
        with context():
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            return pooled(hf_model, ids, mask, found["pooling"], found["layer"], pass_mask)

    out = {}
    try:
        for split in splits:
            path = folder / f"{split}.npy"
            rows = dm.splits[split]
            if path.is_file():
                rank_zero_info(f"features of {split}: read {path} (no backbone pass)")
            else:
                batch = dm.hparams.eval_batch_size or dm.hparams.batch_size
                compute(embed, rows, batch, path, f"features of {split}")
                rank_zero_info(f"features of {split}: wrote {path}")
            out[split] = read(path, len(rows))
    finally:
        hf_model.train(was_training)
    return out
