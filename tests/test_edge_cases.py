"""Edge cases of real runs, larger than the other tests: each test fails without its fix."""

import os
import stat

import pytest
import torch
import yaml
from conftest import REPO

from mbti_lightning import backbone, cache, checkpoint
from mbti_lightning.cli import cli_main, keys_given
from mbti_lightning.data import Collator, MBTIDataModule, _Rows
from mbti_lightning.model import MBTIClassifier
from mbti_lightning.sampling import PADDING, LengthGroupedSampler


def test_a_checkpoint_from_more_gpus_than_are_visible_restores_the_ones_there(monkeypatch):
    """Saved on an 8-GPU node, resumed where one is visible: set_rng_state_all would ask for device 7."""
    states = checkpoint.rng_states() | {"cuda": [torch.zeros(16, dtype=torch.uint8) + i for i in range(8)]}
    restored = {}

    def set_rng_state(state, device="cuda"):
        if device not in (0, "cuda"):
            raise RuntimeError(f"invalid device ordinal {device}")
        restored[device] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    checkpoint.set_rng_states(states)
    assert list(restored) == [0] and torch.equal(restored[0], states["cuda"][0])


def test_loading_a_checkpoint_outside_a_resume_leaves_the_random_state_alone(tmp_path):
    model = MBTIClassifier(model_name_or_path="demo", from_scratch=True)
    saved = {"mbti_lightning": {"heads": model.heads, "rng": checkpoint.rng_states()}}
    torch.rand(3)  # the process moves on
    before = torch.get_rng_state()
    model.on_load_checkpoint(saved)  # as export and load_from_checkpoint do, with no trainer
    assert torch.equal(torch.get_rng_state(), before)


def test_fewer_rows_than_ranks_still_give_every_rank_the_same_batches():
    ranks = [
        list(LengthGroupedSampler([5, 3, 4], batch_size=2, shuffle=False, num_replicas=4, rank=r)) for r in range(4)
    ]
    assert [len(batches) for batches in ranks] == [1, 1, 1, 1]
    rows = [row for batches in ranks for batch in batches for row in batch]
    assert sorted(row for row in rows if row >= 0) == [0, 1, 2]  # each real row once
    assert all(PADDING - row in (0, 1, 2) for row in rows if row < 0)  # the rest are marked copies


def test_marked_copies_are_left_out_of_the_metrics():
    dm = MBTIDataModule(dataset="demo", tokenizer="demo", keep_fraction=0.1, num_workers=0)
    dm.setup("validate")
    rows, collate = _Rows(dm.splits["validation"]), Collator(dm.tokenizer, 8)
    model = MBTIClassifier(model_name_or_path="demo", from_scratch=True, class_weights=None)
    model.configure_model()
    with torch.no_grad():
        model._eval_step(collate(rows[[0, 1]]), model.val_metrics)
        plain = model.val_metrics.compute()
        model.val_metrics.reset()
        padded = collate(rows[[0, 1, PADDING - 0]])
        assert padded["padded"]
        model._eval_step(padded, model.val_metrics)
        with_copy = model.val_metrics.compute()
    assert with_copy["author/count"] == plain["author/count"]
    assert with_copy["loss"] == pytest.approx(plain["loss"].item()) and with_copy["acc"] == plain["acc"]


def test_compile_finds_the_decoder_blocks_of_a_model_that_does_not_name_them(monkeypatch):
    from transformers import Phi3PreTrainedModel

    monkeypatch.setattr(Phi3PreTrainedModel, "_no_split_modules", None)
    model = MBTIClassifier(model_name_or_path="demo", from_scratch=True, compile=True)
    model.configure_model()
    layers = model.model.model.layers
    assert len(layers) > 1 and all(layer._compiled_call_impl is not None for layer in layers)
    assert model.model.score._compiled_call_impl is None


def phi3_weights_from_config(config, num_labels: int) -> tuple[int, int]:
    """(decoder weights, head weights) of a Phi-3 classifier, counted from its config: no embedding, no biases."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * h // config.num_attention_heads
    per_layer = h * (h + 2 * kv) + h * h + h * 2 * i + i * h + 2 * h  # qkv, o, gate_up, down, two norms
    return layers * per_layer + h, h * num_labels  # the final norm; the score head


@pytest.mark.parametrize("four_bit", [False, True])
def test_flops_count_six_per_trained_and_four_per_frozen_weight_of_the_config(four_bit):
    """Counted from the config, not from the parameters: a packed 4-bit weight holds two weights per element."""
    import bitsandbytes as bnb

    model = MBTIClassifier(model_name_or_path="demo", from_scratch=True, peft={"r": 4, "target_modules": ["o_proj"]})
    model.configure_model()
    decoder, head = phi3_weights_from_config(model.model.config, num_labels=2)
    r, h = 4, model.model.config.hidden_size
    lora = model.model.config.num_hidden_layers * 2 * r * h  # A (r x h) and B (h x r) per o_proj
    if four_bit:  # QLoRA's base: every frozen qkv_proj stored in 4 bits (quantized as it moves to a device)
        for layer in model.model.base_model.model.model.layers:
            old = layer.self_attn.qkv_proj
            packed = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, quant_type="nf4")
            packed.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, quant_type="nf4")
            layer.self_attn.qkv_proj = packed.to("cpu")
        assert layer.self_attn.qkv_proj.weight.numel() * 2 == old.weight.numel()
    assert backbone.training_flops_per_token(model.model) == 6 * (lora + head) + 4 * decoder


def test_atomic_files_get_the_usual_mode_without_touching_the_umask(tmp_path, monkeypatch):
    umask = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("os.umask changes process-wide state"))
        with cache.atomic_open(tmp_path / "f.bin") as f:
            f.write(b"x")
    finally:
        monkeypatch.undo()
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_checkpointing_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        [
            "fit",
            "--config",
            str(REPO / "configs/demo.yaml"),
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
        ]
    )
    assert cli.trainer.global_step == 2 and cli.trainer.checkpoint_callback is None
    assert not (tmp_path / "checkpoints").exists()


def test_every_form_of_model_option_on_the_command_line_is_found(tmp_path):
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"compile": False, "learning_rate": 0.1}))
    assert keys_given(["--model.compile", "false", "--model.peft.r=8"]) == {"compile", "peft"}
    assert keys_given(["--model=" + str(tmp_path / "model.yaml")]) == {"compile", "learning_rate"}
    assert keys_given(["--model", str(tmp_path / "model.yaml")]) == {"compile", "learning_rate"}
    assert keys_given(["--model", "{compile: false}", "--ckpt_path", "x.ckpt"]) == {"compile"}
    assert keys_given(["--model.init_args.compile", "false"]) == {"compile"}
    assert keys_given(["--data.batch_size", "4", "--model", '{"init_args": {"tf32": false}}']) == {"tf32"}
