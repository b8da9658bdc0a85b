"""Length-aware batching: fewer pad tokens in training, sorted batches in evaluation and serving."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler

#: With fewer evaluation rows than ranks, a rank still gets a batch: a copy of row i, given as
#: ``PADDING - i`` (negative). Readers of such a batch use the row and leave the copy out of every result.
PADDING = -1


class LengthGroupedSampler(DistributedSampler):
    """Yields whole batches (lists of row indices) of rows with similar token lengths.

    Training (`shuffle=True`): each epoch, a seeded permutation is cut into megabatches of
    ``megabatch * batch_size * num_replicas`` rows; each megabatch is sorted by length and cut into
    batches; the batch order is shuffled and the longest batch goes first, so an out-of-memory shows
    at the first step. ``megabatch=0`` gives plain random batches. Evaluation (`shuffle=False`): all
    rows sorted by length, longest first, each row exactly once over all ranks (no padding rows, so
    metrics synced across ranks equal one process's), in as many batches on every rank (with fewer
    rows than ranks, some batches hold a marked copy of a row instead; see `PADDING`).

    Every rank builds the same batch list and takes every `num_replicas`-th batch (training drops
    the few batches that would leave ranks uneven). It subclasses `DistributedSampler` so that
    Lightning calls `set_epoch` on it and does not wrap it a second time. `resume` skips the batches
    of an epoch that a checkpoint had already trained on.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        megabatch: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.lengths = torch.as_tensor(lengths)
        self.batch_size = batch_size
        self.megabatch = megabatch
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches to skip)

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next iteration over `epoch` start after its first `batches_done` batches. The epoch is set here
        too: Lightning makes the iterator of a resumed fit before it calls `set_epoch`, and uses that one."""
        self.set_epoch(epoch)
        self._resume_at = (epoch, batches_done)

    def _batches(self) -> list[list[int]]:
        if not self.shuffle:
            order = torch.argsort(self.lengths, descending=True, stable=True)
            # As many batches as batch_size needs, rounded up so that every rank gets the same number.
            n = math.ceil(math.ceil(len(order) / self.batch_size) / self.num_replicas) * self.num_replicas
            if len(order) < n:  # fewer rows than batches: fill the empty ones with marked copies (see PADDING)
                order = torch.cat([order, PADDING - order[: n - len(order)]])
            return [chunk.tolist() for chunk in order.tensor_split(n)]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=generator)
        if not self.megabatch:
            batches = list(perm.split(self.batch_size))
        else:
            batches = []
            for mega in perm.split(self.megabatch * self.batch_size * self.num_replicas):
                mega = mega[torch.argsort(self.lengths[mega], descending=True, stable=True)]
                batches += list(mega.split(self.batch_size))
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
            longest = max(range(len(batches)), key=lambda i: self.lengths[batches[i]].max())
            batches.insert(0, batches.pop(longest))
        usable = len(batches) // self.num_replicas * self.num_replicas
        return [batch.tolist() for batch in batches[:usable]]

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the epoch and the resume point are read at the first batch, not when the iterator is made
        # (a strategy that restores a checkpoint after its setup, FSDP2's, has Lightning make it before).
        batches = self._batches()[self.rank :: self.num_replicas]
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            batches = batches[self._resume_at[1] :]
        self._resume_at = None
        yield from batches

    def __len__(self) -> int:
        return len(self._batches()[self.rank :: self.num_replicas])


def runs_within(lengths: Sequence[int], tokens: int) -> list[list[int]]:
    """Indices of `lengths` sorted by length, cut into runs whose padded size (rows x the run's longest) stays
    within `tokens` (a longer row runs alone)."""
    runs: list[list[int]] = [[]]
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if runs[-1] and (len(runs[-1]) + 1) * lengths[i] > tokens:
            runs.append([])
        runs[-1].append(i)
    return runs if runs[0] else []
