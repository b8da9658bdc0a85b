"""The compensated 8-bit AdamW step for bf16 weights as one Triton kernel (used on CUDA).

`optim.AdamW8bit`'s plain path rebuilds an fp32 weight and an fp32 gradient per tensor, runs
bitsandbytes' kernel on them and splits the result back: about ten passes over memory. This kernel
reads each weight, compensation, gradient and the two 8-bit states once and writes them back once
(14 bytes per parameter), with bitsandbytes' own block-wise (de)quantisation code and state layout,
so checkpoints are the same either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from bitsandbytes.backends.triton.kernels_8bit_quant import (
    dequant_8bit_blockwise_kernel_util,
    quantize_8bit_blockwise_kernel_util,
)

BLOCK_SIZE = 256  # bitsandbytes' block-wise state: one fp32 absmax per 256 values


@triton.jit
def _compensated_adamw8bit_kernel(
    weight_ptr,
    compensation_ptr,
    grad_ptr,
    state1_ptr,
    state2_ptr,
    qmap1_ptr,
    qmap2_ptr,
    absmax1_ptr,
    absmax2_ptr,
    beta1,
    beta2,
    eps,
    lr,
    weight_decay,
    correction1,
    correction2,
    n_elements,
    BLOCK: tl.constexpr,
):
    block = tl.program_id(axis=0)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements

    weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0)
    fp32_weight = weight.to(tl.float32) + tl.load(compensation_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = dequant_8bit_blockwise_kernel_util(state1_ptr, offsets, qmap1_ptr, absmax1_ptr, mask, BLOCK)
    v = dequant_8bit_blockwise_kernel_util(state2_ptr, offsets, qmap2_ptr, absmax2_ptr, mask, BLOCK)

    # As bitsandbytes' AdamW: decoupled weight decay, bias corrections, the update from the
    # unquantised moments.
    m = tl.where(mask, m * beta1 + (1.0 - beta1) * grad, 0.0)  # past the end: 0, not whatever a masked load gave
    v = tl.where(mask, v * beta2 + (1.0 - beta2) * grad * grad, 0.0)
    fp32_weight = fp32_weight * (1.0 - lr * weight_decay)
    fp32_weight -= (lr / correction1) * (m / (tl.sqrt(v) / correction2 + eps))

    rounded = fp32_weight.to(weight.dtype)
    tl.store(weight_ptr + offsets, rounded, mask=mask)
    remainder = (fp32_weight - rounded.to(tl.float32)).to(weight.dtype)
    tl.store(compensation_ptr + offsets, remainder, mask=mask)
    codes, absmax = quantize_8bit_blockwise_kernel_util(m, qmap1_ptr, 256, BLOCK, 1)  # 256 codes, 1 block
    tl.store(state1_ptr + offsets, codes, mask=mask)
    tl.store(absmax1_ptr + block + tl.arange(0, 1), absmax)
    codes, absmax = quantize_8bit_blockwise_kernel_util(v, qmap2_ptr, 256, BLOCK, 1)
    tl.store(state2_ptr + offsets, codes, mask=mask)
    tl.store(absmax2_ptr + block + tl.arange(0, 1), absmax)


def compensated_adamw8bit_step(
    weight: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step, in place, of a contiguous bf16 `weight` with its bf16 `state["compensation"]` and
    bitsandbytes' 8-bit block-wise moments in `state`; `step` counts from 1, this step included."""
    beta1, beta2 = betas
    correction1, correction2 = 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5
    _compensated_adamw8bit_kernel[(triton.cdiv(weight.numel(), BLOCK_SIZE),)](
        weight,
        state["compensation"],
        grad,
        state["state1"],
        state["state2"],
        state["qmap1"],
        state["qmap2"],
        state["absmax1"],
        state["absmax2"],
        beta1,
        beta2,
        eps,
        lr,
        weight_decay,
        correction1,
        correction2,
        weight.numel(),
        BLOCK=BLOCK_SIZE,
        num_warps=2,
    )
