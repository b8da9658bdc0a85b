"""The training loss of one optimizer step: summed over its micro-batches, divided once by the step's total weight.

Lightning divides each micro-batch's loss by ``accumulate_grad_batches``, and DDP averages the gradients over
ranks; a weighted loss needs the step's summed weight over all micro-batches and ranks instead (docs/loss.md).
`StepNormalizedLoss` keeps that sum and rescales the gradients once, before the optimizer steps, and skips batches
whose loss is not finite where the user allows it.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn


class StepNormalizedLoss(L.LightningModule):
    """A LightningModule whose `training_step` returns `step_loss`: a micro-batch's summed (weighted) loss, which
    `on_before_optimizer_step` turns into the step's weighted mean. Subclasses take `skip_nonfinite_batches`."""

    def __init__(self) -> None:
        super().__init__()
        self._step_weight = 0.0  # the current optimizer step's loss normaliser so far: class weights (or rows)
        self._skipped = 0  # batches skipped for a non-finite loss

    def step_loss(self, summed: torch.Tensor, weight: torch.Tensor, rows: int, batch_idx: int) -> torch.Tensor | None:
        """`summed` (a micro-batch's loss summed over rows) to return from `training_step`, `weight` its normaliser;
        logs ``train/loss`` (the micro-batch's mean). None skips the batch where its loss is not finite."""
        if not torch.isfinite(summed):
            return self._nonfinite(summed, batch_idx)
        self._step_weight = self._step_weight + weight
        self.log("train/loss", summed.detach() / weight, batch_size=rows)  # callbacks.ProgressBar shows it
        return summed

    def _nonfinite(self, loss: torch.Tensor, batch_idx: int) -> None:
        where = f"at optimizer step {self.global_step}, batch {batch_idx} of epoch {self.current_epoch}"
        if self._skipped >= self.hparams.skip_nonfinite_batches:
            raise FloatingPointError(
                f"training loss is {loss.item()} {where}. Training stopped; checkpoints already written are "
                f"untouched. Set model.skip_nonfinite_batches to skip up to N such batches (skipped so far: "
                f"{self._skipped})."
            )
        self._skipped += 1
        rank_zero_warn(
            f"skipping a batch with training loss {loss.item()} {where} "
            f"({self._skipped} of at most {self.hparams.skip_nonfinite_batches})"
        )
        self.log("train/skipped_batches", float(self._skipped))
        return None  # Lightning skips the backward pass of this batch

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning divided each micro-batch loss by accumulate_grad_batches and DDP averaged over
        # ranks; undo both and divide by the step's total weight over all ranks instead.
        total = self.trainer.strategy.reduce(torch.as_tensor(self._step_weight, device=self.device), reduce_op="sum")
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / total
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:  # none if every micro-batch of the step was skipped
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))  # private: see tests/test_private_apis.py
        self._step_weight = 0.0
