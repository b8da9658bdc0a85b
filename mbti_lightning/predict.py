"""Writing `mbti-lightning predict` results to a file: one row per input text, in the input's order."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from mbti_lightning.cache import atomic_open
from mbti_lightning.labels import AXES, AXIS_POSITION, TYPES


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


class PredictionWriter(L.Callback):
    """Writes the predictions of `mbti-lightning predict` to a CSV or JSONL file (by its extension).

    Rows come back in the input's order (batches are length-sorted for speed). Each row holds ``id``
    (the input's ``id`` column, else its line number from 1 for .txt and row number from 0
    otherwise), the text (``text``), its SHA-256 (``text_sha256``) or neither, then the columns of
    `prediction_records`: letters, never class ids. The file is written whole or not at all.

    (A plain callback, not Lightning's `BasePredictionWriter`: that one wants the batches' row indices
    from a standard batch sampler, and warns on every run that it could not find them; each batch
    here carries its rows' numbers.)

    Args:
        output: The file to write, ``.csv`` or ``.jsonl``.
        text: Write each input ``text``, its ``hash``, or ``none``.
    """

    def __init__(self, output: str = "predictions.csv", text: Literal["text", "hash", "none"] = "text") -> None:
        if Path(output).suffix not in (".csv", ".jsonl"):
            raise ValueError(f"predictions.output must end in .csv or .jsonl, got {output!r}")
        self.output = Path(output)
        self.text = text

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows, self._probs = [], []

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: dict, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._rows.append(outputs["row"].cpu())
        self._probs.append({head: p.float().cpu() for head, p in outputs["probs"].items()})

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = torch.cat(self._rows)
        probs = {head: torch.cat([p[head] for p in self._probs]) for head in pl_module.heads}
        if trainer.world_size > 1:  # each rank predicted its share of the batches
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (rows, probs))
            rows = torch.cat([r for r, _ in gathered])
            probs = {head: torch.cat([p[head] for _, p in gathered]) for head in probs}
        if not trainer.is_global_zero:
            return
        order = rows.argsort()
        records = prediction_records(pl_module.heads, {head: p[order] for head, p in probs.items()})
        inputs = trainer.datamodule.predict_inputs
        with atomic_open(self.output, "w") as f:
            rows_out = [self._input_columns(inputs, row) | record for row, record in zip(rows[order].tolist(), records)]
            if self.output.suffix == ".csv":
                writer = csv.DictWriter(f, fieldnames=list(rows_out[0]) if rows_out else ["id"])
                writer.writeheader()
                writer.writerows(rows_out)
            else:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows_out)

    def _input_columns(self, inputs: dict[str, list], row: int) -> dict[str, Any]:
        columns = {"id": inputs["id"][row]}
        text = inputs["text"][row] if inputs.get("text") is not None else None
        if text is not None and self.text == "text":
            columns["text"] = text
        elif text is not None and self.text == "hash":
            columns["text_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        return columns
