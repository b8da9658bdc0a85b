"""Building the backbone: a Hugging Face sequence classifier for the run's labels, with the options
that change how it is built (loaded or random, LoRA, 4 bits, gradient checkpointing, compiled blocks)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from lightning.fabric.utilities.data import AttributeDict
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoModelForSequenceClassification

from mbti_lightning import demo
from mbti_lightning.labels import LABELS
from mbti_lightning.tokenizer import load_tokenizer


def _nf4_config() -> Any:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "model.quantize: nf4 needs a CUDA GPU (bitsandbytes' 4-bit kernels); on this machine use LoRA "
            "without quantize, or full fine-tuning"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _with_lora(model: torch.nn.Module, settings: dict[str, Any], quantized: bool) -> torch.nn.Module:
    """`model` with LoRA adapters from `settings` (``peft.LoraConfig`` fields); its head trains in full."""
    try:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError:
        raise ImportError('model.peft needs peft: pip install "mbti-lightning[peft]"') from None
    try:
        # For sequence classification, peft adds the head ("score", "classifier") to modules_to_save.
        config = LoraConfig(task_type="SEQ_CLS", **settings)
    except TypeError as err:
        raise ValueError(
            f"model.peft: {err}; use peft.LoraConfig fields such as r, lora_alpha, lora_dropout, target_modules"
        ) from None
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, config)


def _weights(p: torch.nn.Parameter) -> int:
    """How many weights `p` holds: a packed 4-bit tensor (bitsandbytes' Params4bit) holds two per element."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def training_flops_per_token(model: torch.nn.Module) -> int:
    """Training FLOPs per token without attention scores (anchors.md), over the non-embedding weights that the
    forward pass uses: 6 per trained one (forward 2, gradients of the activations 2 and of the weight 2) and 4
    per frozen one (LoRA's base: no weight gradient). Not peft's untouched copy of the head (`original_module`)."""
    embedding = model.get_input_embeddings().weight
    used = [p for name, p in model.named_parameters() if p is not embedding and "original_module" not in name]
    trained = sum(_weights(p) for p in used if p.requires_grad)
    return 6 * trained + 4 * (sum(_weights(p) for p in used) - trained)


def flops_per_batch(model: torch.nn.Module, flops_per_token: int, seq: int, tokens: int) -> int:
    """Training FLOPs of a batch of `tokens` real tokens padded to `seq`: `training_flops_per_token` plus attention,
    12 x layers x hidden x seq per token."""
    config = model.config
    return (flops_per_token + 12 * config.num_hidden_layers * config.hidden_size * seq) * tokens


#: The SDPA attention kernels by the names `model.sdpa_kernels` takes.
SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def sdpa_kernels(kernels: list[str] | None) -> contextlib.AbstractContextManager:
    """Restrict SDPA attention to `kernels` (names of `SDPA_KERNELS`, in order of preference); None: PyTorch's
    choice."""
    if not kernels:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPA_KERNELS[k] for k in kernels], set_priority=True)


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder (or encoder) blocks: the classes transformers must not split across devices
    (`_no_split_modules`) or, where a model does not say, the members of its longest list of modules of
    one class."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    lists = [list(m) for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len({type(b) for b in m}) == 1]
    if not lists:
        raise ValueError(f"model.compile: found no repeated blocks to compile in {type(model).__name__}")
    return max(lists, key=len)


def check_labels(name: str, saved: dict[int, str], id2label: dict[int, str], heads: dict) -> None:
    """A model this project exported (a folder or the hub) has letters or types as its labels: its
    outputs mean those, so they must be this run's, in the same order."""
    if set(saved.values()) <= LABELS and saved != id2label:
        raise ValueError(
            f"{name} is an MBTI classifier whose outputs are {', '.join(saved.values())}, but this run's target "
            f"({', '.join(heads)}) has {', '.join(id2label.values())}; set data.target to the model's"
        )


def build(hp: AttributeDict, id2label: dict[int, str], heads: dict) -> torch.nn.Module:
    """The classifier for `hp` (the model's hyperparameters), in training mode, its outputs `id2label`."""
    tokenizer = load_tokenizer(hp.model_name_or_path)
    source = demo.resolve(hp.model_name_or_path)
    if not hp.from_scratch:
        check_labels(hp.model_name_or_path, AutoConfig.from_pretrained(source).id2label, id2label, heads)
    config = AutoConfig.from_pretrained(
        source,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={label: i for i, label in id2label.items()},
        problem_type="multi_label_classification" if len(heads) > 1 else "single_label_classification",
        use_cache=False,  # a classifier never reuses past keys and values
        **(hp.config_overrides or {}),
    )
    # Lightning sets the default dtype for the trainer's precision (bf16 for bf16-true).
    kwargs = {"attn_implementation": hp.attn_implementation, "dtype": torch.get_default_dtype()}
    if hp.quantize:
        kwargs |= {"quantization_config": _nf4_config(), "dtype": torch.bfloat16}
    if hp.from_scratch:
        model = AutoModelForSequenceClassification.from_config(config, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(source, config=config, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # load_tokenizer added a <pad> token
        model.resize_token_embeddings(len(tokenizer))
    # Pooling takes the last token that is not pad_token_id, so it must be the tokenizer's.
    model.config.pad_token_id = tokenizer.pad_token_id
    if hp.gradient_checkpointing:  # (transformers 5.23 renamed it; the old name goes in v6)
        enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
        enable({"use_reentrant": False})
    if hp.peft is not None:
        model = _with_lora(model, hp.peft, quantized=bool(hp.quantize))
    if hp.compile:
        for block in repeated_blocks(model):
            block.compile(dynamic=True)
    # from_pretrained returns the model in eval mode, and Lightning keeps each module's mode: in eval
    # mode, gradient checkpointing and dropout (LoRA's too) would silently be off during training.
    # Evaluation loops still switch to eval mode and back.
    return model.train()


def param_groups(model: torch.nn.Module) -> dict[str, str]:
    """Each parameter's optimizer group, by its name, from its shape as built (sharding replaces the parameters and
    FSDP1 shows configure_optimizers flat 1-D shards): ``embeddings``, ``decay`` (matrices) or ``no_decay``
    (biases and norms)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return {
        name: "embeddings" if id(p) in embeddings else "decay" if p.ndim >= 2 else "no_decay"
        for name, p in model.named_parameters()
    }
