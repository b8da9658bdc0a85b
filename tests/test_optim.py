import logging
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from mbti_lightning.optim import AdamW8bit


def train(param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, grads: list[torch.Tensor]) -> None:
    for grad in grads:
        param.grad = grad.to(param.dtype)
        optimizer.step()
        param.grad = None


def test_bf16_weights_with_compensation_move_like_fp32_master_weights():
    """At lr 2e-5, plain bf16 weights lose most updates; compensated ones track fp32 weights."""
    torch.manual_seed(0)
    start = (torch.randn(8192) * 0.02).bfloat16()
    grads = [(torch.randn(8192) * 1e-3 + 5e-4).bfloat16() for _ in range(200)]
    params = {
        name: torch.nn.Parameter(start.clone().to(dtype))
        for name, dtype in [("fp32", torch.float32), ("compensated", torch.bfloat16), ("plain", torch.bfloat16)]
    }
    optimizers = {
        "fp32": AdamW8bit([params["fp32"]], lr=2e-5, weight_decay=0.01),
        "compensated": AdamW8bit([params["compensated"]], lr=2e-5, weight_decay=0.01),
        "plain": bnb.optim.AdamW8bit([params["plain"]], lr=2e-5, weight_decay=0.01),
    }
    for name, param in params.items():
        train(param, optimizers[name], grads)

    reference = params["fp32"].detach()
    moved = (reference - start.float()).abs().mean()
    compensation = optimizers["compensated"].state[params["compensated"]]["compensation"]
    compensated = params["compensated"].detach().float() + compensation.float()
    assert params["compensated"].dtype == torch.bfloat16
    assert (compensated - reference).abs().mean() < 0.01 * moved
    assert (params["plain"].detach().float() - reference).abs().mean() > 0.5 * moved


def test_compensation_is_saved_with_the_optimizer_state():
    param = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    optimizer = AdamW8bit([param], lr=1e-3)
    train(param, optimizer, [torch.ones(4096)])
    restored = AdamW8bit([torch.nn.Parameter(param.detach().clone())], lr=1e-3)
    restored.load_state_dict(optimizer.state_dict())
    (state,) = restored.state.values()
    torch.testing.assert_close(state["compensation"], optimizer.state[param]["compensation"])


def test_fp32_parameters_update_exactly_as_bitsandbytes_does():
    torch.manual_seed(0)
    start, grads = torch.randn(8192), [torch.randn(8192) for _ in range(5)]
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    train(ours, AdamW8bit([ours], lr=1e-3), grads)
    train(theirs, bnb.optim.AdamW8bit([theirs], lr=1e-3), grads)
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=0)


def check_fused_kernel_matches_the_plain_step(device: str) -> None:
    """The one-kernel Triton step and the plain compensated step train bf16 weights alike."""
    torch.manual_seed(0)
    start = (torch.randn(20 * 256 + 77, device=device) * 0.02).bfloat16()  # 20 state blocks and part of one
    grads = [(torch.randn_like(start, dtype=torch.float32) * 1e-3 + 5e-4).bfloat16() for _ in range(5)]
    weights, states = {}, {}
    for fused in (False, True):
        param = torch.nn.Parameter(start.clone())
        optimizer = AdamW8bit([param], lr=1e-3, weight_decay=1.0, fused=fused)
        train(param, optimizer, grads)
        states[fused] = optimizer.state[param]
        weights[fused] = param.detach().float() + states[fused]["compensation"].float()

    moved = (weights[False] - start.float()).abs().mean()
    assert (weights[True] - weights[False]).abs().mean() < 0.005 * moved
    assert states[True]["step"] == states[False]["step"] == 5
    for key in ("state1", "state2"):  # the 8-bit moments: bitsandbytes' CPU and Triton rounding may differ by a level
        assert (states[True][key] != states[False][key]).float().mean() < 0.02


@pytest.mark.slow
def test_fused_kernel_matches_the_plain_step_in_tritons_interpreter():
    pytest.importorskip("triton")
    # The interpreter must be on before any Triton kernel is defined: a process of its own.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parent)}
    code = "import test_optim; test_optim.check_fused_kernel_matches_the_plain_step('cpu')"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.gpu
def test_fused_kernel_matches_the_plain_step_on_cuda():
    check_fused_kernel_matches_the_plain_step("cuda")


def test_fused_step_without_triton_says_what_is_missing(monkeypatch):
    monkeypatch.delitem(sys.modules, "mbti_lightning.triton_adamw", raising=False)
    monkeypatch.setitem(sys.modules, "triton", None)  # as if not installed
    with pytest.raises(ImportError, match="needs Triton and bitsandbytes' Triton kernels: .*triton"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(8))], fused=True)


def test_a_kernel_that_cannot_run_falls_back_to_the_plain_step_with_one_warning(monkeypatch):
    """With `fused=None`, a kernel that fails to compile or launch (here: Triton without a GPU or its
    interpreter) costs speed, not the run: a warning names the error and the plain path takes over."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr("mbti_lightning.optim.FUSED_DEVICES", ("cpu",))  # as if this CPU were a GPU
    torch.manual_seed(0)
    start = (torch.randn(8192) * 0.02).bfloat16()
    grads = [(torch.randn(8192) * 1e-3).bfloat16() for _ in range(3)]
    automatic, plain = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizer = AdamW8bit([automatic], lr=1e-3)
    with pytest.warns(UserWarning, match="the fused kernel failed .*fp32-copy path") as caught:
        train(automatic, optimizer, grads)
    assert sum("fused kernel failed" in str(w.message) for w in caught) == 1
    train(plain, AdamW8bit([plain], lr=1e-3, fused=False), grads)
    torch.testing.assert_close(automatic.detach(), plain.detach(), rtol=0, atol=0)
    assert optimizer.state[automatic]["step"] == 3


@pytest.mark.slow
def test_importing_the_optimizer_prints_no_warning_about_a_4bit_cpu_kernel():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import mbti_lightning.optim"], capture_output=True, text=True)
    assert done.returncode == 0 and "gemm_4bit_forward" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    "asked, dtype, expected, said",
    [
        ("auto", torch.float32, torch.optim.AdamW, "torch AdamW (model.optimizer auto, fp32 weights on a CPU"),
        ("auto", torch.bfloat16, AdamW8bit, "bitsandbytes 8-bit AdamW (model.optimizer auto, a GPU or bf16 weights"),
        ("adamw8bit", torch.float32, AdamW8bit, None),
    ],
)
def test_on_a_cpu_auto_takes_torchs_adamw_for_fp32_weights_and_says_so(asked, dtype, expected, said, caplog):
    """bitsandbytes' CPU step is slower for a real model (docs/real-decoder.md); a config that names the 8-bit one keeps it."""
    from types import SimpleNamespace

    from mbti_lightning.optim import configure_optimizers

    model = torch.nn.Linear(4, 2).to(dtype)
    groups = {name: "decay" for name, _ in model.named_parameters()}
    hp = SimpleNamespace(optimizer=asked, weight_decay=0.0, learning_rate=1e-3, warmup_steps=0, lr_schedule="linear")
    with caplog.at_level(logging.INFO):
        optimizer = configure_optimizers(model, groups, hp, 10)["optimizer"]
    assert type(optimizer) is expected
    assert (said in caplog.text) if said else "model.optimizer auto" not in caplog.text
