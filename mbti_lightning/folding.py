"""Calibration folded into a Hugging Face classifier's weights: finding its classification head, scaling and
shifting that head's outputs (`fold`), and collecting the head's inputs that a bias-free head's offsets ride on
(`head_inputs`). What to fold is fitted in `calibration`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: Where a Hugging Face sequence classifier keeps its output layer (``classifier.out_proj`` for RoBERTa's).
HEAD_NAMES = ("score", "classifier")


def classification_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The linear layer that outputs a Hugging Face sequence classifier's logits, found by name (`HEAD_NAMES`);
    under peft, its trained copy."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in HEAD_NAMES:
        module = getattr(base, name, None)
        copies = getattr(module, "modules_to_save", None)  # peft's wrapper: the trained copy per adapter
        if copies is not None:
            module = copies[module.active_adapters[0]]
        module = getattr(module, "out_proj", module)
        if isinstance(module, torch.nn.Linear) and module.out_features == model.config.num_labels:
            return module
    raise ValueError(f"found no classification head ({' or '.join(HEAD_NAMES)}) in {type(base).__name__}")


@torch.no_grad()
def fold(model: torch.nn.Module, scales: list[float], shifts: list[float], carrier: torch.Tensor | None = None) -> bool:
    """Output i of `model`'s classification head becomes ``output / scales[i] + shifts[i]``, the shifts added to
    its bias, or without one scaled by ``carrier . input`` (added to its weights); a head with neither takes the
    scales only. Returns whether the shifts were folded."""
    head = classification_head(model)
    scale = torch.tensor(scales, dtype=torch.float64)
    shift = torch.tensor(shifts, dtype=torch.float64)
    weight = head.weight.double() / scale[:, None]
    if head.bias is None and carrier is not None:
        weight += shift[:, None] * carrier.double()[None, :]
    head.weight.copy_(weight.to(head.weight.dtype))
    if head.bias is None:
        return carrier is not None
    head.bias.copy_((head.bias.double() / scale + shift).to(head.bias.dtype))
    return True


@contextlib.contextmanager
def head_inputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects, per forward pass of the Hugging Face classifier `model`, the (rows, features) input of its
    classification head at the position whose output became the logits (a decoder's head runs on every token;
    the model returns the last text token's), in fp32 on the CPU: rows x features x 4 bytes (0.7 GB for the
    seed's 60,000 validation rows of Phi-3-mini)."""
    head, grabbed, collected = classification_head(model), {}, []

    def keep(module, args, output) -> None:
        if args[0].dim() == 2:  # (rows, features): one input a row (an encoder's pooler, a frozen run's features)
            collected.append(args[0].float().cpu())
        else:
            grabbed["in"], grabbed["out"] = args[0], output

    def pool(module, args, kwargs, output) -> None:
        if "in" not in grabbed:
            return
        x, out = grabbed.pop("in"), grabbed.pop("out")
        # (rows, positions, features): the position whose head output is the model's
        position = (out.float() - output.logits.float()[:, None]).abs().sum(-1).argmin(-1)
        collected.append(x[torch.arange(len(x), device=x.device), position].float().cpu())

    hooks = [head.register_forward_hook(keep), model.register_forward_hook(pool, with_kwargs=True)]
    try:
        yield collected
    finally:
        for hook in hooks:
            hook.remove()
