import lightning as L
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import Phi3Config, PreTrainedTokenizerFast

from mbti_lightning.data import Collator, MBTIDataModule, _Rows
from mbti_lightning.metrics import AuthorMetrics, ClassificationScores
from mbti_lightning.model import MBTIClassifier
from mbti_lightning.tokenizer import load_tokenizer


class GradRecorder(MBTIClassifier):
    """Keeps a copy of the gradients that reach the optimizer."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.grads = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


def first_step_grads(batches: list[dict]) -> dict[str, torch.Tensor]:
    """Gradients of one optimizer step accumulated over `batches`."""
    L.seed_everything(0)
    model = GradRecorder(model_name_or_path="demo", from_scratch=True, class_weights=[0.6, 0.4], optimizer="adamw")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch))
    return model.grads


def test_weighted_loss_under_accumulation_equals_one_big_batch():
    dm = MBTIDataModule(dataset="demo", tokenizer="demo", keep_fraction=0.1)
    dm.setup("fit")
    collate = Collator(dm.tokenizer, pad_to_multiple_of=8)
    rows = _Rows(dm.splits["train"])
    big = collate(rows[list(range(8))])
    micro = [collate(rows[list(range(4))]), collate(rows[list(range(4, 8))])]
    # Different label mixes give different weight sums: a per-micro-batch mean would be wrong here.
    assert micro[0]["labels"].sum() != micro[1]["labels"].sum()

    one, accumulated = first_step_grads([big]), first_step_grads(micro)
    assert one.keys() == accumulated.keys() and len(one) > 10
    for name in one:
        torch.testing.assert_close(accumulated[name], one[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("answer", [0, 1])
def test_mcc_of_a_one_class_prediction_is_zero(answer):
    metrics = ClassificationScores(2, "val/")
    labels = torch.tensor([1] * 59 + [0] * 41)
    metrics.update(torch.full_like(labels, answer), labels)
    result = metrics.compute()
    assert result["val/mcc"] == 0 and not torch.isnan(result["val/mcc"])
    assert result["val/acc"] == pytest.approx(0.59 if answer else 0.41) and result["val/bal_acc"] == 0.5


def test_mcc_matches_its_definition():
    metrics = ClassificationScores(2, "val/")
    metrics.update(torch.tensor([1, 1, 0, 0, 1, 0]), torch.tensor([1, 0, 0, 0, 1, 1]))
    tp, tn, fp, fn = 2, 2, 1, 1
    expected = (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    assert metrics.compute()["val/mcc"].item() == pytest.approx(expected)


def test_author_metrics_match_a_hand_computation():
    # Log-odds of class 1 per post (logits [0, x]); authors 7, 3 and 9 with 2, 3 and 1 posts.
    log_odds = torch.tensor([2.0, -1.0, -3.0, 1.0, 1.0, -0.5])
    metric = AuthorMetrics(num_classes=2)
    metric.majority_class = 1  # the training split's most common class
    # Two updates, as two batches (or two ranks) would give.
    metric.update(torch.stack([torch.zeros(3), log_odds[:3]], 1), torch.tensor([1, 1, 1]), torch.tensor([7, 7, 3]))
    metric.update(torch.stack([torch.zeros(3), log_odds[3:]], 1), torch.tensor([1, 1, 0]), torch.tensor([3, 3, 9]))
    # The posts' evidence summed (a uniform prior): author 7 +1 -> 1 (label 1, right); author 3 -1 -> 0 (label 1,
    # wrong); author 9 -0.5 -> 0 (label 0, right).
    # TP 1, FN 1, TN 1, FP 0: MCC (1*1 - 0) / sqrt(1*2*1*2) = 0.5; F1 of class 1 2/3 and of class 0 2/3, so
    # macro-F1 2/3; balanced acc (0.5 + 1) / 2.
    expected = {
        "author/acc": 2 / 3,
        "author/macro_f1": 2 / 3,
        "author/mcc": 0.5,
        "author/bal_acc": 0.75,
        "author/count": 3,
        "majority_acc": 5 / 6,
        "author/majority_acc": 2 / 3,
    }
    assert {k: pytest.approx(float(v)) for k, v in metric.compute().items()} == expected


def test_majority_baseline_answers_the_training_splits_majority_class():
    # Five of six validation posts are class 1, but training's majority class was 0: the baseline is right once.
    metric = AuthorMetrics(num_classes=2)
    metric.majority_class = 0
    metric.update(torch.zeros(6, 2), torch.tensor([1, 1, 1, 1, 1, 0]), torch.tensor([7, 7, 3, 3, 3, 9]))
    values = metric.compute()
    assert float(values["majority_acc"]) == pytest.approx(1 / 6)
    assert float(values["author/majority_acc"]) == pytest.approx(1 / 3)


def test_model_labels_are_letters_and_pad_matches_tokenizer():
    model = MBTIClassifier(model_name_or_path="demo", from_scratch=True, target="E-I")
    model.configure_model()
    tokenizer = load_tokenizer("demo")
    assert model.model.config.id2label == {0: "E", 1: "I"}
    assert model.model.config.pad_token_id == tokenizer.pad_token_id == tokenizer.eos_token_id


def test_padding_does_not_change_logits():
    """Right padding: the classifier pools the last real token, so padding is invisible."""
    torch.manual_seed(0)
    model = MBTIClassifier(model_name_or_path="demo", from_scratch=True)
    model.configure_model()
    model.eval()
    tokenizer = load_tokenizer("demo")
    texts = ["i plan my week with a calendar", "whatever lol"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    alone = tokenizer(texts[1:], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch)[1], model(**alone)[0], rtol=1e-5, atol=1e-5)


@pytest.fixture
def no_special_tokens_model(tmp_path):
    """A model folder whose tokenizer has no pad, eos or unk token."""
    tokenizer = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp_path)
    Phi3Config(
        vocab_size=3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    ).save_pretrained(tmp_path)
    return tmp_path


def test_tokenizer_without_pad_token_gets_one_and_model_follows(no_special_tokens_model):
    tokenizer = load_tokenizer(str(no_special_tokens_model))
    assert tokenizer.pad_token == "<pad>" and len(tokenizer) == 4
    model = MBTIClassifier(model_name_or_path=str(no_special_tokens_model), from_scratch=True)
    model.configure_model()
    assert model.model.config.pad_token_id == tokenizer.pad_token_id == 3
    assert model.model.get_input_embeddings().num_embeddings == 4
    logits = model(**tokenizer(["hello world", "hello"], padding=True, return_tensors="pt"))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_class_weights_must_match_classes():
    with pytest.raises(ValueError, match="needs one axis and 2 values; got \\[0.2, 0.3, 0.5\\] for J-P"):
        MBTIClassifier(class_weights=[0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="Use 'balanced' or null for several heads"):
        MBTIClassifier(target="all", class_weights=[0.6, 0.4])


def test_skipping_the_padding_mask_is_exact_for_right_padded_causal_models():
    torch.manual_seed(0)
    masked = MBTIClassifier(model_name_or_path="demo", from_scratch=True)
    masked.configure_model()
    unmasked = MBTIClassifier(model_name_or_path="demo", from_scratch=True, skip_padding_mask=True)
    unmasked.model = masked.model
    tokenizer = load_tokenizer("demo")
    batch = tokenizer(
        ["i plan my week with a calendar and a list", "whatever", "chill"],
        padding=True,
        pad_to_multiple_of=8,
        return_tensors="pt",
    )
    masked.eval()
    with torch.no_grad():
        torch.testing.assert_close(unmasked(**batch), masked(**batch), rtol=1e-5, atol=1e-5)


def test_building_the_demo_folder_leaves_the_random_state_alone(tmp_path, monkeypatch):
    """Else a run that builds the demo folder would initialise its model unlike one that finds it cached."""
    from mbti_lightning import demo

    monkeypatch.setenv("MBTI_LIGHTNING_CACHE", str(tmp_path))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    assert (demo.model_dir() / "model.safetensors").is_file()
    assert torch.equal(torch.get_rng_state(), before)


def test_sdpa_kernels_apply_to_the_forward_pass_and_its_recomputation():
    """Gradient checkpointing runs attention again in the backward pass: with the same choice of kernels."""
    model = MBTIClassifier(
        model_name_or_path="demo", from_scratch=True, sdpa_kernels=["math"], gradient_checkpointing=True
    )
    model.configure_model()
    model.train()
    flash_allowed = []
    model.model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda *_: flash_allowed.append(torch.backends.cuda.flash_sdp_enabled())
    )
    batch = load_tokenizer("demo")(["i plan my week", "whatever lol"], padding=True, return_tensors="pt")
    model.backward(model(**batch).sum())
    assert flash_allowed == [False, False]  # the forward pass, then its recomputation
    assert torch.backends.cuda.flash_sdp_enabled()  # and the global choice is left as it was


def test_embeddings_keep_32_bit_optimizer_states_whatever_an_earlier_optimizer_left_behind(monkeypatch):
    """bitsandbytes' process-wide GlobalOptimManager keeps overrides by (group, index) after their
    optimizer is gone; here one says 32 bits for the first tensor of group 0. The classifier's optimizer
    gives its embeddings 32-bit states and its other weights 8-bit ones (bitsandbytes keeps tensors
    under 4,096 values in 32 bits)."""
    import bitsandbytes as bnb

    monkeypatch.setattr(bnb.optim.GlobalOptimManager.get_instance(), "index2config", {(0, 0): {"optim_bits": 32}})
    L.seed_everything(0)
    model = MBTIClassifier(
        model_name_or_path="demo", from_scratch=True, class_weights=[0.6, 0.4], optimizer="adamw8bit"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, MBTIDataModule(dataset="demo", tokenizer="demo", keep_fraction=0.1))

    states = trainer.optimizers[0].state
    bits = {name: 32 if states[p]["state1"].dtype == torch.float32 else 8 for name, p in model.model.named_parameters()}
    assert bits["model.embed_tokens.weight"] == 32
    large = [name for name, p in model.model.named_parameters() if p.numel() >= 4096 and "embed" not in name]
    assert len(large) >= 8 and {bits[name] for name in large} == {8}


def test_a_loaded_model_trains_in_training_mode_and_recomputes_activations():
    """`from_pretrained` returns a model in eval mode and Lightning keeps it so: gradient checkpointing
    (and dropout) would then be off, and a 40 GB preset would run out of memory on real weights."""
    calls = []

    class Checked(MBTIClassifier):
        def configure_model(self) -> None:
            super().configure_model()
            mlp = self.model.model.layers[0].mlp
            forward = mlp.forward

            def counted(hidden_states: torch.Tensor) -> torch.Tensor:  # (forward hooks miss the recomputation)
                calls.append(1)
                return forward(hidden_states)

            mlp.forward = counted

        def training_step(self, batch, batch_idx):
            assert all(module.training for module in self.modules())
            return super().training_step(batch, batch_idx)

    dm = MBTIDataModule(dataset="demo", tokenizer="demo", keep_fraction=0.1, num_workers=0)
    model = Checked(model_name_or_path="demo", gradient_checkpointing=True)  # the demo's saved weights
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    assert len(calls) == 2  # the first decoder layer's MLP ran forward, then again in the backward pass


def test_weight_decay_skips_norms_and_biases_even_when_parameters_are_flat_shards():
    """Under FSDP (`strategy: fsdp`), `configure_optimizers` sees each parameter as a 1-D view of its
    shard; the groups still follow the shapes the model was built with."""

    class Sharded(MBTIClassifier):
        def configure_optimizers(self):
            shapes = [(p, p.shape) for p in self.parameters()]
            for p, _ in shapes:
                p.data = p.data.reshape(-1)
            config = super().configure_optimizers()
            for p, shape in shapes:
                p.data = p.data.view(shape)
            return config

    model = Sharded(model_name_or_path="demo", from_scratch=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, MBTIDataModule(dataset="demo", tokenizer="demo", keep_fraction=0.1))

    decay = {id(p): group["weight_decay"] for group in trainer.optimizers[0].param_groups for p in group["params"]}
    named = dict(model.model.named_parameters())
    assert decay[id(named["model.norm.weight"])] == decay[id(named["model.layers.0.input_layernorm.weight"])] == 0
    assert decay[id(named["model.layers.0.mlp.down_proj.weight"])] == decay[id(named["score.weight"])] == 0.01
    assert decay[id(named["model.embed_tokens.weight"])] == 0.01 and len(decay) == len(named)
