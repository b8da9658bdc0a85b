"""Writing `mbti-lightning predict` results to a file: one row per input text, or per author, in the input's order."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from mbti_lightning import person_head
from mbti_lightning.cache import atomic_open
from mbti_lightning.labels import AXES, AXIS_POSITION, TYPES
from mbti_lightning.persons import Persons


def prediction_records(heads: dict[str, tuple[str, ...]], probs: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per row: each axis's letter and its probability, and the whole type when the heads give one.

    `probs` holds per head the (rows, classes) probabilities in class-id order. A 16-way ``mbti`` head
    gives ``type`` and ``type_prob``, and each axis's letter with its probability summed over the types.
    """
    columns: dict[str, list] = {}
    if "mbti" in heads:
        p = probs["mbti"]
        best = p.argmax(-1)
        columns["type"] = [TYPES[i] for i in best.tolist()]
        columns["type_prob"] = p.gather(1, best[:, None])[:, 0].tolist()
        for axis, (_, second) in AXES.items():
            has_second = torch.tensor([t[AXIS_POSITION[axis]] == second for t in TYPES], device=p.device)
            probs = probs | {axis: torch.stack([p[:, ~has_second].sum(-1), p[:, has_second].sum(-1)], -1)}
    axes = [axis for axis in AXES if axis in probs]
    for axis in axes:
        best = probs[axis].argmax(-1)
        columns[axis] = [AXES[axis][i] for i in best.tolist()]
        columns[f"{axis}_prob"] = probs[axis].gather(1, best[:, None])[:, 0].tolist()
    if len(axes) == 4 and "type" not in columns:
        columns["type"] = ["".join(letters) for letters in zip(*(columns[axis] for axis in axes))]
    order = ["type", "type_prob", *(name for axis in axes for name in (axis, f"{axis}_prob"))]
    n = len(next(iter(probs.values())))
    return [{name: _round(columns[name][i]) for name in order if name in columns} for i in range(n)]


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def per_author(
    authors: list,
    log_probs: dict[str, torch.Tensor],
    rules: dict[str, Persons] | None = None,
    model: Any = None,
    features: torch.Tensor | None = None,
) -> tuple[list, torch.Tensor, dict[str, torch.Tensor]]:
    """(authors in order of first appearance, their post counts, per head their (authors, classes) probabilities).

    An author's posts add up their evidence, the prior counting once, as ``val/author/*`` does (see `persons`):
    `rules` per head are the model's (`MBTIClassifier.persons`); without them the scores' prior is taken as
    uniform and the probabilities are not calibrated for persons. With `model` (an `MBTIClassifier`), its answer
    for a person (`person_head.log_probs`: its person head's, from the posts' `features`, where that answers).
    """
    names = list(dict.fromkeys(authors))
    number = {name: i for i, name in enumerate(names)}
    index = torch.tensor([number[a] for a in authors], dtype=torch.long)
    counts = torch.bincount(index, minlength=len(names))
    if model is not None:
        probs = person_head.log_probs(model, log_probs, features, index, rules)
        return names, counts, {head: lp.exp() for head, lp in probs.items()}
    rules = rules or {head: Persons.uniform(lp.shape[-1]) for head, lp in log_probs.items()}
    probs = {head: rules[head].log_probs(lp, index).exp() for head, lp in log_probs.items()}
    return names, counts, probs


class PredictionWriter(L.Callback):
    """Writes the predictions of `mbti-lightning predict` to a CSV or JSONL file (by its extension).

    ``per: text`` (the default): one row per text, in the input's order (batches are length-sorted
    for speed). Each row holds ``id`` (the input's ``id`` column, else its line number from 1 for
    .txt and row number from 0 otherwise), ``post`` (with `data.explode_separator`: the post's
    number within its row), the text (``text``), its SHA-256 (``text_sha256``) or neither, then the
    columns of `prediction_records`: letters, never class ids.

    ``per: author``: one row per author (`data.author_column`, else each source row), in order of
    first appearance: ``author``, ``posts`` (how many texts) and the columns of
    `prediction_records`, from the evidence of the author's posts added up (see `per_author`).

    The file is written whole or not at all. (A plain callback, not Lightning's
    `BasePredictionWriter`: that one wants the batches' row indices from a standard batch sampler,
    and warns on every run that it could not find them; each batch here carries its rows' numbers.)

    Args:
        output: The file to write, ``.csv`` or ``.jsonl``.
        text: Write each input ``text``, its ``hash``, or ``none`` (``per: text`` only).
        per: One row per ``text`` or per ``author``.
    """

    def __init__(
        self,
        output: str = "predictions.csv",
        text: Literal["text", "hash", "none"] = "text",
        per: Literal["text", "author"] = "text",
    ) -> None:
        if Path(output).suffix not in (".csv", ".jsonl"):
            raise ValueError(f"predictions.output must end in .csv or .jsonl, got {output!r}")
        self.output = Path(output)
        self.text = text
        self.per = per

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows, self._log_probs, self._features = [], [], []

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: dict,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._rows.append(outputs["row"].cpu())
        self._log_probs.append({head: x.float().log_softmax(-1).cpu() for head, x in outputs["logits"].items()})
        if "features" in outputs:  # what the person head reads
            self._features.append(outputs["features"].cpu())

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = torch.cat(self._rows)
        log_probs = {head: torch.cat([p[head] for p in self._log_probs]) for head in pl_module.heads}
        features = torch.cat(self._features) if self._features else None
        if trainer.world_size > 1:  # each rank predicted its share of the batches
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (rows, log_probs, features))
            rows = torch.cat([r for r, _, _ in gathered])
            log_probs = {head: torch.cat([p[head] for _, p, _ in gathered]) for head in log_probs}
            features = torch.cat([f for _, _, f in gathered]) if features is not None else None
        if not trainer.is_global_zero:
            return
        real = rows >= 0  # not the copies that only keep ranks in step (sampling.PADDING)
        order = rows[real].argsort()
        rows, log_probs = rows[real][order].tolist(), {head: lp[real][order] for head, lp in log_probs.items()}
        features = features[real][order] if features is not None else None
        inputs = trainer.datamodule.predict_inputs
        if self.per == "author":
            authors = [inputs["author"][row] for row in rows]
            names, counts, probs = per_author(authors, log_probs, model=pl_module, features=features)
            records = prediction_records(pl_module.heads, probs)
            out = [{"author": name, "posts": int(n)} | r for name, n, r in zip(names, counts, records)]
        else:
            records = prediction_records(pl_module.heads, {head: lp.exp() for head, lp in log_probs.items()})
            out = [self._input_columns(inputs, row) | record for row, record in zip(rows, records)]
        with atomic_open(self.output, "w") as f:
            if self.output.suffix == ".csv":
                writer = csv.DictWriter(f, fieldnames=list(out[0]) if out else ["id"])
                writer.writeheader()
                writer.writerows(out)
            else:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in out)

    def _input_columns(self, inputs: dict[str, list], row: int) -> dict[str, Any]:
        columns = {"id": inputs["id"][row]} | ({"post": inputs["post"][row]} if "post" in inputs else {})
        text = inputs["text"][row] if inputs.get("text") is not None else None
        if text is not None and self.text == "text":
            columns["text"] = text
        elif text is not None and self.text == "hash":
            columns["text_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        return columns
