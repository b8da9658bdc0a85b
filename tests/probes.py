"""Callbacks that watch a run from inside (run in subprocesses, like killing.py)."""

import os

from lightning.pytorch.callbacks import Callback

from mbti_lightning.data import MBTIDataModule


class CountTokenizing(Callback):
    """Appends a line to `out` each time any process of the run tokenizes the splits (builds the cache).

    It patches the data module when the CLI builds it, in every process, before `prepare_data`.
    """

    def __init__(self, out: str) -> None:
        build = MBTIDataModule._build

        def counted(module, raw, tmp):
            with open(out, "a") as f:
                f.write(f"{os.getpid()}\n")
            return build(module, raw, tmp)

        MBTIDataModule._build = counted


class ShardSizes(Callback):
    """Writes `out`.RANK.json at the end of training: how many weights and optimizer-state values this process
    holds (its shards' local sizes) against the model's whole size."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        from torch.distributed.tensor import DTensor

        def local(t):
            return t.to_local().numel() if isinstance(t, DTensor) else t.numel()

        params = list(pl_module.model.parameters())
        states = [v for s in trainer.optimizers[0].state.values() for v in s.values() if hasattr(v, "numel")]
        sizes = {
            "weights": sum(local(p) for p in params),
            "whole": sum(p.numel() for p in params),
            "states": sum(local(v) for v in states if v.ndim > 0),
        }
        with open(f"{self.out}.{trainer.global_rank}.json", "w") as f:
            json.dump(sizes, f)
