"""Calibration: probabilities that mean what they say, folded into the exported weights.

A class-weighted classifier scores as if the classes were equally common, and a fine-tuned one is
often over- or under-confident. Per head, logits z become ``z / T + b``: one temperature T (how sure)
and one offset per class b (the prior the class weights took out), fitted on the validation split by
minimising the negative log-likelihood (vector scaling with a shared temperature). A temperature alone
cannot move the prior: on a weak class-weighted model the only way it lowers the NLL is to flatten
every score towards 1 / classes. T is kept within [`T_MIN`, `T_MAX`], with a warning at a bound.

Dividing the classification head's weights by T and adding b to its bias makes plain ``pipeline``
return the calibrated scores. A head without a bias (Phi-3's ``score``, as every decoder's in
transformers) cannot carry b: there only T is folded, and b is recorded in ``config.json``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mbti_lightning.metrics import calibration_error

T_MIN, T_MAX = 0.05, 20.0
#: The number of confidence bins of every calibration figure: ECE, its per-class gap and the diagram.
BINS = 15
#: Where a Hugging Face sequence classifier keeps its output layer (``classifier.out_proj`` for RoBERTa's).
HEAD_NAMES = ("score", "classifier")


@dataclass(frozen=True)
class Calibration:
    """``logits / temperature + offsets`` (offsets per class, in class-id order)."""

    temperature: float = 1.0
    offsets: tuple[float, ...] = field(default=())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits.double() / self.temperature
        return out + torch.tensor(self.offsets, dtype=torch.float64) if self.offsets else out


def nll(logits: torch.Tensor, labels: torch.Tensor, cal: Calibration = Calibration()) -> float:
    """Mean negative log-likelihood of (rows, classes) `logits` under calibration `cal`."""
    return float(F.cross_entropy(cal(logits), labels))


def _fit(logits: torch.Tensor, labels: torch.Tensor, offsets: bool, log_t: float | None) -> Calibration:
    """LBFGS on log T (unless fixed at `log_t`) and, with `offsets`, the offsets of classes 1.. (class 0's is 0:
    a softmax does not change when every logit moves by the same amount)."""
    free_t = torch.tensor(0.0 if log_t is None else log_t, dtype=torch.float64, requires_grad=log_t is None)
    shift = torch.zeros(logits.shape[-1] - 1, dtype=torch.float64, requires_grad=offsets)
    params = [p for p in (free_t, shift) if p.requires_grad]
    if not params:
        return Calibration(float(free_t.exp()))
    optimizer = torch.optim.LBFGS(params, lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def calibrated() -> torch.Tensor:
        return logits / free_t.exp() + F.pad(shift, (1, 0))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(calibrated(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    b = F.pad(shift.detach(), (1, 0))
    return Calibration(float(free_t.detach().exp()), tuple(b.tolist()) if offsets else ())


def fit(logits: torch.Tensor, labels: torch.Tensor, offsets: bool = True, name: str = "") -> Calibration:
    """The temperature (and with `offsets` the per-class offsets) that minimise the NLL of `logits` on `labels`;
    no change unless they lower it. A temperature beyond [`T_MIN`, `T_MAX`] is held at the bound, with a warning
    naming head `name`: scores that carry almost no information, or that are almost certain."""
    logits = logits.detach().double()
    cal = _fit(logits, labels, offsets, None)
    if not T_MIN <= cal.temperature <= T_MAX:
        bound = min(max(cal.temperature, T_MIN), T_MAX)
        why = "hardly tells the classes apart" if bound == T_MAX else "separates the classes almost perfectly"
        warnings.warn(
            f"calibration{f' of {name}' if name else ''}: the best temperature, {cal.temperature:.4g}, is outside "
            f"[{T_MIN}, {T_MAX}], so it is held at {bound} (the model {why} on these rows)",
            stacklevel=2,
        )
        cal = _fit(logits, labels, offsets, float(np.log(bound)))
    return cal if nll(logits, labels, cal) < nll(logits, labels) else Calibration()


def ece(logits: torch.Tensor, labels: torch.Tensor, cal: Calibration = Calibration()) -> float:
    """Expected calibration error of the top class's probability (`BINS` bins), as logged in ``val/ece``."""
    metric = calibration_error(logits.shape[-1])
    metric.update(cal(logits).float().softmax(-1), labels)
    return float(metric.compute())


def prior_gap(logits: torch.Tensor, labels: torch.Tensor, cal: Calibration = Calibration()) -> float:
    """The largest difference between a class's mean probability and its share of the rows: what top-label
    ECE hides (a model that says P with 0.52 on average where 70% of the rows are P is off by 0.18)."""
    probs = cal(logits).softmax(-1)
    shares = torch.bincount(labels, minlength=logits.shape[-1]).double() / len(labels)
    return float((probs.mean(0) - shares).abs().max())


def classification_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The linear layer that outputs a Hugging Face sequence classifier's logits, found by name (`HEAD_NAMES`);
    under peft, its trained copy."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in HEAD_NAMES:
        module = getattr(base, name, None)
        copies = getattr(module, "modules_to_save", None)  # peft's wrapper: the trained copy per adapter
        if copies is not None:
            module = copies[module.active_adapters[0]]
        module = getattr(module, "out_proj", module)
        if isinstance(module, torch.nn.Linear) and module.out_features == model.config.num_labels:
            return module
    raise ValueError(f"found no classification head ({' or '.join(HEAD_NAMES)}) in {type(base).__name__}")


@torch.no_grad()
def fold(model: torch.nn.Module, scales: list[float], shifts: list[float]) -> bool:
    """Output i of `model`'s classification head becomes ``output / scales[i] + shifts[i]``; a head without a
    bias takes the scales only. Returns whether the shifts were folded."""
    head = classification_head(model)
    scale = torch.tensor(scales, dtype=torch.float64)
    head.weight.copy_((head.weight.double() / scale[:, None]).to(head.weight.dtype))
    if head.bias is None:
        return False
    head.bias.copy_((head.bias.double() / scale + torch.tensor(shifts, dtype=torch.float64)).to(head.bias.dtype))
    return True


def reliability_plot(curves: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], out: Path) -> None:
    """Accuracy against confidence of the top class per head, before and after calibration, in `BINS` bins of
    equal width (as ECE counts them), drawn with scikit-learn's `CalibrationDisplay` where it is installed.

    `curves` maps a head to its (labels, raw logits, calibrated logits)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 4), squeeze=False)
    for ax, (head, (labels, *logits)) in zip(axes[0], curves.items()):
        for x, name in zip(logits, ("before", "after")):
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
    CalibrationDisplay.from_predictions(correct, confidence, n_bins=BINS, ax=ax, name=name, ref_line=name == "before")
