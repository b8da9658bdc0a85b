"""Sharded training (FSDP2), ``--trainer.strategy fsdp2``: each process holds a 1/N shard of the weights, their
gradients and the optimizer's states, the way Lightning recommends for it (``ModelParallelStrategy``, whose
``configure_model`` applies ``torch.distributed.fsdp.fully_shard``); it runs on CPUs (gloo) as on GPUs (NCCL).

`ShardedStrategy` is that strategy with every process a data-parallel shard (no tensor parallelism: Lightning's
default mesh would give one node's processes to tensor parallelism, and a model that only calls ``fully_shard``
would then train each batch twice and shard nothing), and with whole checkpoints: rank 0 gathers the weights and
the optimizer's states into one ``.ckpt`` file, written atomically as every checkpoint of this project, which every
command loads as any other (`loading`) and ``fit --ckpt_path`` resumes sharded again. `shard` is what the model
does in ``configure_model``: each decoder (or encoder) block, then the whole model, sharded over the mesh.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

#: The name `--trainer.strategy` takes.
NAME = "fsdp2"


class ShardedStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with one data-parallel dimension over every process, and whole checkpoints."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs = {"tensor_parallel_size": 1, "save_distributed_checkpoint": False} | kwargs
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # every process: nodes x devices (Lightning's default: the nodes)
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


StrategyRegistry.register(
    NAME,
    ShardedStrategy,
    description="FSDP2 (fully_shard): weights, gradients and optimizer states sharded over every process",
    override=True,
)


def shard(model: torch.nn.Module, mesh: DeviceMesh, blocks: list[torch.nn.Module]) -> None:
    """Shard `model` over the data-parallel `mesh`: each of its repeated `blocks` (gathered one at a time in the
    forward and backward passes), then the rest (embeddings, final norm, head)."""
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(parameters: list[torch.nn.Parameter]) -> bool:
    """Whether `parameters` are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in parameters)
