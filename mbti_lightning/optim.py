"""bitsandbytes 8-bit AdamW that updates bf16 weights as precisely as fp32 master weights would.

A bf16 weight has 8 bits of mantissa: an update of 1e-3 of its size (typical at lr 2e-5) is often
rounded away. Instead of a 4-byte fp32 master copy per weight, each bf16 weight keeps a 2-byte bf16
compensation term holding what rounding dropped (Kahan summation). Per tensor, the step rebuilds an
fp32 weight (weight + compensation), applies bitsandbytes' update to it, and splits it back.

On CUDA with Triton installed, a bf16 tensor with 8-bit moments is updated by one fused kernel
(`triton_adamw.py`) instead: 14 bytes read and written per parameter, against about 60.

bitsandbytes also synchronises the device after every tensor's update, which only paged states
need; here the updates of non-paged states stay queued on the stream like any other kernels.

It overrides bitsandbytes' optimizer internals (`get_config`, `update_step`, `init_state`, ...), so
pyproject.toml bounds bitsandbytes to the minor version tested; tests/test_private_apis.py checks them.

A param group's `optim_bits` (32 or 8) sets the precision of its states. bitsandbytes' own way, its
process-wide `GlobalOptimManager`, keys overrides by (group, index) and keeps them after the
optimizer is gone, so they apply to whatever the next optimizer in the process holds there.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import bitsandbytes as bnb
import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from mbti_lightning import sharding

FUSED_DEVICES = ("cuda",)  # where `fused=None` takes the kernel


@functools.cache
def _fused_step() -> Callable | None:
    try:
        from mbti_lightning.triton_adamw import compensated_adamw8bit_step
    except ImportError as error:  # (asked only for CUDA tensors)
        warnings.warn(
            f"AdamW8bit: no fused kernel ({error}); bf16 weights take the slower fp32-copy path", stacklevel=2
        )
        return None
    return compensated_adamw8bit_step


class AdamW8bit(bnb.optim.AdamW8bit):
    """`bnb.optim.AdamW8bit`, with compensated updates for bf16 parameters (fp32 ones are unchanged)
    and an `optim_bits` per param group.

    Args:
        fused: update bf16 tensors with 8-bit states by one Triton kernel; None: on CUDA, when
            Triton is installed and the kernel compiles (else with a warning, the fp32-copy path).
            Other arguments are bitsandbytes'.
    """

    def __init__(self, params, lr: float = 1e-3, *, fused: bool | None = None, **kwargs) -> None:
        super().__init__(params, lr=lr, **kwargs)
        if fused:
            try:
                import mbti_lightning.triton_adamw  # noqa: F401
            except ImportError as error:
                message = f"AdamW8bit(fused=True) needs Triton and bitsandbytes' Triton kernels: {error}"
                raise ImportError(message) from error
        self.fused = fused

    def get_config(self, gindex: int, pindex: int, group: dict) -> dict:
        config = super().get_config(gindex, pindex, group)
        config["optim_bits"] = group.get("optim_bits", self.args.optim_bits)  # not the global manager's
        return config

    @torch.no_grad()
    def step(self, closure=None):
        if self.is_paged:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is not None:
                    if not self.state[p]:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
        return loss

    @torch.no_grad()
    def update_step(self, group: dict, p: torch.Tensor, gindex: int, pindex: int) -> None:
        if p.dtype != torch.bfloat16:
            return super().update_step(group, p, gindex, pindex)
        state = self.state[p]
        p.data, p.grad = p.data.contiguous(), p.grad.contiguous()  # as bitsandbytes does; the kernel reads flat memory
        if "compensation" not in state:
            state["compensation"] = torch.zeros_like(p)
        fused = self.fused if self.fused is not None else p.device.type in FUSED_DEVICES and _fused_step() is not None
        if fused and state["state1"].dtype == torch.uint8:  # (small tensors keep 32-bit moments)
            config = self.get_config(gindex, pindex, group)
            try:  # Triton compiles the kernel at its first launch, before it touches any tensor
                _fused_step()(
                    p.data,
                    p.grad,
                    state,
                    step=state["step"] + 1,
                    lr=config["lr"],
                    betas=config["betas"],
                    eps=config["eps"],
                    weight_decay=config["weight_decay"],
                )
            except Exception as error:
                if self.fused:
                    raise
                warnings.warn(
                    f"AdamW8bit: the fused kernel failed ({type(error).__name__}: {error}); "
                    "bf16 weights take the slower fp32-copy path from now on",
                    stacklevel=2,
                )
                self.fused = False
            else:
                state["step"] += 1
                return
        weight, grad = p.data, p.grad
        # Swap in fp32 tensors so bitsandbytes updates the full-precision weight in place.
        p.data = weight.float().add_(state["compensation"])
        p.grad = grad.float()
        super().update_step(group, p, gindex, pindex)
        updated = p.data
        p.data, p.grad = weight, grad
        weight.copy_(updated)
        state["compensation"].copy_(updated.sub_(weight.float()))


def sharded_adamw8bit(groups: list[dict], lr: float, bf16: bool) -> torch.optim.Optimizer:
    """torchao's 8-bit AdamW, which steps FSDP2's sharded parameters (bitsandbytes' does not: "got mixed
    torch.Tensor and DTensor"); bf16 weights take stochastically rounded updates, torchao's answer to the rounding
    that `AdamW8bit`'s compensation answers. Every group's states are 8-bit (its block-wise quantization has no
    32-bit exception for the embeddings)."""
    try:
        from torchao.optim import AdamW8bit as TorchaoAdamW8bit
    except ImportError:
        raise ImportError(
            'model.optimizer adamw8bit under --trainer.strategy fsdp2 needs torchao: pip install "mbti-lightning[fsdp2]" '
            "(or model.optimizer adamw: fp32 states, 8 bytes a trained weight, sharded too)"
        ) from None
    return TorchaoAdamW8bit(
        [{k: v for k, v in g.items() if k != "optim_bits"} for g in groups], lr=lr, bf16_stochastic_round=bf16
    )


def configure_optimizers(model: torch.nn.Module, groups_of: dict[int, str], hp: Any, total_steps: int) -> dict:
    """The optimizer (`hp.optimizer`) over `model`'s trained parameters in the groups `groups_of` gives them
    (see `backbone.param_groups`), and the learning-rate schedule, for Lightning's `configure_optimizers`."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    def group(name: str) -> list[torch.nn.Parameter]:
        return [p for n, p in named if groups_of[n] == name]

    groups = [
        {"params": group("decay"), "weight_decay": hp.weight_decay},
        {"params": group("no_decay"), "weight_decay": 0.0},  # biases and norms
        # As transformers' Trainer does for adamw_bnb_8bit, embeddings keep 32-bit optimizer states
        # (`optim_bits` is read by AdamW8bit; torch's AdamW keeps its states in fp32 anyway).
        {"params": group("embeddings"), "weight_decay": hp.weight_decay, "optim_bits": 32},
    ]
    choice = hp.optimizer
    if choice == "auto":
        # bitsandbytes' CPU step is slower than torch's AdamW for a real model (docs/real-decoder.md), and its 8 bits
        # save GPU memory a CPU run does not lack; bf16 weights need its compensation.
        fast = params and params[0].device.type == "cpu" and not any(p.dtype == torch.bfloat16 for p in params)
        choice = "adamw" if fast else "adamw8bit"
        rank_zero_info(
            f"optimizer: {'torch AdamW' if fast else 'bitsandbytes 8-bit AdamW'} (model.optimizer auto, "
            f"{'fp32 weights on a CPU' if fast else 'a GPU or bf16 weights'}; set model.optimizer to choose)"
        )
    if choice == "adamw8bit" and sharding.is_sharded(params):
        optimizer = sharded_adamw8bit(groups, hp.learning_rate, bf16=any(p.dtype == torch.bfloat16 for p in params))
    elif choice == "adamw8bit":
        optimizer = AdamW8bit(groups, lr=hp.learning_rate)  # compensated updates for bf16 weights
    elif any(p.dtype == torch.bfloat16 for p in params):
        raise ValueError(
            "model.optimizer 'adamw' would round away most lr-2e-5 updates of bf16 weights; use "
            "'adamw8bit' (which compensates the rounding) or trainer.precision 32-true / bf16-mixed"
        )
    else:
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate)
    warmup = int(hp.warmup_steps * total_steps) if hp.warmup_steps < 1 else int(hp.warmup_steps)
    if hp.lr_schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
