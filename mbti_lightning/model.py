"""The LightningModule: a Hugging Face sequence classifier with class-weighted cross entropy."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mbti_lightning import backbone, features, sharding
from mbti_lightning import person_head as person_model
from mbti_lightning.checkpoint import restore, run_metadata, trained_weights
from mbti_lightning.errors import UserError
from mbti_lightning.folding import classification_head, head_inputs
from mbti_lightning.labels import heads
from mbti_lightning.loss import StepNormalizedLoss
from mbti_lightning.metrics import EvalMetrics
from mbti_lightning.persons import Persons, trained_prior


def check_arguments(
    target: str | list[str],
    class_weights: Any,
    peft: dict | None,
    quantize: str | None,
    from_scratch: bool,
    frozen: dict | None = None,
    persons: dict | None = None,
) -> None:
    """Stop on arguments that cannot work together, naming them."""
    found = heads(target)
    classes = max(len(c) for c in found.values())
    if isinstance(class_weights, list) and (len(found) > 1 or len(class_weights) != classes):
        raise ValueError(
            f"model.class_weights as a list needs one axis and {classes} values; got "
            f"{class_weights} for {target}. Use 'balanced' or null for several heads."
        )
    if quantize and peft is None:
        raise ValueError("model.quantize needs model.peft: a 4-bit base can only be trained through adapters")
    if quantize and from_scratch:
        raise ValueError(
            "model.quantize needs model.from_scratch false: bitsandbytes quantizes the base's weights as they load"
        )
    if frozen is not None:
        if peft is not None:
            raise ValueError("model.frozen trains only the head on a frozen backbone's features: leave model.peft null")
        features.settings(frozen)
    if persons is not None:
        if frozen is None:
            raise UserError(
                "model.person_head reads a frozen backbone's post features: set model.frozen ({} for the defaults)"
            )
        person_model.settings(persons)


class MBTIClassifier(StepNormalizedLoss):
    """Fine-tunes ``AutoModelForSequenceClassification`` on one MBTI axis, several axes, or the type.

    One axis: two logits and class-weighted cross entropy, normalised by the summed class weights of
    the whole optimizer step (all micro-batches, all ranks: `StepNormalizedLoss`). Several axes: one logit per axis
    (the log-odds of its second letter; Hugging Face's ``multi_label_classification``) from the same
    backbone pass, each with its own class weights; the loss is the mean over axes of the weighted
    cross entropy, normalised by the step's number of rows. ``mbti``: one 16-way head.

    Args:
        model_name_or_path: Hub id or local folder of the base model (``demo`` for the offline demo).
        target: An axis, a list of axes, ``all`` or ``mbti``; the CLI links it to ``data.target``.
        from_scratch: Build the model from its config with random weights instead of loading them.
        config_overrides: Config fields to change before building, e.g. ``{num_hidden_layers: 2}``.
        class_weights: One weight per class (the seed used ``[0.6, 0.4]`` for J, P; one head only),
            ``balanced`` (n_rows / (n_classes * n_rows_of_class) per head, from the training split),
            or null for none.
        learning_rate: Peak learning rate.
        weight_decay: AdamW weight decay, not applied to biases and norm weights.
        optimizer: ``adamw8bit`` (bitsandbytes 8-bit AdamW, as the seed), ``adamw`` (torch), or ``auto``: torch's
            for fp32 weights on a CPU (bitsandbytes' CPU step is slower), else 8-bit; the log says which.
        lr_schedule: ``linear`` decay to zero after warm-up (the HF Trainer default) or ``constant``.
        warmup_steps: Warm-up length in optimizer steps, or as a fraction of all steps if below 1.
        tf32: Allow TF32 matmuls on CUDA.
        attn_implementation: Attention kernel, e.g. ``sdpa`` or ``eager``.
        sdpa_kernels: The kernels SDPA attention may use, in order of preference (``flash``,
            ``efficient``, ``cudnn``, ``math``); null lets PyTorch choose (cuDNN on H100/H200: 1.5 ms of
            CPU a call in bench/RESULTS.md; the GPU presets prefer flash).
        skip_padding_mask: Don't pass the padding mask. Exact for decoder-only (causal) models with
            right padding: real tokens never attend to the pads after them, and pooling finds the
            last real token from the ids. Without a mask, SDPA can use its flash kernel.
        compile: ``torch.compile`` each decoder block (regional compilation: one block is compiled
            and reused, so warm-up stays short).
        gradient_checkpointing: Recompute activations in the backward pass: much less memory, about
            a third more compute.
        peft: LoRA instead of full fine-tuning, as ``peft.LoraConfig`` settings, e.g. ``{r: 16,
            lora_alpha: 32, lora_dropout: 0.05, target_modules: all-linear}`` (``{}``: peft's
            defaults). The classification head is trained in full and saved with the adapter.
            Needs ``pip install "mbti-lightning[peft]"``. Checkpoints then hold only the trained
            weights; the base is loaded from `model_name_or_path` again (with `from_scratch` the
            random base cannot be rebuilt, so it is saved too).
        quantize: ``nf4``: load the base in 4 bits through bitsandbytes (QLoRA; needs `peft` and a
            CUDA GPU), computing in bf16.
        frozen: Train only the classification head, on a frozen backbone's pooled features, computed once by `fit`
            and cached (see `mbti_lightning.features`): ``{}`` for the mean over a post's tokens of the backbone's
            output, ``{pooling: mean, layer: 6}`` of a hidden layer, ``{pooling: model}`` for what the model's own
            head reads (its export is then an ordinary transformers classifier). Null (the default): fine-tune.
        person_head: Also train a model of persons on those features (needs `frozen`; see
            `mbti_lightning.person_head`): ``{}`` for gated attention over a person's posts, ``{pooling: mean}`` for
            their mean; ``hidden`` (its width, 32) and ``max_posts`` (a person's posts per training step, 64). It
            answers for a person where it beats the summed post evidence on the validation persons (docs/persons.md).
        skip_nonfinite_batches: How many batches with a NaN or infinite loss to skip (with a
            warning) before stopping. At 0 (the default) the first one stops training with an error
            that names the step and batch; checkpoints already written stay as they are. Skipping
            is for single-process runs: under DDP every rank must take the same steps.
    """

    def __init__(
        self,
        model_name_or_path: str = "microsoft/Phi-3-mini-4k-instruct",
        target: str | list[str] = "J-P",
        from_scratch: bool = False,
        config_overrides: dict | None = None,
        class_weights: list[float] | Literal["balanced"] | None = "balanced",
        learning_rate: float = 2e-5,
        weight_decay: float = 0.01,
        optimizer: Literal["auto", "adamw8bit", "adamw"] = "auto",
        lr_schedule: Literal["linear", "constant"] = "linear",
        warmup_steps: float = 0,
        tf32: bool = True,
        attn_implementation: str = "sdpa",
        sdpa_kernels: list[Literal["flash", "efficient", "cudnn", "math"]] | None = None,
        skip_padding_mask: bool = False,
        compile: bool = False,
        gradient_checkpointing: bool = False,
        peft: dict[str, Any] | None = None,
        quantize: Literal["nf4"] | None = None,
        frozen: dict[str, Any] | None = None,
        person_head: dict[str, Any] | None = None,
        skip_nonfinite_batches: int = 0,
    ) -> None:
        super().__init__()
        check_arguments(target, class_weights, peft, quantize, from_scratch, frozen, person_head)
        self.save_hyperparameters()
        self.heads = heads(target)
        classes = max(len(c) for c in self.heads.values())
        if len(self.heads) > 1:  # one logit per axis, named by the letter it predicts
            self.id2label = {i: letters[1] for i, letters in enumerate(self.heads.values())}
        else:
            self.id2label = dict(enumerate(next(iter(self.heads.values()))))
        weights = (
            torch.tensor([class_weights]) if isinstance(class_weights, list) else torch.ones(len(self.heads), classes)
        )
        self.register_buffer("class_weight", weights.float())  # (heads, classes)
        self.model = None
        self.val_metrics, self.test_metrics = EvalMetrics(self.heads), EvalMetrics(self.heads)
        # How posts make a person's answer: the prior the scores carry; set from the training split, or by `loading`.
        self.persons: dict[str, Persons] | None = None
        self.frozen = None if frozen is None else features.settings(frozen)
        # The model of persons (built with the backbone) and, per head, who answers for a person (`person_head.decide`,
        # at each validation of a fit; saved in checkpoints).
        self.person_settings = None if person_head is None else person_model.settings(person_head)
        self.person_head: person_model.PersonHead | None = None
        self.person_decision: dict[str, dict] | None = None
        # With adapters (or a head alone) on a loadable base, checkpoints hold only the trained weights (see
        # on_save_checkpoint).
        self._adapter_only = (peft is not None or frozen is not None) and not from_scratch
        self.strict_loading = not self._adapter_only

    def setup(self, stage: str) -> None:
        if self.hparams.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        counts_of = getattr(self.trainer.datamodule, "train_label_counts", None)
        if counts_of is None and stage == "fit" and self.hparams.class_weights == "balanced":
            rank_zero_warn("model.class_weights 'balanced' needs the data module's label counts; training unweighted")
        if stage == "predict" or counts_of is None:  # plain dataloaders: no majority baseline or balanced weights
            return
        train_counts = [counts.float() for counts in counts_of()]
        for metrics in (self.val_metrics, self.test_metrics):
            metrics.set_majority([int(counts.argmax()) for counts in train_counts])
        if self.hparams.class_weights == "balanced" and stage == "fit":
            for h, counts in enumerate(train_counts):
                if (counts == 0).any():  # the data module stops earlier; this guards custom ones
                    raise ValueError("a class has no training rows, so 'balanced' class weights are undefined")
                self.class_weight[h].copy_(counts.sum() / (len(counts) * counts))
        if self.persons is None or stage == "fit":  # a loaded model brings its own (`loading`): calibrated, fitted
            weights = self.class_weight.float().cpu()
            self.persons = {h: Persons(trained_prior(c, w)) for h, c, w in zip(self.heads, train_counts, weights)}
        for metrics in (self.val_metrics, self.test_metrics):
            metrics.set_priors([p.log_prior for p in self.persons.values()])

    def configure_model(self) -> None:
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if self.model is None:
            self._build()
        if self.frozen is not None and fitting:
            self._use_features()

    def _build(self) -> None:
        self.model = backbone.build(self.hparams, self.id2label, self.heads)
        if self.frozen is not None:  # only the head trains
            self.model.requires_grad_(False)
            classification_head(self.model).requires_grad_(True)
        if self.person_settings is not None:
            width = classification_head(self.model).in_features
            self.person_head = person_model.PersonHead(width, self.heads, **self.person_settings)
        self._param_group = backbone.param_groups(self.model)
        self._flops_per_token = backbone.training_flops_per_token(self.model)
        if self.device_mesh is not None:  # --trainer.strategy fsdp2
            sharding.shard(self.model, self.device_mesh["data_parallel"], backbone.repeated_blocks(self.model))

    def _use_features(self) -> None:
        """In `fit`, before Lightning builds the training loader (it counts its steps for the schedule): the data
        module's training and validation batches carry the frozen backbone's features, computed or read here."""
        dm = self.trainer.datamodule
        with backbone.sdpa_kernels(self.hparams.sdpa_kernels):
            dm.features = features.cached(
                self.model,
                dm,
                ("train", "validation"),
                self.frozen,
                self.trainer.precision_plugin.forward_context,
                pass_mask=not self.hparams.skip_padding_mask,
            )
        self._head_start = time.perf_counter()
        if self.person_head is not None:
            start = time.perf_counter()
            done = person_model.fit(self.person_head, dm, self.person_settings["max_posts"])
            rank_zero_info(
                f"person head: {done['persons']} training persons ({done['held_out']} more held out to stop on), "
                f"{done['epochs']} epochs, {time.perf_counter() - start:.1f} s"
            )

    def on_fit_end(self) -> None:
        if self.frozen is not None:
            seconds = time.perf_counter() - self._head_start
            rank_zero_info(f"head fit: {seconds:.1f} s on the frozen backbone's cached features")
        for head, decided in (self.person_decision or {}).items():
            rank_zero_info(f"a person's answer, {head}: {decided['answer']} ({decided['why']})")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._adapter_only:  # the frozen base is model_name_or_path's; keep adapters, head and buffers
            checkpoint["state_dict"] = trained_weights(checkpoint["state_dict"], self)
        checkpoint["mbti_lightning"] = run_metadata(self)  # what mbti-lightning-export needs

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore(self, checkpoint)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch, seq) right-padded token ids -> (batch, num_labels) logits in fp32."""
        mask = None if self.hparams.skip_padding_mask else attention_mask
        with backbone.sdpa_kernels(self.hparams.sdpa_kernels):
            if self.frozen is None or self.frozen["pooling"] == "model":
                return self.model(input_ids=input_ids, attention_mask=mask).logits.float()
            pooling, layer = self.frozen["pooling"], self.frozen["layer"]
            x = features.pooled(self.model, input_ids, attention_mask, pooling, layer, mask is not None)
            return classification_head(self.model)(x).float()

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        # Gradient checkpointing runs the forward pass again in here.
        with backbone.sdpa_kernels(self.hparams.sdpa_kernels):
            super().backward(loss, *args, **kwargs)

    def head_logits(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """(batch, num_labels) -> one (batch, classes) tensor per head; an axis's logit z becomes [0, z]."""
        if len(self.heads) == 1:
            return [logits]
        return list(torch.stack([torch.zeros_like(logits), logits], -1).unbind(1))

    def _shared_step(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head logits, (batch, heads) labels, cross entropy and class weights; the loss stays in fp32. A batch of
        a frozen backbone's features (``model.frozen``, in `fit`) goes through the head alone."""
        if "features" in batch:
            head = classification_head(self.model)
            logits = self.head_logits(head(batch["features"].to(head.weight.dtype)).float())
        else:
            logits = self.head_logits(self(batch["input_ids"], batch["attention_mask"]))
        labels = batch["labels"].view(len(batch["labels"]), -1)
        ce = torch.stack([F.cross_entropy(x, y, reduction="none") for x, y in zip(logits, labels.T)], 1)
        return logits, labels, ce, self.class_weight.float().gather(1, labels.T).T

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        _, _, ce, weight = self._shared_step(batch)
        # Read by callbacks.Throughput.
        if "features" in batch:  # the head alone: 6 FLOPs per weight and row
            self.flops_per_batch = 6 * classification_head(self.model).weight.numel() * len(ce)
        else:
            seq = batch["input_ids"].shape[1]
            tokens = batch["num_tokens"]
            self.flops_per_batch = backbone.flops_per_batch(self.model, self._flops_per_token, seq, tokens)
        norm = weight.sum().detach() if len(self.heads) == 1 else weight.new_tensor(len(ce))
        # Summed, not averaged: the step's weight (or rows) divides it once (`StepNormalizedLoss`).
        return self.step_loss((weight * ce).sum() / len(self.heads), norm, len(ce), batch_idx)

    def _eval_step(self, batch: dict, metrics: EvalMetrics) -> None:
        # A person head reads the posts' features: a frozen fit's batches carry them, else the head's inputs.
        wanted = self.person_head is not None and "features" not in batch
        with head_inputs(self.model) if wanted else contextlib.nullcontext() as inputs:
            logits, labels, ce, weight = self._shared_step(batch)
        features = None
        if self.person_head is not None:
            features = torch.cat(inputs) if wanted else batch["features"]
        authors = batch["author"]
        if batch.get("padded"):  # leave out the copies that only keep ranks in step (sampling.PADDING)
            keep = batch["row"] >= 0
            logits, (labels, ce, weight, authors) = (
                [x[keep] for x in logits],
                (x[keep] for x in (labels, ce, weight, authors)),
            )
            features = None if features is None else features[keep]
        if len(self.heads) == 1:  # the weighted mean over the whole set, as one large batch
            metrics.update(logits, labels, ce[:, 0], weight[:, 0], authors, features)
        else:
            metrics.update(logits, labels, (weight * ce).mean(1), torch.ones_like(ce[:, 0]), authors, features)

    def _log_eval_metrics(self, stage: str, metrics: EvalMetrics) -> None:
        if self.person_head is not None:  # ``author/*``: the person head's answers where it answers a head
            metrics.set_person_answers(person_model.metric_answers(self))
        if metrics.loss.update_called:
            # compute() gathers every rank's state, so each rank logs the same values.
            self.log_dict({f"{stage}/{name}": value for name, value in metrics.compute().items()}, sync_dist=True)
            metrics.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        if self.person_head is not None and getattr(self.trainer.datamodule, "features", None):
            self.person_decision = person_model.decide_on_validation(self, self.trainer.datamodule)
        self._log_eval_metrics("val", self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test", self.test_metrics)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Row numbers, per head the (batch, classes) logits in class-id order and, where the person head answers for
        persons, the (batch, features) post features it reads."""
        wanted = person_model.uses_features(self)
        with head_inputs(self.model) if wanted else contextlib.nullcontext() as inputs:
            logits = self.head_logits(self(batch["input_ids"], batch["attention_mask"]))
        return {"row": batch["row"], "logits": dict(zip(self.heads, logits))} | (
            {"features": torch.cat(inputs)} if wanted else {}
        )

    def configure_optimizers(self) -> dict:
        from mbti_lightning.optim import configure_optimizers  # bitsandbytes, imported only when training

        return configure_optimizers(
            self.model, self._param_group, self.hparams, self.trainer.estimated_stepping_batches
        )
