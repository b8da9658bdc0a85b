"""`mbti-lightning-export`: a `fit` checkpoint -> a Hugging Face model folder with a model card -> the hub.

The folder holds safetensors weights, a config with letter labels, the tokenizer, a model card
(README.md, from ``templates/model_card.md``) and plots. The scores are calibrated on the validation
split (a temperature and class offsets, see `calibration`) unless ``--no-calibrate``. Every figure of
the card is of the model as written, computed by `evaluation` as `mbti-lightning report` computes it:
on the test split when the run has one, else on the validation split (which the card then calls
optimistic). The export stops if the data no longer gives the splits the checkpoint recorded.
Nothing is half-written: the folder is built next to `--out` and swapped into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from dotenv import dotenv_values
from huggingface_hub import HfApi, get_token

from mbti_lightning import calibration, evaluation, folding, loading, person_head, plots
from mbti_lightning.cache import atomic_folder
from mbti_lightning.card import EXAMPLES, model_card
from mbti_lightning.errors import UserError
from mbti_lightning.loading import DTYPES, Loaded, hyperparameters
from mbti_lightning.model import MBTIClassifier
from mbti_lightning.persons import Persons
from mbti_lightning.signals import Stopped, stop_on_signals

TOKEN_NAMES = ("HF_TOKEN", "HF_HUB_TOKEN", "HUGGING_FACE_HUB_TOKEN")
#: Bootstrap resamples of the persons behind the card's intervals.
RESAMPLES = 1000


class ExportError(UserError):
    """Bad input to the export: the message says what and where."""


def hub_token(env_file: Path = Path(".env")) -> str | None:
    """The Hugging Face token: huggingface_hub's own lookup (`HF_TOKEN`, then the login saved by
    ``hf auth login``), then `HF_HUB_TOKEN`, then a ``.env`` file in the working directory."""
    token = get_token() or os.environ.get("HF_HUB_TOKEN")
    if token or not env_file.is_file():
        return token
    values = dotenv_values(env_file)
    return next((values[name] for name in TOKEN_NAMES if values.get(name)), None)


def transformers_model(
    model: MBTIClassifier, fitted: dict[str, calibration.Calibration], adapter: bool, dtype: str
) -> torch.nn.Module:
    """The model to save: LoRA merged (unless `adapter`), the calibration folded into its head, in `dtype` (auto:
    as trained)."""
    hf_model = model.model.cpu()
    if model.hparams.peft is not None and not adapter:
        hf_model = hf_model.merge_and_unload()
    if len(fitted) == 1:  # one output per class
        ((head, cal),) = fitted.items()
        scales, shifts = [cal.temperature] * len(model.heads[head]), list(cal.offsets or [0.0] * len(model.heads[head]))
    else:  # one output per axis: the log-odds of its second letter
        scales = [cal.temperature for cal in fitted.values()]
        shifts = [cal.offsets[1] - cal.offsets[0] if cal.offsets else 0.0 for cal in fitted.values()]
    carrier = next((cal.carrier for cal in fitted.values() if cal.carrier is not None), None)  # the same for all
    folding.fold(hf_model, scales, shifts, carrier)
    # Recorded in config.json: raw logits = (calibrated logits - offset) x temperature, where the head has a bias
    # to hold the offsets (without one they were carried on its input, see `calibration`).
    config = (hf_model.get_base_model() if adapter else hf_model).config
    config.calibration_temperatures = {head: cal.temperature for head, cal in fitted.items()}
    config.calibration_offsets = {
        head: dict(zip(model.heads[head], cal.offsets)) for head, cal in fitted.items() if cal.offsets
    }
    return hf_model if dtype == "auto" else hf_model.to(DTYPES[dtype])


def recorded(loaded: Loaded, fitted: dict[str, calibration.Calibration], rules: dict[str, Persons]) -> dict:
    """What `loading` reads back from the export's config.json: how to prepare a text (target, max_length, masking:
    what a server must do as training did), every data setting and the split fingerprint, the calibration the
    scores carry, how posts make a person's answer (`persons`) and what chose the checkpoint."""
    heads = loaded.model.heads
    calibrated = {
        head: {"temperature": cal.temperature, "offsets": dict(zip(heads[head], cal.offsets)) or None}
        for head, cal in fitted.items()
        if cal != calibration.Calibration()
    }
    return {
        "target": list(heads),
        "max_length": loaded.max_length,
        "mask_type_mentions": loaded.mask,
        # Not the data files: where they lay on this machine is nobody's business; a command on the export takes the
        # user's own, and the split fingerprint checks that they give the same splits.
        "data": {key: value for key, value in loaded.data.items() if key not in ("tokenizer", "data_files")},
        "splits": loaded.fingerprint,
        "calibration": calibrated or None,
        "calibration_kept": {head: cal.decision["why"] for head, cal in fitted.items() if cal.decision},
        "persons": {head: rule.to_dict() for head, rule in rules.items()},
        "class_weight": loaded.model.class_weight.tolist(),  # the loss `validate` and `test` report, as in training
        "chosen_by": loaded.chosen_by,
        "frozen": loaded.model.frozen,  # the features its head reads (None: fine-tuned)
        # The model of persons (its weights in `person_head.WEIGHTS`) and who answers for a person, per head.
        "person_head": None
        if loaded.model.person_head is None
        else {"settings": loaded.model.hparams.person_head, "decision": loaded.model.person_decision},
    }


def plot_evaluation(
    folder: Path, heads: dict, outputs: evaluation.SplitOutputs, split: str, raw: dict[str, torch.Tensor] | None
) -> dict[str, str]:
    """A confusion matrix per head of the exported model's `outputs` on `split` (and, given the checkpoint's `raw`
    logits there, the reliability diagram before and after calibration) into `folder`; returns the confusion
    matrices' file names per head."""
    files = {h: "confusion_matrix.png" if len(heads) == 1 else f"confusion_matrix_{h}.png" for h in heads}
    for h, (head, classes) in enumerate(heads.items()):
        title = f"{split.capitalize()} confusion matrix, {head}"
        plots.confusion_plot(outputs.logits[head], outputs.labels[:, h], list(classes), title, folder / files[head])
    if raw:
        labels = torch.as_tensor(outputs.labels)
        curves = {head: (labels[:, h], raw[head], outputs.logits[head]) for h, head in enumerate(heads)}
        plots.reliability_plot(curves, folder / "reliability.png")
    return files


def _write_folder(folder: Path, loaded: Loaded, hf_model: torch.nn.Module, adapter: bool) -> bool:
    """Weights, config, tokenizer and training plot into `folder`; whether there was a training log to plot."""
    hf_model.save_pretrained(folder)
    if adapter:  # not config.json, or transformers would take the folder for a whole model
        hf_model.get_base_model().config.save_pretrained(folder / "classifier_config")
    loaded.tokenizer.save_pretrained(folder)  # its model_max_length: `truncation=True` truncates as training did
    if loaded.model.person_head is not None:
        person_head.save(loaded.model.person_head, folder)
    log_dir = loaded.checkpoint["mbti_lightning"].get("log_dir")
    return plots.training_plot(Path(log_dir) / "metrics.csv" if log_dir else None, folder / "val_metrics.png")


def _check_arguments(ckpt: Path, out: Path, overwrite: bool, push_to_hub: str | None) -> str | None:
    """Everything that can fail before any work; the hub token when pushing."""
    where = out.resolve()
    if where == Path.cwd().resolve() or where in ckpt.resolve().parents:
        raise ExportError(
            f"--out {out} is {'the working folder' if where == Path.cwd().resolve() else 'a folder that holds --ckpt'}"
            ": replacing it would delete what is in it (the checkpoints); give the export a folder of its own"
        )
    token = hub_token() if push_to_hub else None
    if push_to_hub and not token:
        raise ExportError(
            "--push-to-hub needs a Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or put "
            "HF_TOKEN=... in a .env file in the working directory"
        )
    if importlib.util.find_spec("matplotlib") is None:
        raise ExportError("the model card's plots need matplotlib: pip install 'mbti-lightning[export]'")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    return token


@torch.no_grad()
def example_answer(model: Any, tokenizer: Any, text: str) -> list[tuple[str, float]]:
    """What ``pipeline("text-classification", top_k=None)`` answers for `text` on the exported `model`: labels
    and scores, highest first (a multi-axis model's outputs are named by each axis's second letter)."""
    batch = tokenizer([text], truncation=True, return_tensors="pt").to(model.device)
    logits = model.head_logits(model(batch["input_ids"], batch["attention_mask"]))
    if len(model.heads) == 1:
        pairs = zip(next(iter(model.heads.values())), logits[0][0].float().softmax(-1).tolist())
    else:
        pairs = ((classes[1], float(x[0].float().softmax(-1)[1])) for classes, x in zip(model.heads.values(), logits))
    return sorted(pairs, key=lambda pair: -pair[1])


def export(
    ckpt: Path,
    out: Path,
    dtype: str = "auto",
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    adapter: bool = False,
    calibrate_scores: bool = True,
    license: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    allow_changed_data: bool = False,
    runtime: dict[str, Any] | None = None,
) -> Path:
    """Write the model folder at `out` (and upload it if `push_to_hub`); return `out`.

    A LoRA model is merged into its base, or with `adapter` saved as the adapter alone (plus the head). `runtime`:
    options of how to run it over the checkpoint's (`loading.RUNTIME_SETTINGS`), e.g. another attention kernel.
    """
    token = _check_arguments(ckpt, out, overwrite, push_to_hub)
    loaded = loading.from_checkpoint(ckpt, runtime)
    model, checkpoint = loaded.model, loaded.checkpoint
    if adapter and model.hparams.peft is None:
        raise ExportError(f"--adapter needs a LoRA checkpoint (model.peft); {ckpt} was fully fine-tuned")
    dm = loading.datamodule(loaded)
    dm.setup("test")
    data_changed = loading.check_splits(dm, loaded, allow_changed_data)
    # Calibration is fitted on validation; the card's figures are on test, rows that chose nothing, if there is one.
    split = "test" if "test" in dm.splits else "validation"
    carried = calibrate_scores and evaluation.needs_inputs(model)  # offsets carried on the head's inputs
    persons_read = model.person_head is not None  # the person head reads them too: the posts' features
    raw_val = evaluation.split_outputs(model, dm, "validation", carried or persons_read)
    fitted = evaluation.calibrate(raw_val if carried else dataclasses.replace(raw_val, inputs=None), calibrate_scores)
    for head, cal in fitted.items():
        held = cal.decision.get("held_out") or {}
        numbers = "; ".join(
            f"{level}: NLL {h['nll']:.4f}, MCC {h['mcc']:.3f}, balanced accuracy {h['bal_acc']:.3f}"
            for level, h in held.items()
        )
        print(f"calibration of {head}: {cal.decision['why']}" + (f" (held out: {numbers})" if numbers else ""))
    rules = evaluation.persons_for(model.persons, raw_val, fitted)  # persons, as the exported scores make them
    hf_model = transformers_model(model, fitted, adapter, dtype)
    (hf_model.get_base_model() if adapter else hf_model).config.mbti_lightning = recorded(loaded, fitted, rules)
    # The model runs once per split. Every figure on the test split is of the model as written (calibrated and cast,
    # through the forward pass pipeline runs), its raw scores the written ones with the calibration taken out;
    # without a test split, the card's validation figures are the raw scores calibrated.
    model.model = hf_model
    if split == "validation":
        raw, saved = raw_val, raw_val.under(fitted)
    else:
        carried = any(cal.carrier is not None for cal in fitted.values())
        saved = evaluation.split_outputs(model, dm, split, inputs=carried or persons_read)
        raw = saved.under(fitted, invert=True)
    example = EXAMPLES[0], example_answer(model, loaded.tokenizer, EXAMPLES[0])
    counts = dm.train_label_counts()
    others, _ = evaluation.comparisons(dm, split)
    priors = {head: rule.log_prior for head, rule in rules.items()}
    direct = person_head.person_systems(model, saved)
    results = evaluation.figures(model.heads, saved, others, RESAMPLES, priors=priors, person_systems=direct)
    calibrated = evaluation.calibration_figures(fitted, raw.logits, saved.logits, saved.labels, model.heads)
    majority = {head: classes[int(c.argmax())] for (head, classes), c in zip(model.heads.items(), counts)}
    with atomic_folder(out) as tmp:
        has_plot = _write_folder(tmp, loaded, hf_model, adapter)
        confusion_files = plot_evaluation(tmp, model.heads, saved, split, raw.logits if calibrate_scores else None)
        card = model_card(
            hyperparameters(checkpoint),
            hyperparameters(checkpoint, "datamodule_hyper_parameters"),
            checkpoint["mbti_lightning"],
            results,
            calibrated,
            split=split,
            majority=majority,
            calibrated=calibrate_scores,
            confusion_files=confusion_files,
            has_training_plot=has_plot,
            chosen_by=loaded.chosen_by,
            adapter=adapter,
            license=license,
            data_changed=data_changed,
            example=example,
        )
        card.save(tmp / "README.md")

    if push_to_hub:
        mcc = sum(r["posts"]["model"]["mcc"]["value"] for r in results.values()) / len(results)
        message = f"{', '.join(model.heads)} classifier from {model.hparams.model_name_or_path}, {split} MCC {mcc:.4f}"
        upload(out, push_to_hub, token, private, revision, create_pr, f"mbti-lightning: {message}")
    return out


def upload(
    folder: Path, repo_id: str, token: str, private: bool, revision: str | None, create_pr: bool, message: str
) -> None:
    """Create the repo (and branch `revision`) if needed and upload `folder` as one commit (or pull request)
    that makes the repo's files those of `folder`: files an earlier export left there and this one lacks
    (an adapter's ``adapter_config.json`` under a merged model, say) are deleted, or they would be served
    with it. The Hub keeps ``.gitattributes``."""
    api = HfApi(token=token)
    # None: a new repo gets the account's default visibility (an organisation's may be private).
    api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
    if private:  # create_repo leaves an existing repo's visibility as it is
        api.update_repo_settings(repo_id, private=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
        commit_message=message,
        delete_patterns="*",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mbti-lightning-export", description=__doc__)
    parser.add_argument("--ckpt", type=Path, required=True, help="a checkpoint written by `mbti-lightning fit`")
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write")
    parser.add_argument("--push-to-hub", metavar="OWNER/NAME", help="also upload the folder to this hub repo")
    parser.add_argument("--private", action="store_true", help="make the hub repo private (an existing one too)")
    parser.add_argument("--revision", metavar="BRANCH", help="upload to this branch (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="upload as a pull request instead of a commit")
    parser.add_argument("--license", help="the card's license, a hub license id such as mit or apache-2.0")
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="dtype of the saved weights; auto = as trained"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--allow-changed-data",
        "--allow_changed_data",
        action="store_true",
        help="export even if the data no longer gives the splits the model was trained with (the card says so)",
    )
    parser.add_argument(
        "--adapter",
        action="store_true",
        help="LoRA models: save the adapter (and head) alone instead of merging it into the base",
    )
    parser.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="export the raw scores, without temperature scaling",
    )
    parser.add_argument("--model-option", action="append", metavar="KEY=VALUE", help=loading.MODEL_OPTION_HELP)
    args = parser.parse_args(argv)
    stop_on_signals()
    try:
        out = export(
            args.ckpt,
            args.out,
            args.dtype,
            args.overwrite,
            args.push_to_hub,
            args.private,
            args.adapter,
            args.calibrate,
            args.license,
            args.revision,
            args.create_pr,
            args.allow_changed_data,
            loading.parse_runtime(args.model_option),
        )
    except UserError as err:
        parser.exit(2, f"mbti-lightning-export: error: {err}\n")
    except Stopped as stopped:
        parser.exit(stopped.exit_code, f"mbti-lightning-export: {stopped}\n")
    print(
        f"exported to {out}"
        + (f" and uploaded to https://huggingface.co/{args.push_to_hub}" if args.push_to_hub else "")
    )


if __name__ == "__main__":
    main()
