"""Where training and validation read tensor values back to Python: a CPU stand-in for GPU synchronisations.

On a GPU, every ``.item()``, ``bool(tensor)``, ``float(tensor)``, ``.tolist()`` or ``.cpu()`` of a
device tensor waits for all queued kernels. This script trains the demo on CPU for a few dozen
batches, then validates on ten, and counts those calls per batch, by where they come from. Reads of tensors that
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
    """Counts value reads in training (from the third batch on, each batch up to the next one's start)
    and in validation batches (without the metrics' computation at the end)."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.batches: collections.Counter = collections.Counter()
        self.calls = {"training": collections.Counter(), "validation": collections.Counter()}
        self._originals = {name: getattr(torch.Tensor, name) for name in READS}

    def __enter__(self) -> Counter:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._counting(name, original))
        return self

    def __exit__(self, *exc_info) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)

    def _counting(self, name: str, original):
        def read(tensor, *args, **kwargs):
            if self.phase and tensor.numel():
                caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
                self.calls[self.phase][f"{name} in {caller.filename.split('site-packages/')[-1]}:{caller.lineno}"] += 1
            return original(tensor, *args, **kwargs)

        return read

    def _start(self, phase: str | None) -> None:
        self.phase = phase
        self.batches[phase] += 1

    def on_train_batch_start(self, trainer, *args) -> None:
        self._start("training" if trainer.global_step >= 2 else None)

    def on_validation_batch_start(self, *args) -> None:
        self._start("validation")

    def on_validation_batch_end(self, *args) -> None:
        self.phase = None

    def on_train_end(self, *args) -> None:
        self.phase = None


def main(args: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Reads per training and per validation batch, by kind and place."""
    from mbti_lightning.cli import cli_main

    args, sys.argv = sys.argv[1:] if args is None else args, sys.argv[:1]
    (REPO / "bench/out").mkdir(parents=True, exist_ok=True)
    os.chdir(REPO / "bench/out")  # where Lightning writes its config.yaml
    cli = cli_main(
        [
            "--config",
            str(REPO / "configs/demo.yaml"),
            "--trainer.max_steps",
            str(BATCHES),
            "--trainer.limit_val_batches",
            "0",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.logger",
            "false",
            "--checkpoint.save_top_k",
            "0",
            "--checkpoint.save_last",
            "false",
            *args,
        ],
        run=False,
    )
    with Counter() as counter:
        cli.trainer.callbacks.append(counter)
        cli.trainer.fit(cli.model, cli.datamodule)
        validation = L.Trainer(
            accelerator=cli.trainer.accelerator,
            devices=1,
            precision=cli.trainer.precision,
            limit_val_batches=10,
            logger=False,
            callbacks=[counter],
        )
        validation.validate(cli.model, cli.datamodule, verbose=False)
    print(f"\ntrainer.log_every_n_steps: {cli.trainer.log_every_n_steps}")
    reads = {}
    for phase, calls in counter.calls.items():
        reads[phase] = {where: count / counter.batches[phase] for where, count in calls.most_common()}
        print(f"reads per {phase} batch ({counter.batches[phase]} batches):")
        for where, per_batch in reads[phase].items():
            print(f"{per_batch:8.2f}  {where}")
    return reads


if __name__ == "__main__":
    main()
