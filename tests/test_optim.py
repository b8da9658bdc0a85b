import bitsandbytes as bnb
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
    params = {name: torch.nn.Parameter(start.clone().to(dtype))
              for name, dtype in [("fp32", torch.float32), ("compensated", torch.bfloat16), ("plain", torch.bfloat16)]}  # fmt: skip
    optimizers = {"fp32": AdamW8bit([params["fp32"]], lr=2e-5, weight_decay=0.01),
                  "compensated": AdamW8bit([params["compensated"]], lr=2e-5, weight_decay=0.01),
                  "plain": bnb.optim.AdamW8bit([params["plain"]], lr=2e-5, weight_decay=0.01)}  # fmt: skip
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
