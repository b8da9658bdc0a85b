"""Calibration's statistics: the temperature and class offsets that make probabilities mean what they say,
fitted and measured (NLL, ECE, the class-share gap). `folding` writes them into a model's head.

A class-weighted classifier scores as if the classes were equally common, and a fine-tuned one is
often over- or under-confident. Per head, logits z become ``z / T + b``: one temperature T (how sure)
and one offset per class b (the prior the class weights took out), fitted on the validation split by
minimising the negative log-likelihood (vector scaling with a shared temperature). A temperature alone
cannot move the prior: on a weak class-weighted model the only way it lowers the NLL is to flatten
every score towards 1 / classes. T is kept within [`T_MIN`, `T_MAX`], with a warning at a bound.

Folded into the classification head (`folding.fold`), they make plain ``pipeline`` return the calibrated
scores. A head without a bias (Phi-3's ``score``, as every decoder's in
transformers, which drops a bias saved for it) carries b on its weights instead: ``b * (c . h)``, where
h is the head's input and c the `carrier`, the linear function of h closest to 1 on the validation
rows. There the offsets are only as constant as ``c . h`` is, so they are fitted together with T as
they will act, and the card measures the result on rows the fit never saw.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassCalibrationError

T_MIN, T_MAX = 0.05, 20.0
#: The number of confidence bins of every calibration figure: ECE, its per-class gap and the diagram.
BINS = 15
#: The ridge of the `carrier` fit, relative to the mean squared input feature.
RIDGE = 1e-2


def calibration_error(num_classes: int) -> MulticlassCalibrationError:
    """Expected calibration error (`BINS` bins, L1) of the predicted class's probability."""
    return MulticlassCalibrationError(num_classes, n_bins=BINS, validate_args=False)


@dataclass(frozen=True)
class Calibration:
    """``logits / temperature + offsets`` (offsets per class, in class-id order), the offsets scaled per row by
    ``carrier . h`` (h: the head's input) where the head has no bias to hold them."""

    temperature: float = 1.0
    offsets: tuple[float, ...] = field(default=())
    carrier: torch.Tensor | None = field(default=None, compare=False, repr=False)
    #: Which parts were kept and why, from the held-out check (`evaluation.calibrate`).
    decision: dict | None = field(default=None, compare=False, repr=False)

    def __call__(self, logits: torch.Tensor, carried: torch.Tensor | None = None) -> torch.Tensor:
        """The calibrated `logits`; `carried` is ``carrier . h`` per row, needed when there is a carrier."""
        out = logits.double() / self.temperature
        if not self.offsets:
            return out
        offsets = torch.tensor(self.offsets, dtype=torch.float64)
        return out + (offsets if self.carrier is None else carried.double()[:, None] * offsets)

    def invert(self, calibrated: torch.Tensor, carried: torch.Tensor | None = None) -> torch.Tensor:
        """The logits this maps to `calibrated` (up to a constant per row, which no probability sees): a model's raw
        scores from its exported, calibrated ones, without running the raw model again."""
        out = calibrated.double()
        if self.offsets:
            offsets = torch.tensor(self.offsets, dtype=torch.float64)
            out = out - (offsets if self.carrier is None else carried.double()[:, None] * offsets)
        return out * self.temperature


def nll(
    logits: torch.Tensor, labels: torch.Tensor, cal: Calibration = Calibration(), carried: torch.Tensor | None = None
) -> float:
    """Mean negative log-likelihood of (rows, classes) `logits` under calibration `cal`."""
    return float(F.cross_entropy(cal(logits, carried), labels))


def _fit(
    logits: torch.Tensor, labels: torch.Tensor, offsets: bool, log_t: float | None, carried: torch.Tensor
) -> Calibration:
    """LBFGS on log T (unless fixed at `log_t`) and, with `offsets`, the offsets of classes 1.. (class 0's is 0:
    a softmax does not change when every logit moves by the same amount), each scaled per row by `carried`."""
    free_t = torch.tensor(0.0 if log_t is None else log_t, dtype=torch.float64, requires_grad=log_t is None)
    shift = torch.zeros(logits.shape[-1] - 1, dtype=torch.float64, requires_grad=offsets)
    params = [p for p in (free_t, shift) if p.requires_grad]
    if not params:
        return Calibration(float(free_t.exp()))
    optimizer = torch.optim.LBFGS(params, lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def calibrated() -> torch.Tensor:
        return logits / free_t.exp() + carried[:, None] * F.pad(shift, (1, 0))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(calibrated(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    b = F.pad(shift.detach(), (1, 0))
    return Calibration(float(free_t.detach().exp()), tuple(b.tolist()) if offsets else ())


def fit(
    logits: torch.Tensor,
    labels: torch.Tensor,
    offsets: bool = True,
    name: str = "",
    carrier: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Calibration:
    """The temperature (and with `offsets` the per-class offsets) that minimise the NLL of `logits` on `labels`;
    no change unless they lower it. For a head without a bias, `carrier` is (c, the head's inputs (rows,
    features)), c from `fit_carrier`: the offsets are fitted as they will act, scaled per row by ``c . input``.
    A temperature beyond [`T_MIN`, `T_MAX`] is held at the bound, with a warning naming head `name`: scores
    that carry almost no information, or that are almost certain."""
    logits = logits.detach().double()
    carried = torch.ones(len(logits)) if carrier is None else carrier[1] @ carrier[0]
    carried = carried.double()
    cal = _fit(logits, labels, offsets, None, carried)
    if not T_MIN <= cal.temperature <= T_MAX:
        bound = min(max(cal.temperature, T_MIN), T_MAX)
        why = "hardly tells the classes apart" if bound == T_MAX else "separates the classes almost perfectly"
        warnings.warn(
            f"calibration{f' of {name}' if name else ''}: the best temperature, {cal.temperature:.4g}, is outside "
            f"[{T_MIN}, {T_MAX}], so it is held at {bound} (the model {why} on these rows)",
            stacklevel=2,
        )
        cal = _fit(logits, labels, offsets, float(np.log(bound)), carried)
    cal = Calibration(cal.temperature, cal.offsets, carrier[0] if carrier is not None and cal.offsets else None)
    return cal if nll(logits, labels, cal, carried) < nll(logits, labels) else Calibration()


def fit_carrier(inputs: torch.Tensor) -> torch.Tensor:
    """The vector c for which ``c . h`` is closest to 1 over the rows h of `inputs` (ridge least squares): the
    direction along which a head without a bias can add (nearly) the same offset to every text."""
    gram = (inputs.T @ inputs).double() / len(inputs)  # fp32 products: no fp64 copy of every row
    ridge = RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=torch.float64)
    return torch.linalg.solve(gram + ridge, inputs.mean(0).double()).float()


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
