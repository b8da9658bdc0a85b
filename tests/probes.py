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
