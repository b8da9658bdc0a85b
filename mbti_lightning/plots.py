"""Every plot of the card, the report and the export, drawn with matplotlib (the `export` extra)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from mbti_lightning.calibration import BINS

#: The validation metrics logged during training, for the card's plot of them.
LOGGED = {"acc": "accuracy", "mcc": "MCC", "bal_acc": "balanced accuracy", "macro_f1": "macro-F1"}


def training_plot(metrics_csv: Path | None, out: Path) -> bool:
    """Validation metrics over training steps, from Lightning's CSV log; False if there is no log."""
    if metrics_csv is None or not metrics_csv.is_file():
        return False
    import matplotlib.pyplot as plt

    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get("val/mcc")]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [int(r["step"]) for r in rows]
    for key, name in LOGGED.items():
        if f"val/{key}" in rows[0]:
            ax.plot(steps, [float(r[f"val/{key}"]) for r in rows], marker="o", label=name)
    ax.set(xlabel="optimizer step", ylabel="validation metric", title="Validation during training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def confusion_plot(logits: torch.Tensor, labels: np.ndarray, letters: list[str], title: str, out) -> None:
    import matplotlib.pyplot as plt
    from torchmetrics.classification import MulticlassConfusionMatrix

    matrix = MulticlassConfusionMatrix(len(letters))
    matrix.update(logits.argmax(-1), torch.as_tensor(labels))
    fig, ax = matrix.plot(labels=letters)
    ax.set_title(title)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def reliability_plot(curves: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], out: Path) -> None:
    """Accuracy against confidence of the top class per head, before and after calibration, in `BINS` bins of
    equal width (as ECE counts them), drawn with scikit-learn's `CalibrationDisplay` where it is installed.

    `curves` maps a head to its (labels, raw logits, calibrated logits), or (labels, logits) for one curve."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 4), squeeze=False)
    for ax, (head, (labels, *logits)) in zip(axes[0], curves.items()):
        for x, name in zip(logits, ("before", "after") if len(logits) == 2 else ("model",)):
            confidence, predicted = x.float().softmax(-1).max(-1)
            _reliability_curve(ax, (predicted == labels).numpy(), confidence.numpy(), name)
        ax.set(xlabel="confidence", ylabel="accuracy", title=f"Reliability, {head}", xlim=(0, 1), ylim=(0, 1))
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _reliability_curve(ax, correct: np.ndarray, confidence: np.ndarray, name: str) -> None:
    try:
        from sklearn.calibration import CalibrationDisplay
    except ImportError:
        edges = np.linspace(0, 1, BINS + 1)
        which = np.clip(np.digitize(confidence, edges[1:-1]), 0, BINS - 1)
        shown = [b for b in range(BINS) if (which == b).any()]
        ax.plot([confidence[which == b].mean() for b in shown], [correct[which == b].mean() for b in shown], "o-")
        ax.lines[-1].set_label(name)
        return
    CalibrationDisplay.from_predictions(correct, confidence, n_bins=BINS, ax=ax, name=name, ref_line=name != "after")


def how_much_text_plot(curves: dict[str, list[dict]], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 4), squeeze=False)
    for ax, (head, points) in zip(axes[0], curves.items()):
        x = np.arange(len(points))
        for name in (n for n in points[0] if n != "posts"):
            for key, style in (("acc", "-o"), ("macro_f1", "--s")):
                y = [p[name][key]["value"] for p in points]
                low, high = ([p[name][key]["interval"][i] for p in points] for i in (0, 1))
                ax.errorbar(
                    x, y, yerr=[np.subtract(y, low), np.subtract(high, y)], fmt=style, capsize=3, label=f"{name} {key}"
                )
        ax.set(xticks=x, xticklabels=[str(p["posts"]) for p in points], xlabel="posts per person", title=head)
        ax.set(ylabel="per person (95% interval)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def coverage_plot(curves: dict[str, dict], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for head, curve in curves.items():
        ax.plot(curve["coverage"], curve["accuracy"], label=head)
    ax.set(xlabel="coverage (share of posts answered, most confident first)", ylabel="accuracy", xlim=(1, 0))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
