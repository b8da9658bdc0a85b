"""The model card: the Hub's metadata through `ModelCardData`, the text from ``templates/model_card.md``.

The metadata carries what the Hub reads: ``model-index`` (every metric of every head on the split
the card's figures are on: test where the run has one, else validation; from `EvalResult`),
``base_model`` (a hub id only), ``datasets`` (a hub data set only), ``language``, ``license``,
``library_name``, ``pipeline_tag``, ``tags`` and ``widget`` examples for the inference box.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from mbti_lightning import baseline, calibration, demo, features
from mbti_lightning.evaluation import METRICS
from mbti_lightning.loading import is_hub_id

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
EXAMPLES = ["i already made a packing list for the trip next month", "whatever lol lets just improvise this weekend"]


def hub_dataset(data_hp: dict) -> str | None:
    """The hub data set the model was trained on; None for local files and the demo."""
    dataset = data_hp.get("dataset", "")
    return dataset if not data_hp.get("data_files") and is_hub_id(dataset) else None


def base_model(model_hp: dict, local: bool | None = None) -> str | None:
    """The hub model that was fine-tuned; None for a local folder or a model trained from scratch. `local` is
    whether the name was a path where the run was made (recorded at fit time): a relative folder name such as
    ``models/phi3`` reads as a hub id, someone else's repository, from anywhere else."""
    name = model_hp["model_name_or_path"]
    local = not is_hub_id(name) if local is None else local or name == demo.DEMO
    return None if model_hp.get("from_scratch") or local else name


def _file_names(files: str | list | dict) -> str | list | dict:
    """`data_files` with each path cut to its file name: a machine's folders are nobody else's business."""
    if isinstance(files, dict):
        return {split: _file_names(names) for split, names in files.items()}
    return [Path(str(f)).name for f in files] if isinstance(files, list) else Path(str(files)).name


def _dataset_name(data_hp: dict) -> str:
    files = data_hp.get("data_files")
    if not files:
        return data_hp.get("dataset", "unknown")
    names = _file_names(files)
    names = names.values() if isinstance(names, dict) else [names] if isinstance(names, str) else names
    return f"{data_hp['dataset']} files " + ", ".join(map(str, names))


def model_name(model_hp: dict, local: bool | None = None) -> str:
    """The base model as the card names it: a hub id as it is, a local folder by its own name alone."""
    name = model_hp["model_name_or_path"]
    return name if base_model(model_hp | {"from_scratch": False}, local) or name == demo.DEMO else Path(name).name


#: Of the trainer's settings, those that change what is trained (never loggers, callbacks, plugins or folders).
TRAINER_RECIPE = (
    "max_epochs",
    "max_steps",
    "accumulate_grad_batches",
    "precision",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "val_check_interval",
    "check_val_every_n_epoch",
    "limit_train_batches",
    "devices",
    "num_nodes",
    "deterministic",
)
#: Data settings of a run that are not part of its recipe: where files were on the training machine.
DATA_LOCAL = ("predict_file", "tokenizer", "num_workers", "preprocessing_workers")


def recipe(model_hp: dict, data_hp: dict, meta: dict) -> dict:
    """What reproduces a run, safe to publish: the model and data settings and the trainer settings that change
    what is trained (`TRAINER_RECIPE`), with local paths cut to file names; never logger or callback arguments
    (API keys, tracking URIs with credentials), the machine's folders or a predict file."""
    config = meta.get("config") or {}
    trainer = config.get("trainer") or {}
    data = {k: v for k, v in data_hp.items() if k not in DATA_LOCAL}
    if data.get("data_files"):
        data["data_files"] = _file_names(data["data_files"])
    out = {
        "seed_everything": config.get("seed_everything"),
        "model": model_hp | {"model_name_or_path": model_name(model_hp, meta.get("local_model"))},
        "data": data,
        "trainer": {k: trainer[k] for k in TRAINER_RECIPE if trainer.get(k) is not None},
        "checkpoint": {k: (config.get("checkpoint") or {}).get(k) for k in ("monitor", "mode")},
    }
    return {k: v for k, v in out.items() if v not in (None, {})}


def eval_results(heads: dict, results: dict[str, dict], data_hp: dict, split: str) -> list[EvalResult]:
    """One result per metric and head, per post on `split`, rounded as the card's table shows them."""
    dataset = hub_dataset(data_hp)
    return [
        EvalResult(
            task_type="text-classification",
            dataset_type=dataset or data_hp.get("dataset", "unknown"),
            dataset_name=dataset or _dataset_name(data_hp),
            dataset_split=split,
            metric_type=metric_type,
            metric_value=round(results[head]["posts"]["model"][key]["value"], 4),
            metric_name=f"{head} {name}",
            metric_config=head,
        )
        for head in heads
        for key, (name, metric_type) in METRICS.items()
    ]


def card_data(
    model_hp: dict,
    data_hp: dict,
    heads: dict,
    results: dict[str, dict],
    adapter: bool,
    license: str | None,
    local_model: bool | None = None,
    split: str = "test",
) -> ModelCardData:
    dataset, base = hub_dataset(data_hp), base_model(model_hp, local_model)
    return ModelCardData(
        base_model=base,
        datasets=[dataset] if dataset else None,
        language="en",
        license=license,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-classification",
        tags=[
            "mbti",
            "personality",
            "text-classification",
            "mbti-lightning",
            *(["lora"] if model_hp.get("peft") else []),
        ],
        eval_results=eval_results(heads, results, data_hp, split),
        model_name=f"MBTI {', '.join(heads)} classifier",
        widget=[{"text": text} for text in EXAMPLES],
    )


def _table(figures: dict) -> dict[str, Any]:
    """A `evaluation.scored` block as rows of the card's table: per metric, each system's value and interval."""
    return {
        "systems": list(figures),
        "rows": [(name, [figures[s][key] for s in figures]) for key, (name, _) in METRICS.items()],
    }


def model_card(
    model_hp: dict,
    data_hp: dict,
    meta: dict,
    results: dict[str, dict],
    calibration_figures: dict[str, dict],
    *,
    split: str,
    majority: dict[str, str],
    calibrated: bool,
    confusion_files: dict[str, str],
    has_training_plot: bool,
    chosen_by: str,
    adapter: bool = False,
    license: str | None = None,
    data_changed: bool = False,
    example: tuple[str, list[tuple[str, float]]] = (EXAMPLES[0], []),
) -> ModelCard:
    """The card of an export from a checkpoint's model and data hyperparameters and its ``mbti_lightning``
    entry (`meta`). `results` per head are `evaluation.figures` on `split`, `majority` the training split's most
    common class per head, `chosen_by` what chose the checkpoint (`loading.chosen_by`), `calibration_figures` per head what `evaluation.calibration_figures` returns, `example` the usage example's text and the model's answer to it (`export.example_answer`)."""
    heads = meta["heads"]
    base = model_name(model_hp, meta.get("local_model"))
    rendered = {
        head: {"posts": _table(result["posts"])} | ({"people": _table(result["people"])} if "people" in result else {})
        for head, result in results.items()
    }
    return ModelCard.from_template(
        card_data(model_hp, data_hp, heads, results, adapter, license, meta.get("local_model"), split),
        template_path=str(TEMPLATE),
        heads=heads,
        origin=f"random initialisation with the architecture of `{base}`"
        if model_hp.get("from_scratch")
        else f"`{base}`",
        dataset=_dataset_name(data_hp),
        adapter=adapter,
        frozen=None if model_hp.get("frozen") is None else features.settings(model_hp["frozen"]),
        person_answers=meta.get("person_head") or {},
        example=example[0],
        answer=example[1],
        split=split,
        rows=next(iter(results.values()))["rows"],
        persons=next(iter(results.values()))["persons"],
        majority=majority,
        results=rendered,
        has_baseline=all("baseline" in result["posts"] for result in results.values()),
        baseline_name=baseline.NAME,
        baseline_cap=baseline.MAX_TRAIN_ROWS,
        calibrated=calibrated,
        calibration=calibration_figures,
        t_bounds=(calibration.T_MIN, calibration.T_MAX),
        bins=calibration.BINS,
        has_training_plot=has_training_plot,
        chosen_by=chosen_by,
        confusion_files=confusion_files,
        data=data_hp,
        data_changed=data_changed,
        recipe=yaml.safe_dump(recipe(model_hp, data_hp, meta), sort_keys=False).strip(),
    )
