"""Where the training loop reads tensor values back to Python: a CPU stand-in for GPU synchronisations.

On a GPU, every ``.item()``, ``bool(tensor)``, ``float(tensor)``, ``.tolist()`` or ``.cpu()`` of a
device tensor waits for all queued kernels. This script trains the demo on CPU for a few dozen
batches and counts those calls per training batch, by where they come from. Reads of tensors that
are on the CPU by design (the sampler's indices, the collator's token counts) show up too; the
file names tell them apart. Explicit ``torch.cuda.synchronize()`` calls are not seen here.

    python bench/host_reads.py [--model.skip_padding_mask true ...]   # extra arguments go to the CLI
"""

from __future__ import annotations

import collections
import os
import sys
import traceback
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
READS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")
BATCHES = 40


class Counter(L.Callback):
    """Counts value reads from the start of the third training batch to the end of training."""

    def __init__(self) -> None:
        self.active, self.batches = False, 0
        self.calls: collections.Counter = collections.Counter()
        for name in READS:
            self._wrap(name)

    def _wrap(self, name: str) -> None:
        original = getattr(torch.Tensor, name)

        def read(tensor, *args, **kwargs):
            if self.active and tensor.numel():
                caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
                self.calls[f"{name} in {caller.filename.split('site-packages/')[-1]}:{caller.lineno}"] += 1
            return original(tensor, *args, **kwargs)

        setattr(torch.Tensor, name, read)

    def on_train_batch_start(self, trainer, *args) -> None:  # counts until the next batch starts
        self.active = trainer.global_step >= 2
        self.batches += self.active

    def on_train_end(self, *args) -> None:
        self.active = False


def main(args: list[str] | None = None) -> dict[str, float]:
    """Reads per training batch, by kind and place."""
    from mbti_lightning.cli import cli_main

    args, sys.argv = sys.argv[1:] if args is None else args, sys.argv[:1]
    (REPO / "bench/out").mkdir(parents=True, exist_ok=True)
    os.chdir(REPO / "bench/out")  # where Lightning writes its config.yaml
    cli = cli_main(
        ["--config", str(REPO / "configs/demo.yaml"), "--trainer.max_steps", str(BATCHES),
         "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
         "--checkpoint.save_top_k", "0", "--checkpoint.save_last", "false", *args],
        run=False,
    )  # fmt: skip
    counter = Counter()
    cli.trainer.callbacks.append(counter)
    cli.trainer.fit(cli.model, cli.datamodule)
    reads = {where: count / counter.batches for where, count in counter.calls.most_common()}
    print(f"\nreads per training batch ({counter.batches} batches, log_every_n_steps {cli.trainer.log_every_n_steps}):")
    for where, per_batch in reads.items():
        print(f"{per_batch:8.2f}  {where}")
    return reads


if __name__ == "__main__":
    main()
