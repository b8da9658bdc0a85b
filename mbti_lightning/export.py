"""`mbti-lightning-export`: a `fit` checkpoint -> a Hugging Face model folder with a model card -> the hub.

The folder holds safetensors weights, a config with letter labels, the tokenizer, a model card
(README.md) and two plots. The card's numbers are computed here, on the validation split and the
exported weights, beside the majority-class baseline. Nothing is half-written: the folder is built
next to `--out` and renamed into place.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import lightning as L
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData
from torchmetrics.classification import MulticlassConfusionMatrix

from mbti_lightning.data import MBTIDataModule
from mbti_lightning.metrics import classification_metrics
from mbti_lightning.model import MBTIClassifier
from mbti_lightning.tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METRIC_NAMES = {"acc": "accuracy", "f1": "F1", "mcc": "MCC", "bal_acc": "balanced accuracy"}


class ExportError(ValueError):
    """Bad input to the export: the message says what and where."""


def hub_token(env_file: Path = Path(".env")) -> str | None:
    """HF_TOKEN or HF_HUB_TOKEN from the environment, else from a ``.env`` file in the working directory."""
    for name in ("HF_TOKEN", "HF_HUB_TOKEN"):
        if os.environ.get(name):
            return os.environ[name]
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            name, _, value = line.strip().removeprefix("export ").partition("=")
            if name.strip() in ("HF_TOKEN", "HF_HUB_TOKEN") and value.strip():
                return value.strip().strip("'\"")
    return None


def read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise ExportError(f"checkpoint not found: {path}")
    try:
        # Memory-mapped: only what is used is read (the optimizer states, two thirds of a bf16 run's file, never).
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch raises many kinds for a damaged file
        raise ExportError(f"could not read checkpoint {path}: {err}") from None
    if not isinstance(checkpoint, dict) or "mbti_lightning" not in checkpoint:
        raise ExportError(f"{path} was not written by `mbti-lightning fit` (it has no 'mbti_lightning' entry)")
    return checkpoint


def hyperparameters(checkpoint: dict, key: str = "hyper_parameters") -> dict:
    """The model's arguments (the data module's with `key` "datamodule_hyper_parameters"), less the CLI's keys."""
    return {k: v for k, v in checkpoint.get(key, {}).items() if not k.startswith("_")}


def evaluate(model: MBTIClassifier, dm: MBTIDataModule) -> dict[str, dict]:
    """Per head: validation metrics, confusion matrix and majority-class baseline, on the weights being exported."""
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False)  # fmt: skip
    outputs = trainer.predict(model, dataloaders=dm.val_dataloader())
    rows = torch.cat([o["row"] for o in outputs]).cpu()
    labels = torch.as_tensor(dm.splits["validation"]["labels"][:]).view(len(dm.splits["validation"]), -1)[rows]
    results = {}
    for h, ((head, classes), counts) in enumerate(zip(model.heads.items(), dm.train_label_counts())):
        preds = torch.cat([o["probs"][head] for o in outputs]).argmax(-1).cpu()
        metrics, majority = classification_metrics(len(classes), ""), classification_metrics(len(classes), "")
        confusion = MulticlassConfusionMatrix(len(classes))
        majority_class = int(counts.argmax())
        metrics.update(preds, labels[:, h])
        confusion.update(preds, labels[:, h])
        majority.update(torch.full_like(labels[:, h], majority_class), labels[:, h])
        scores, baseline = ({k: float(v) for k, v in m.compute().items()} for m in (metrics, majority))
        results[head] = {"metrics": scores, "confusion": confusion.compute(),
                         "majority": baseline | {"class": classes[majority_class]}}  # fmt: skip
    return results


def plot_training(metrics_csv: Path | None, out: Path) -> bool:
    """Validation metrics over training steps, from Lightning's CSV log; False if there is no log."""
    if metrics_csv is None or not metrics_csv.is_file():
        return False
    import matplotlib.pyplot as plt

    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get("val/mcc")]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [int(r["step"]) for r in rows]
    for key, name in METRIC_NAMES.items():
        if f"val/{key}" in rows[0]:
            ax.plot(steps, [float(r[f"val/{key}"]) for r in rows], marker="o", label=name)
    ax.set(xlabel="optimizer step", ylabel="validation metric", title="Validation during training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def plot_confusion(confusion: torch.Tensor, letters: list[str], out: Path) -> None:
    import matplotlib.pyplot as plt
    from torchmetrics.utilities.plot import plot_confusion_matrix

    fig, ax = plot_confusion_matrix(confusion, labels=letters)
    ax.set_title("Validation confusion matrix")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def model_card(checkpoint: dict, results: dict[str, dict], n_val: int, has_training_plot: bool,
               adapter: bool = False) -> ModelCard:  # fmt: skip
    model_hp, data_hp = hyperparameters(checkpoint), hyperparameters(checkpoint, "datamodule_hyper_parameters")
    base, head_classes = model_hp["model_name_or_path"], checkpoint["mbti_lightning"]["heads"]
    target = ", ".join(head_classes)
    dataset = data_hp.get("dataset", "unknown")
    recipe = checkpoint["mbti_lightning"].get("config") or {"model": model_hp, "data": data_hp}
    card_data = ModelCardData(
        base_model=None if model_hp.get("from_scratch") else base,
        datasets=[dataset] if "/" in dataset else None,
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["mbti", "personality", "text-classification", "mbti-lightning"],
        metrics=["accuracy", "f1", "matthews_correlation"],
    )
    tables = "\n\n".join(_results_table(head, classes, results[head], len(head_classes) > 1)
                           for head, classes in head_classes.items())  # fmt: skip
    plots = ("![Validation metrics during training](val_metrics.png)\n\n" if has_training_plot else "") + "\n\n".join(
        f"![Validation confusion matrix, {head}]({_confusion_file(head, len(head_classes))})" for head in head_classes
    )
    origin = f"random initialisation with the architecture of `{base}`" if model_hp.get("from_scratch") else f"`{base}`"
    body = f"""
# MBTI {target} classifier

{_usage(head_classes, origin, dataset, adapter)}

## Validation results

Computed by the export on the exported weights, over {n_val:,} validation rows, beside a model that
always answers the training set's majority class. MCC and balanced accuracy are 0 and 0.5 for any
constant answer.

{tables}

{plots}

## Data and split

{_split_text(data_hp)}

## Training recipe

The resolved configuration of the run:

```yaml
{yaml.safe_dump(recipe, sort_keys=False).strip()}
```

## Intended use and limitations

- For research and teaching about text classification and personality language. Not for judging,
  screening or profiling people: MBTI types are self-reported, MBTI itself has limited
  reliability, and a model like this one picks up topic and style more than personality.
- The training texts are Reddit posts by users who state their type, an unrepresentative group;
  expect worse results on other kinds of text, and biases of that community.
- Scores are per text, not per person, and a single short text carries little signal.
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _usage(head_classes: dict[str, tuple[str, ...]], origin: str, dataset: str, adapter: bool) -> str:
    """What the model predicts, and how to call it with `pipeline`."""
    call = """```python
from transformers import pipeline

classifier = pipeline("text-classification", model="PATH_OR_REPO_ID", top_k=None)
classifier("i already made a packing list for the trip next month")
"""
    if adapter:
        call = """This folder holds LoRA adapters and the classification head; the base model named in
`adapter_config.json` is loaded under them (needs `pip install peft`).

```python
from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline

config = AutoConfig.from_pretrained("PATH_OR_REPO_ID", subfolder="classifier_config")  # the labels
model = AutoModelForSequenceClassification.from_pretrained("PATH_OR_REPO_ID", config=config)
classifier = pipeline("text-classification", model=model, tokenizer="PATH_OR_REPO_ID", top_k=None)
classifier("i already made a packing list for the trip next month")
"""
    trained = f"Trained from {origin} on `{dataset}` with mbti-lightning."
    if len(head_classes) > 1:
        letters = [classes[1] for classes in head_classes.values()]
        example = ", ".join(f"{{'label': '{letter}', 'score': ...}}" for letter in letters)
        axes = ", ".join(f"{axis} (`{a}` or `{b}`)" for axis, (a, b) in head_classes.items())
        return f"""Predicts {len(head_classes)} axes of the Myers-Briggs type of a text's author at once: {axes}.
{trained}

One output per axis, named by the axis's second letter; its score (a sigmoid, as for any
`multi_label_classification` model) is the probability of that letter, and one minus it the
probability of the other letter.

{call}# [[{example}]]
```"""
    ((head, classes),) = head_classes.items()
    what = "the 16-way Myers-Briggs type" if head == "mbti" else f"the **{head}** axis of the Myers-Briggs type"
    return f"""Predicts {what} of a text's author: {", ".join(f"`{c}`" for c in classes)}. {trained}

{call}# [[{{'label': '{classes[0]}', 'score': ...}}, {{'label': '{classes[1]}', 'score': ...}}, ...]]
```"""


def _results_table(head: str, classes: tuple[str, ...], result: dict, titled: bool) -> str:
    metrics, majority = result["metrics"], result["majority"]
    f1 = f"F1 is that of class `{classes[1]}`" if len(classes) == 2 else "F1 is the macro average over the types"
    rows = "\n".join(f"| {name} | {metrics[key]:.4f} | {majority[key]:.4f} |" for key, name in METRIC_NAMES.items())
    title = f"### {head}\n\n" if titled else ""
    return f"""{title}{f1}; the majority class is `{majority['class']}`.

| metric | this model | majority class |
|---|---|---|
{rows}"""


def _confusion_file(head: str, n_heads: int) -> str:
    return "confusion_matrix.png" if n_heads == 1 else f"confusion_matrix_{head}.png"


def _split_text(data_hp: dict) -> str:
    masked = (
        "Mentions of types (\"as an intj ...\", INxJ, Ni, Fe, ...) were masked before training and evaluation."
        if data_hp.get("mask_type_mentions")
        else "Mentions of types (\"as an intj ...\") were not masked and leak the label."
    )
    keep, val = data_hp.get("keep_fraction", 0.1), data_hp.get("val_fraction", 0.2)
    split = data_hp.get("split", "seed")
    if split == "author":
        return (
            f"**Authors, not rows, are split**: {keep:g} of the authors kept, {val:g} of those held out for "
            f"validation (and {data_hp.get('test_fraction', 0):g} for testing), stratified by each author's type; "
            f"no author has posts on both sides. {masked}"
        )
    if split == "predefined":
        return f"The data set's own train and validation splits. {masked}"
    return (
        f"The seed recipe's split: {keep:g} of all rows kept by a stratified split on the type column (seed "
        f"{data_hp.get('keep_seed', 0)}), then {val:g} of those held out for validation (seed "
        f"{data_hp.get('val_seed', 1)}).\n\n"
        "**Rows are split, not authors.** The same author's posts are in both training and validation, so a "
        f"model can score by recognising authors rather than personality, and these numbers are optimistic. {masked} "
        "The numbers are therefore not comparable with published per-author results on author-disjoint splits."
    )


def export(ckpt: Path, out: Path, dtype: str = "auto", overwrite: bool = False, push_to_hub: str | None = None,
           private: bool = False, adapter: bool = False) -> Path:  # fmt: skip
    """Write the model folder at `out` (and upload it if `push_to_hub`); return `out`.

    A LoRA model is merged into its base, or with `adapter` saved as the adapter alone (plus the head).
    """
    token = hub_token() if push_to_hub else None
    if push_to_hub and not token:
        raise ExportError("--push-to-hub needs a Hugging Face token: set HF_TOKEN (or HF_HUB_TOKEN), or put "
                          "HF_TOKEN=... in a .env file in the working directory")  # fmt: skip
    if importlib.util.find_spec("matplotlib") is None:
        raise ExportError("the model card's plots need matplotlib: pip install 'mbti-lightning[export]'")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    checkpoint = read_checkpoint(ckpt)

    # As load_from_checkpoint does, from the mapped checkpoint: Lightning would read the whole file again.
    # A 4-bit (QLoRA) base is rebuilt in full precision: merging needs it, and a CPU cannot load 4 bits.
    model = MBTIClassifier(**hyperparameters(checkpoint) | {"quantize": None})
    model.configure_model()
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=model.strict_loading)
    model.eval()
    if adapter and model.hparams.peft is None:
        raise ExportError(f"--adapter needs a LoRA checkpoint (model.peft); {ckpt} was fully fine-tuned")
    dm = MBTIDataModule(**hyperparameters(checkpoint, "datamodule_hyper_parameters"))
    dm.setup("validate")
    results = evaluate(model, dm)

    hf_model = model.model.cpu()
    if model.hparams.peft is not None and not adapter:
        hf_model = hf_model.merge_and_unload()
    if dtype == "auto":
        dtype = str(next(v for v in checkpoint["state_dict"].values() if v.is_floating_point()).dtype).split(".")[1]
    hf_model.to(DTYPES[dtype])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is meant to be shared
    try:
        hf_model.save_pretrained(tmp)
        if adapter:  # not config.json, or transformers would take the folder for a whole model
            hf_model.get_base_model().config.save_pretrained(tmp / "classifier_config")
        load_tokenizer(model.hparams.model_name_or_path).save_pretrained(tmp)
        log_dir = checkpoint["mbti_lightning"].get("log_dir")
        has_plot = plot_training(Path(log_dir) / "metrics.csv" if log_dir else None, tmp / "val_metrics.png")
        for head, classes in model.heads.items():
            plot_confusion(results[head]["confusion"], list(classes), tmp / _confusion_file(head, len(model.heads)))
        model_card(checkpoint, results, len(dm.splits["validation"]), has_plot, adapter).save(tmp / "README.md")
        if out.exists():
            old = out.with_name(f".{out.name}.replaced")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if push_to_hub:
        api = HfApi(token=token)
        api.create_repo(push_to_hub, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=push_to_hub, folder_path=out, repo_type="model",
                          commit_message="Upload MBTI classifier exported by mbti-lightning")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mbti-lightning-export", description=__doc__)
    parser.add_argument("--ckpt", type=Path, required=True, help="a checkpoint written by `mbti-lightning fit`")
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write")
    parser.add_argument("--push-to-hub", metavar="OWNER/NAME", help="also upload the folder to this hub repo")
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="dtype of the saved weights; auto = as trained")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--adapter", action="store_true",
                        help="LoRA models: save the adapter (and head) alone instead of merging it into the base")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        out = export(args.ckpt, args.out, args.dtype, args.overwrite, args.push_to_hub, args.private, args.adapter)
    except ExportError as err:
        parser.exit(2, f"mbti-lightning-export: error: {err}\n")
    print(f"exported to {out}" + (f" and uploaded to https://huggingface.co/{args.push_to_hub}" if args.push_to_hub else ""))


if __name__ == "__main__":
    main()
