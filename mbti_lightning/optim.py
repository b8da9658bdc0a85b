"""bitsandbytes 8-bit AdamW that updates bf16 weights as precisely as fp32 master weights would.

A bf16 weight has 8 bits of mantissa: an update of 1e-3 of its size (typical at lr 2e-5) is often
rounded away. Instead of a 4-byte fp32 master copy per weight, each bf16 weight keeps a 2-byte bf16
compensation term holding what rounding dropped (Kahan summation). Per tensor, the step rebuilds an
fp32 weight (weight + compensation), applies bitsandbytes' update to it, and splits it back.

bitsandbytes also synchronises the device after every tensor's update, which only paged states
need; here the updates of non-paged states stay queued on the stream like any other kernels.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch


class AdamW8bit(bnb.optim.AdamW8bit):
    """`bnb.optim.AdamW8bit`, with compensated updates for bf16 parameters (fp32 ones are unchanged)."""

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
        if "compensation" not in state:
            state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        weight, grad = p.data, p.grad
        # Swap in fp32 tensors so bitsandbytes updates the full-precision weight in place.
        p.data = weight.float().add_(state["compensation"])
        p.grad = grad.float()
        super().update_step(group, p, gindex, pindex)
        updated = p.data
        p.data, p.grad = weight, grad
        weight.copy_(updated)
        state["compensation"].copy_(updated.sub_(weight.float()))
