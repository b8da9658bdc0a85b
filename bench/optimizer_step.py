"""The optimizer step alone, for every parameter of random-init Phi-3-mini in bf16 (`--tiny`: 2 layers).

    python bench/optimizer_step.py [--tiny] [--steps 3]

Times, in milliseconds per step after one untimed step (in (b) and (c) embeddings keep 32-bit
states, as in `MBTIClassifier.configure_optimizers`):
  (a) bitsandbytes' AdamW8bit on the bf16 weights as they are (loses small updates; all states 8-bit: the floor);
  (b) `optim.AdamW8bit`'s plain compensated path (fp32 copies around bitsandbytes' kernel);
  (c) its fused Triton kernel (CUDA, or CPU with TRITON_INTERPRET=1), with the ratio b/c.
(b) and (c) start from the same weights and see the same gradients; the script prints how far apart
their weights end up, against how far (b) moved them.
"""

from __future__ import annotations

import argparse
import os
import time

import bitsandbytes as bnb
import torch
from throughput import sync  # bench/ is on the path when this script runs

from mbti_lightning.optim import AdamW8bit


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="2-layer model on CPU: a smoke run")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    args = parser.parse_args(argv)
    from transformers import AutoModelForSequenceClassification, Phi3Config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if args.tiny else {}
    config = Phi3Config(pad_token_id=32000, **shape)  # Phi-3-mini-4k's shapes by default
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16)
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    embedding = model.get_input_embeddings().weight
    groups = [{"params": [p for p in params if p is not embedding]}, {"params": [embedding], "optim_bits": 32}]
    print(f"{sum(p.numel() for p in params) / 1e6:,.1f} M parameters in {len(params)} tensors on {device}", flush=True)

    variants = {
        "(a) bitsandbytes AdamW8bit, bf16 weights": lambda: bnb.optim.AdamW8bit(params, lr=1e-4),
        "(b) compensated, plain path": lambda: AdamW8bit(groups, lr=1e-4, fused=False),
    }
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":  # or on CPU in Triton's interpreter
        variants["(c) compensated, fused kernel"] = lambda: AdamW8bit(groups, lr=1e-4, fused=True)
    results, plain = {}, None
    for name, make in variants.items():
        for p, s, g in zip(params, start, grads):
            p.data.copy_(s)
            p.grad = g
        optimizer = make()
        optimizer.step()  # states are created here
        sync()
        began = time.perf_counter()
        for _ in range(args.steps):
            optimizer.step()
        sync()
        results[name] = 1000 * (time.perf_counter() - began) / args.steps
        print(f"{name}: {results[name]:.1f} ms per step", flush=True)
        if name.startswith("(b)"):
            plain = [fp32_weight(p, optimizer) for p in params]
        elif name.startswith("(c)"):
            moved = sum((b - s.float()).abs().sum() for b, s in zip(plain, start))
            apart = sum((fp32_weight(p, optimizer) - b).abs().sum() for p, b in zip(params, plain))
            results["b/c"] = results["(b) compensated, plain path"] / results[name]
            print(
                f"speed-up of the fused kernel (b/c): {results['b/c']:.2f}x; weights (c) against (b): "
                f"{apart / moved:.2%} of the distance (b) moved them",
                flush=True,
            )
        del optimizer
    return results


def fp32_weight(param: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    compensation = optimizer.state[param].get("compensation")
    return param.detach().float() + (0 if compensation is None else compensation.float())


if __name__ == "__main__":
    main()
