"""Checkpoints that are whole or absent, and the random generator states that make a resume exact."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from mbti_lightning.cache import atomic_open
from mbti_lightning.errors import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, syncs it to disk, then renames it into place.

    So `last.ckpt` is always either the previous checkpoint or the new one. (Lightning's own writer
    stages the file in the system's temporary directory, which is often another file system; moving
    it from there is a copy that a kill can cut short.) Remote paths such as ``s3://`` go to
    Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_open(Path(path)) as f:
            torch.save(checkpoint, f)


def rng_states() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's generators, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` saved; of the CUDA states, those of the devices visible here.

    (A checkpoint saved on an 8-GPU node may be resumed where fewer GPUs are visible; each process
    of a run uses the state of its own device index.)
    """
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy(), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        for device, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


def restore(module: Any, checkpoint: dict) -> None:
    """What a `MBTIClassifier` does with a checkpoint it loads: stop where it predicts other heads than `module`;
    continue the run's random streams only for a resumed fit (validate, test, predict and the export, which loads
    with no trainer, must not change the caller's)."""
    saved = checkpoint.get("mbti_lightning", {})
    if "heads" in saved and saved["heads"] != module.heads:
        raise UserError(
            f"the checkpoint predicts {', '.join(saved['heads'])} but this run's target is "
            f"{', '.join(module.heads)}; set data.target to the checkpoint's"
        )
    try:
        fitting = module.trainer.state.fn == TrainerFn.FITTING
    except RuntimeError:  # not attached to a trainer
        fitting = False
    module.person_decision = saved.get("person_head")
    if "rng" in saved and fitting:
        set_rng_states(saved["rng"])


def trained_weights(state_dict: dict[str, Any], module: torch.nn.Module) -> dict[str, Any]:
    """`state_dict` less the frozen weights of `module.model` (a LoRA base, which is loaded again from
    its source): the adapters, the head, and everything outside the backbone (buffers)."""
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in state_dict.items() if k in trained or not k.startswith("model.")}


def run_metadata(module: Any) -> dict[str, Any]:
    """What mbti-lightning-export needs beyond the weights and hyperparameters: the labels, which rows the splits
    held (`MBTIDataModule.split_fingerprint`), the training split's class counts (the prior, see `persons`), where the run's metrics and resolved config (written by the
    CLI) are; and the random generators, which Lightning does not restore on resume."""
    log_dir = Path(module.trainer.log_dir).resolve() if module.trainer.log_dir else None
    config = log_dir / "config.yaml" if log_dir else None
    fingerprint = getattr(module.trainer.datamodule, "split_fingerprint", None)
    counts = getattr(module.trainer.datamodule, "train_label_counts", None)
    return {
        "splits": fingerprint() if fingerprint else None,
        "train_counts": [c.tolist() for c in counts()] if counts else None,
        "local_model": Path(module.hparams.model_name_or_path).exists(),
        "id2label": module.id2label,
        "heads": module.heads,
        "log_dir": str(log_dir) if log_dir else None,
        "config": yaml.safe_load(config.read_text()) if config and config.is_file() else None,
        "person_head": module.person_decision,  # who answers for a person, per head
        "rng": rng_states(),
    }
