"""Every private or internal name of a dependency that the package uses, so that an upgrade that moves
one fails here, as one clear message, rather than somewhere in a run. pyproject.toml bounds these
dependencies to the versions tested; raise a bound only together with this test passing."""

import importlib
from importlib.metadata import version

import pytest

#: (distribution, module, attribute path, where mbti_lightning uses it)
PRIVATE = [
    (
        "datasets",
        "datasets.utils.stratify",
        "stratified_shuffle_split_generate_indices",
        "data.stratified_split: seed parity",
    ),
    ("lightning", "lightning.fabric.utilities.throughput", "_plugin_to_compute_dtype", "callbacks.Throughput"),
    ("lightning", "lightning.pytorch.loops.fit_loop", "_FitLoop._should_accumulate", "callbacks._logging_now"),
    (
        "lightning",
        "lightning.pytorch.trainer.connectors.logger_connector.logger_connector",
        "_LoggerConnector.should_update_logs",
        "callbacks._logging_now (trainer._logger_connector)",
    ),
    ("lightning", "lightning.pytorch.cli", "LightningCLI._parse_ckpt_path", "cli: command-line model options win"),
    ("lightning", "lightning.pytorch.cli", "LightningCLI._instantiate_trainer", "cli: enable_checkpointing false"),
    ("lightning", "lightning.pytorch.cli", "LightningCLI._get", "cli: enable_progress_bar false"),
    (
        "lightning",
        "lightning.pytorch.callbacks.progress.rich_progress",
        "RichProgressBar._get_train_description",
        "callbacks.ProgressBar: no 'Epoch 0/-2' under max_steps",
    ),
    ("bitsandbytes", "bitsandbytes.optim.optimizer", "Optimizer8bit.get_config", "optim.AdamW8bit"),
    ("bitsandbytes", "bitsandbytes.optim.optimizer", "Optimizer8bit.update_step", "optim.AdamW8bit"),
    ("bitsandbytes", "bitsandbytes.optim.optimizer", "Optimizer8bit.init_state", "optim.AdamW8bit"),
    ("bitsandbytes", "bitsandbytes.optim.optimizer", "Optimizer8bit.check_overrides", "optim.AdamW8bit.step"),
    ("bitsandbytes", "bitsandbytes.optim.optimizer", "Optimizer8bit.to_gpu", "optim.AdamW8bit.step"),
    ("litserve", "litserve.loops.base", "collate_requests", "serve.WhatIsWaiting"),
    ("litserve", "litserve.loops", "BatchedLoop.get_batch_requests", "serve.WhatIsWaiting"),
    ("litserve", "litserve", "LitServer._init_manager", "serve.DirectQueues"),
    ("litserve", "litserve.transport.process_transport", "MPQueueTransport", "serve.DirectQueues"),
    ("transformers", "transformers.initialization", "no_init_weights", "loading.model_from_checkpoint"),
    ("torch", "torch", "_foreach_mul_", "model.MBTIClassifier.on_before_optimizer_step"),
    ("peft", "peft.utils.other", "ModulesToSaveWrapper.active_adapters", "folding.classification_head"),
]


def _trainer():
    from lightning.pytorch import Trainer

    return Trainer(logger=False)


def _adamw8bit():
    import bitsandbytes as bnb
    import torch

    return bnb.optim.AdamW8bit([torch.nn.Parameter(torch.zeros(4))])


def _wrapped_head():
    import torch
    from peft.utils.other import ModulesToSaveWrapper

    return ModulesToSaveWrapper(torch.nn.Linear(2, 2), "default")


def _trainer_loop():
    return _trainer().fit_loop.epoch_loop


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"x": [1]})


#: Names that exist only on instances: (distribution, a maker of an instance, attribute, where used).
INSTANCE = [
    ("lightning", _trainer, "_logger_connector", "callbacks._logging_now"),
    ("bitsandbytes", _adamw8bit, "is_paged", "optim.AdamW8bit.step"),
    ("bitsandbytes", _adamw8bit, "initialized", "optim.AdamW8bit.step"),
    ("datasets", _dataset, "_fingerprint", "data.MBTIDataModule: the cache key"),
    ("peft", _wrapped_head, "modules_to_save", "folding.classification_head"),
    ("peft", _wrapped_head, "original_module", "backbone.training_flops_per_token"),
    ("lightning", _trainer_loop, "batch_progress", "data.MBTIDataModule: the resumable loader's position"),
]
#: bitsandbytes' Triton kernels, which the fused optimizer step builds on (needs Triton).
TRITON = [
    (
        "bitsandbytes",
        "bitsandbytes.backends.triton.kernels_8bit_quant",
        "dequant_8bit_blockwise_kernel_util",
        "triton_adamw",
    ),
    (
        "bitsandbytes",
        "bitsandbytes.backends.triton.kernels_8bit_quant",
        "quantize_8bit_blockwise_kernel_util",
        "triton_adamw",
    ),
]


def moved(dist: str, module: str, name: str, where: str, error: Exception) -> str:
    return (
        f"{dist} {version(dist)} no longer has {module}.{name} ({type(error).__name__}: {error}), which "
        f"mbti_lightning uses in {where}; adapt that code, or keep {dist} at the versions pyproject.toml allows"
    )


@pytest.mark.parametrize("dist, module, name, where", PRIVATE + TRITON, ids=lambda x: x if "." in str(x) else None)
def test_private_name_is_there(dist, module, name, where):
    if (dist, module, name, where) in TRITON:
        pytest.importorskip("triton")
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as error:
        pytest.fail(moved(dist, module, name, where, error))


@pytest.mark.parametrize("dist, make, name, where", INSTANCE)
def test_private_instance_attribute_is_there(dist, make, name, where):
    instance = make()
    try:
        getattr(instance, name)
    except AttributeError as error:
        pytest.fail(moved(dist, type(instance).__module__, f"{type(instance).__name__}().{name}", where, error))


def test_the_sharded_strategy_finds_lightnings_mesh_sizes_where_it_sets_them():
    """sharding.ShardedStrategy sets ModelParallelStrategy's `_data_parallel_size` (no public setter) before Lightning
    builds the mesh from it."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    assert ModelParallelStrategy()._data_parallel_size == "auto"
