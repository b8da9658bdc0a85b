"""Loading a trained model: the one way every command (predict, validate, test, report, explain, serve and the
export) gets one, so that two commands cannot see two different models.

`load` takes a `fit` checkpoint, an exported folder or a hub id and gives a `Loaded`: the model in the dtype it
was trained (or exported) in, without a second copy of its weights (a checkpoint's tensors are memory-mapped and
become the model's), TF32 matmuls on CUDA where training allowed them; its tokenizer, truncating as training
did; the data settings it was trained with and its split fingerprint; the calibration its scores carry (or
none, and why); and what chose it. `datamodule` builds the data of those settings, one line naming each
setting the command line gave otherwise, and `check_splits` stops any command whose data no longer gives the
recorded splits, with one message for all of them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoConfig, AutoModelForSequenceClassification
from transformers.initialization import no_init_weights

from mbti_lightning import person_head
from mbti_lightning.data import MBTIDataModule
from mbti_lightning.data.sources import where
from mbti_lightning.data.tokenized import SETTINGS
from mbti_lightning.demo import DEMO
from mbti_lightning.errors import UserError
from mbti_lightning.labels import AXES, TYPES
from mbti_lightning.model import MBTIClassifier
from mbti_lightning.persons import Persons, trained_prior
from mbti_lightning.tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The data settings a model is trained with: which rows make each split, and how a text is prepared. The rest
#: (batch sizes, workers, the predict file) are the command's own.
DATA_SETTINGS = (*SETTINGS, "tokenizer")
#: Model settings of how to run a model, not of what was trained: a command line's values are used over a
#: checkpoint's.
RUNTIME_SETTINGS = ("attn_implementation", "sdpa_kernels", "skip_padding_mask", "compile", "tf32")
MODEL_OPTION_HELP = (
    "how to run the model, over what it was trained with (repeatable): attn_implementation=eager (a model trained "
    "with flash attention, on a CPU), sdpa_kernels=[math], skip_padding_mask=false, compile=false, tf32=false"
)


def parse_runtime(options: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` options of how to run a model (`RUNTIME_SETTINGS`; values as YAML: ``compile=false``,
    ``sdpa_kernels=[math]``), as the export's and the server's ``--model-option`` take them."""
    runtime = {}
    for option in options or []:
        key, has_value, value = option.partition("=")
        if key not in RUNTIME_SETTINGS or not has_value:
            raise UserError(f"--model-option {option!r}: give KEY=VALUE with KEY one of {', '.join(RUNTIME_SETTINGS)}")
        runtime[key] = yaml.safe_load(value)
    return runtime


#: Every command that reads the splits takes this flag (mbti-lightning-export also as --allow-changed-data).
ALLOW_CHANGED_DATA = "--allow_changed_data"


class LoadError(UserError):
    """A model that cannot be loaded, or data that no longer matches it: the message says which and why."""


@dataclass
class Loaded:
    """A trained model ready to run, and everything needed to run it as it was trained and scored. The model is
    built on first use of `model`: a command checks its data and arguments first, with nothing loaded."""

    build: Callable[[], Any] = field(repr=False)  # makes `model`
    dtype: torch.dtype  # the model's weights', as trained (or exported)
    tokenizer: Any  # truncates at data["max_length"] with truncation=True
    data: dict[str, Any]  # the `DATA_SETTINGS` it was trained with (an export made before they were recorded: fewer)
    fingerprint: str | None  # which rows the splits held at fit time (`MBTIDataModule.split_fingerprint`)
    calibration: dict[str, dict] | None  # per head what the scores carry (temperature, offsets); None: raw scores
    calibration_note: str  # the same in words, with why there is none
    chosen_by: str  # what chose this model: the monitored metric and its value, or the last step
    name: str  # the checkpoint, folder or hub id, as given
    revision: str | None = None  # the hub commit, for a hub id
    run_settings: dict[str, Any] = field(default_factory=dict)  # the fit's other data settings (batch sizes, workers)
    checkpoint: dict | None = field(default=None, repr=False)  # the memory-mapped checkpoint, for the export

    @functools.cached_property
    def model(self) -> Any:
        """The `MBTIClassifier` in eval mode, its weights in `dtype`; TF32 matmuls on CUDA where training used them."""
        model = self.build()
        if model.hparams.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return model

    @property
    def max_length(self) -> int:
        return self.data["max_length"]

    @property
    def mask(self) -> bool:
        return bool(self.data.get("mask_type_mentions"))


def read_checkpoint(path: Path) -> dict:
    """A `fit` checkpoint, memory-mapped: only what is used is read (never the optimizer states, two thirds of a
    bf16 run's file), and the weights become the model's without a copy."""
    if not path.is_file():
        raise LoadError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch raises many kinds for a damaged file
        raise LoadError(f"could not read checkpoint {path}: {err}") from None
    if not isinstance(checkpoint, dict) or "mbti_lightning" not in checkpoint:
        raise LoadError(f"{path} was not written by `mbti-lightning fit` (it has no 'mbti_lightning' entry)")
    return checkpoint


def hyperparameters(checkpoint: dict, key: str = "hyper_parameters") -> dict:
    """The model's arguments (the data module's with `key` "datamodule_hyper_parameters"), less the CLI's keys."""
    return {k: v for k, v in checkpoint.get(key, {}).items() if not k.startswith("_")}


def saved_dtype(checkpoint: dict) -> str:
    """The backbone's dtype as trained: a 4-bit (QLoRA) base computed in bf16; otherwise the narrowest dtype of the
    backbone weights the checkpoint holds (not the fp32 class-weight buffer): a bf16 run may keep some weights in
    fp32 (peft's copy of the head, QLoRA's), never the reverse."""
    if hyperparameters(checkpoint).get("quantize"):
        return "bfloat16"
    weights = checkpoint["state_dict"].items()
    dtypes = {v.dtype for k, v in weights if k.startswith("model.") and v.is_floating_point()}
    return str(min(dtypes, key=lambda d: torch.finfo(d).bits)).removeprefix("torch.")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside are made in `dtype` (transformers and torch read the default dtype)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def chosen_by(checkpoint: dict, path: Path) -> str:
    """What chose the checkpoint at `path`: the checkpoint callback's monitored metric where this file was its
    best, else the step it was saved at (``last.ckpt``, or a file the callback did not rank)."""
    for key, state in checkpoint.get("callbacks", {}).items():
        best = state.get("best_model_path") if key.startswith("ModelCheckpoint") else None
        if best and Path(best).name == path.name and state.get("best_model_score") is not None:
            return f"{state['monitor']} {float(state['best_model_score']):.4f}, the best of the run's validations"
    return f"the last step saved (step {checkpoint.get('global_step', '?')}), not chosen by a metric"


def model_from_checkpoint(checkpoint: dict, runtime: dict | None = None) -> Any:
    """The checkpoint's `MBTIClassifier` in the dtype it was trained in, its weights the checkpoint's own tensors
    (memory-mapped, so never two copies), run with `runtime` settings (`RUNTIME_SETTINGS`) where given. A 4-bit
    (QLoRA) base is rebuilt in bf16: merging needs it, and a CPU cannot load 4 bits."""
    hparams = hyperparameters(checkpoint) | (runtime or {}) | {"quantize": None}
    # Where the checkpoint holds every weight, the model is built from its config without initialising them: the
    # base's weights are not read from disk, its memory is never touched before the checkpoint's tensors replace it
    # (a random Phi-3-mini takes a minute and 7.6 GB to make), and transformers has no head to call "newly
    # initialized". Adapters alone (LoRA), or a head alone (a frozen backbone's), go on the base's weights, loaded
    # from where training took them.
    whole = (hparams.get("peft") is None and hparams.get("frozen") is None) or hparams.get("from_scratch")
    model = MBTIClassifier(**hparams | ({"from_scratch": True} if whole else {}))
    with default_dtype(DTYPES[saved_dtype(checkpoint)]), no_init_weights() if whole else contextlib.nullcontext():
        model.configure_model()
    model.on_load_checkpoint(checkpoint)
    # A weight saved in another dtype than the model's (an fp32 head on a bf16 base) is cast: one dtype computes.
    built = model.state_dict()
    state = {
        k: v.to(built[k].dtype) if k in built and v.is_floating_point() and v.dtype != built[k].dtype else v
        for k, v in checkpoint["state_dict"].items()
    }
    model.load_state_dict(state, strict=model.strict_loading, assign=True)
    counts = checkpoint["mbti_lightning"].get("train_counts") or [None] * len(model.heads)
    weights = model.class_weight.float()
    model.persons = {
        head: Persons(trained_prior(None if c is None else torch.tensor(c), w))
        for head, c, w in zip(model.heads, counts, weights)
    }
    return model.eval()


def from_checkpoint(path: Path, runtime: dict | None = None) -> Loaded:
    """A `fit` checkpoint's settings, its model built on first use (`model_from_checkpoint`)."""
    checkpoint = read_checkpoint(path)
    settings = hyperparameters(checkpoint, "datamodule_hyper_parameters")
    data = {k: v for k, v in settings.items() if k in DATA_SETTINGS}
    tokenizer = load_tokenizer(data["tokenizer"])
    tokenizer.model_max_length = data["max_length"]
    return Loaded(
        build=functools.partial(model_from_checkpoint, checkpoint, runtime),
        dtype=DTYPES[saved_dtype(checkpoint)],
        tokenizer=tokenizer,
        data=data,
        fingerprint=checkpoint["mbti_lightning"].get("splits"),
        calibration=None,
        calibration_note="none: a fit checkpoint's raw scores (mbti-lightning-export fits calibration on validation)",
        chosen_by=chosen_by(checkpoint, path),
        name=str(path),
        checkpoint=checkpoint,
        run_settings={k: v for k, v in settings.items() if k not in DATA_SETTINGS and k != "predict_file"},
    )


def _target(config, source: str = "") -> str | list[str]:
    """The target of an exported model, from what the export recorded, else from its labels."""
    recorded = getattr(config, "mbti_lightning", None) or {}
    if recorded.get("target"):
        target = recorded["target"]
        return target[0] if len(target) == 1 else target
    labels = list(config.id2label.values())
    if set(labels) <= set(TYPES):
        return "mbti"
    if config.problem_type == "multi_label_classification":
        return [axis for axis, letters in AXES.items() if letters[1] in labels]
    axis = next((axis for axis, letters in AXES.items() if list(letters) == labels), None)
    if axis is None:
        raise LoadError(
            f"{source or 'the model'} predicts {labels}, not MBTI letters or types: it was not written by "
            "mbti-lightning-export (give an exported folder or hub id, or a checkpoint written by `fit`)"
        )
    return axis


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or torch.float32
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def _calibration_of(config, recorded: dict) -> tuple[dict | None, str]:
    """What an export's scores carry: recorded by the export, else read from the temperatures it saved."""
    if "calibration" in recorded:
        calibration = recorded["calibration"]
    else:  # exported before the calibration was recorded: a temperature of 1 and no offsets is none
        temperatures = getattr(config, "calibration_temperatures", None) or {}
        offsets = getattr(config, "calibration_offsets", None) or {}
        fitted = {h: t != 1.0 or h in offsets for h, t in temperatures.items()}
        calibration = (
            {h: {"temperature": t, "offsets": offsets.get(h)} for h, t in temperatures.items()}
            if any(fitted.values())
            else None
        )
    if calibration is None:
        return None, "none: exported with --no-calibrate, or nothing fitted lowered the validation NLL"
    words = "; ".join(
        f"{head}: temperature {c['temperature']:.3f}"
        + (", offsets " + ", ".join(f"{k} {v:+.3f}" for k, v in c["offsets"].items()) if c.get("offsets") else "")
        for head, c in calibration.items()
    )
    return calibration, f"folded into the head at export, fitted on validation ({words})"


def model_from_pretrained(source: str, config: Any, runtime: dict | None = None, adapter: bool = False) -> Any:
    """The exported `MBTIClassifier` at `source` (its `config`) in the dtype it was saved in, with the class weights
    and person rule its export recorded, run with `runtime` settings where given. An `adapter` export (LoRA
    adapters and the head, ``--adapter``) is put on its base by transformers' peft integration."""
    recorded = getattr(config, "mbti_lightning", None) or {}
    model = MBTIClassifier(
        model_name_or_path=source,
        target=_target(config),
        class_weights=None,
        frozen=recorded.get("frozen"),  # a head on other features than the model's own pooling reads those
        person_head=(recorded.get("person_head") or {}).get("settings"),
        **(runtime or {}),
    )
    with default_dtype(_config_dtype(config)):
        if adapter:
            attention = model.hparams.attn_implementation
            model.model = AutoModelForSequenceClassification.from_pretrained(
                source, config=config, dtype=_config_dtype(config), attn_implementation=attention
            )
        else:
            model.configure_model()
    if model.person_head is not None:
        person_head.load(model.person_head, source)
        model.person_decision = recorded["person_head"]["decision"]
    if recorded.get("class_weight"):
        model.class_weight.copy_(torch.tensor(recorded["class_weight"]))
    recorded_persons = recorded.get("persons") or {}
    model.persons = {
        head: Persons.from_dict(recorded_persons[head]) if head in recorded_persons else Persons.uniform(len(classes))
        for head, classes in model.heads.items()
    }
    return model.eval()


def read_config(source: str) -> tuple[Any, bool]:
    """The classifier config of model folder or hub id `source`, and whether it is an adapter export (its config in
    ``classifier_config/``, beside the adapters); OSError or ValueError where there is none."""
    try:
        return AutoConfig.from_pretrained(source), False
    except (OSError, ValueError) as err:
        try:
            return AutoConfig.from_pretrained(source, subfolder="classifier_config"), True
        except (OSError, ValueError):
            raise err from None


def pretrained_config(source: str) -> Any | None:
    """The config of model folder or hub id `source` where it is an export of this project's, else None."""
    if not Path(source).is_dir() and not is_hub_id(source):
        return None
    try:
        config, _ = read_config(source)
    except (OSError, ValueError):
        return None
    return config if getattr(config, "mbti_lightning", None) is not None else None


def from_pretrained(source: str, runtime: dict | None = None) -> Loaded:
    """An exported folder or hub id, in the dtype it was saved in, with what its export recorded."""
    try:
        config, adapter = read_config(source)
    except (OSError, ValueError) as err:
        raise LoadError(f"{source} is neither a checkpoint (.ckpt) nor a model folder or hub id: {err}") from None
    _target(config, source)  # a model without letter labels stops here, before anything is built
    recorded = getattr(config, "mbti_lightning", None) or {}
    tokenizer = load_tokenizer(source)
    # Exports made before the data settings were recorded kept these two at the top level.
    data = recorded.get("data") or {
        "max_length": recorded.get("max_length", tokenizer.model_max_length),
        "mask_type_mentions": bool(recorded.get("mask_type_mentions")),
    }
    data = data | {"tokenizer": source}
    positions = getattr(config, "max_position_embeddings", None)
    if positions and data["max_length"] > positions:  # no record, and a tokenizer without a limit (Gemma's: 1e30)
        rank_zero_info(f"max_length: {positions}, the model's positions ({source} records none, nor its tokenizer)")
        data["max_length"] = positions
    tokenizer.model_max_length = data["max_length"]
    calibration, note = _calibration_of(config, recorded)
    return Loaded(
        build=functools.partial(model_from_pretrained, source, config, runtime, adapter),
        dtype=_config_dtype(config),
        tokenizer=tokenizer,
        data=data,
        fingerprint=recorded.get("splits"),
        calibration=calibration,
        calibration_note=note,
        chosen_by=recorded.get("chosen_by", "not recorded by this export"),
        name=source,
        revision=hub_commit(source),
    )


def hub_commit(source: str) -> str | None:
    """The hub commit whose files a hub id `source` was read from (its snapshot's name in the hub cache); None for
    a local folder."""
    if not is_hub_id(source):
        return None
    cached = try_to_load_from_cache(source, "config.json")
    return Path(cached).parent.name if isinstance(cached, str) else None


def load(source: str | Path, runtime: dict | None = None) -> Loaded:
    """The model behind `source`: a `fit` checkpoint (``.ckpt``), an exported folder or a hub id, run with `runtime`
    settings (`RUNTIME_SETTINGS`) where given. Only its settings are read here; the model is built on first use."""
    if str(source).endswith(".ckpt"):
        return from_checkpoint(Path(source), runtime)
    return from_pretrained(str(source), runtime)


def is_hub_id(name: str) -> bool:
    """Whether `name` is a hub repo id rather than a local path or the demo."""
    if name == DEMO or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_export(name: str) -> bool:
    """Whether model `name` (a ``model_name_or_path``: a folder or a hub id) is a model this project exported."""
    return pretrained_config(name) is not None


#: The settings that name a corpus: one given on the command line that differs from a model's scores another corpus.
CORPUS_SETTINGS = ("dataset", "data_files", "dataset_split", "revision")
#: What a model reads as it was trained, on any corpus: its labels, its type-mention masking, its text length.
MUST_MATCH = {"target": "labels", "mask_type_mentions": "type-mention masking", "max_length": "text length"}


def datamodule(loaded: Loaded, given: Any = None, command_line: set[str] | frozenset = frozenset()) -> Any:
    """The data module of `loaded`'s data settings, the other settings (batch sizes, workers, the predict file)
    from `given` (the command's data module), else the fit's; one line names each setting `given` had otherwise.

    Where the `command_line` (the data settings it gave) names another corpus than the model's (`CORPUS_SETTINGS`),
    that corpus is scored: every data setting the command line gave is used (its columns, its split), the rest are
    the model's, and a `MUST_MATCH` setting given otherwise stops with a `LoadError` naming it."""
    settings = hyperparameters({"h": dict(given.hparams)}, "h") if given is not None else dict(loaded.run_settings)
    other = given is not None and any(
        key in command_line and settings[key] != loaded.data.get(key, settings[key]) for key in CORPUS_SETTINGS
    )
    for key, value in loaded.data.items():
        if other and key in command_line and settings[key] != value:
            if key in MUST_MATCH:
                raise LoadError(
                    f"data.{key} {settings[key]!r}: {loaded.name} was trained with {key} {value!r}, and another corpus "
                    f"is scored with the model's {MUST_MATCH[key]}; leave data.{key} out"
                )
            rank_zero_info(f"data.{key}: {settings[key]!r}, this corpus's (the model was trained with {value!r})")
            continue
        if given is not None and key in settings and settings[key] != value:
            rank_zero_info(f"data.{key}: {value!r}, as {loaded.name} was trained (not {settings[key]!r})")
        settings[key] = value
    return MBTIDataModule(**settings)


def other_corpus(loaded: Loaded, dm: Any) -> dict[str, tuple[Any, Any]]:
    """The corpus settings (`CORPUS_SETTINGS`) in which data module `dm` differs from what `loaded` was trained on,
    as (trained, scored); empty for the model's own corpus (or one its record cannot tell apart: an export does not
    record its data files)."""
    return {
        key: (loaded.data[key], dm.hparams[key])
        for key in CORPUS_SETTINGS
        if key in loaded.data and dm.hparams[key] != loaded.data[key]
    }


def check_splits(dm: Any, loaded: Loaded, allow: bool) -> bool:
    """Whether the splits rebuilt from today's data differ from those recorded when `loaded` was trained; a
    `LoadError` unless `allow`: its figures could be on rows the model trained on or was chosen by."""
    changed = loaded.fingerprint is not None and dm.split_fingerprint() != loaded.fingerprint
    if changed and not allow:
        raise LoadError(
            f"the data ({where(dm.hparams)}) no longer gives the train / validation / test rows {loaded.name} was "
            "trained with: a hub data set read without data.revision has changed, or a local file was edited. "
            f"Its figures could include training rows. Restore the data (or pin data.revision), or pass "
            f"{ALLOW_CHANGED_DATA} to go on anyway (what it writes then says so)"
        )
    return changed
