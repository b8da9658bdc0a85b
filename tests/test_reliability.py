import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mbti_lightning.data import MBTIDataModule
from mbti_lightning.model import MBTIClassifier


class NaNAtStep(MBTIClassifier):
    """Produces a NaN loss in the first batch of optimizer step `bad_step`."""

    bad_step = 3

    def forward(self, input_ids, attention_mask):
        logits = super().forward(input_ids, attention_mask)
        return logits * float("nan") if self.training and self.global_step == self.bad_step else logits


def fit(tmp_path, **model_kwargs):
    L.seed_everything(0)
    dm = MBTIDataModule(dataset="demo", tokenizer="demo", keep_fraction=0.1, batch_size=16, num_workers=0)
    model = NaNAtStep(model_name_or_path="demo", from_scratch=True, learning_rate=1e-3, **model_kwargs)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint])  # fmt: skip
    trainer.fit(model, dm)
    return trainer


def test_nonfinite_loss_stops_with_step_and_batch_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="training loss is nan at optimizer step 3, batch 3 of epoch 0"):
        fit(tmp_path)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2  # the last good save, not overwritten on the way out
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_nonfinite_batches_can_be_skipped_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="skipping a batch with training loss nan at optimizer step 3"):
        trainer = fit(tmp_path, skip_nonfinite_batches=1)
    assert trainer.global_step == 6 and trainer.lightning_module._skipped == 1
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
