"""A person's answer from their posts: the posts' evidence adds up, and the prior counts once.

A post's log-probabilities are, up to a constant, the evidence of the post for each class plus the log
of the prior its scores carry: ``log p(c | post) = log L(post | c) + log prior(c)``. Taken as
independent evidence, a person's posts give ``sum_i [log p(c | post_i) - log prior(c)] + log prior(c)``
(`logits`). The mean of the posts' log-probabilities, used before, keeps the prior at full strength and
divides the evidence by the number of posts: on a skewed axis with weak posts, once calibration had
put the prior into the scores, every person got the majority letter.

The prior the scores carry is what the model was trained toward: the training split's class shares
times the class weights (`trained_prior`: uniform for ``balanced`` weights), passed through the
calibration where the scores are calibrated (`Calibration` of the prior's logits). Posts of one person
are not independent, so the sum is overconfident: a temperature fitted on validation persons (`fit`,
where there are at least `MIN_PERSONS` of them, each with several posts) makes a person's probability
a probability for persons; it leaves the letter as it is. Without one, the probability is the sum's,
and `Persons.calibrated` says so.

One function gives a person's answer everywhere: ``val/author/*``, `report`, the card, ``predict
--predictions.per author`` and the server's ``posts``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mbti_lightning import calibration

#: Validation persons (with two posts or more) needed to fit the person-level temperature.
MIN_PERSONS = 20


def trained_prior(counts: torch.Tensor | None, weights: torch.Tensor) -> torch.Tensor:
    """The log prior a classifier trained with class `weights` on a split with class `counts` scores toward:
    log(share x weight), normalised (class-weighted cross entropy is minimised by p(c | x) proportional to
    weight(c) p(c) L(x | c)). Without counts (checkpoints written before they were recorded) the shares are
    taken as equal."""
    counts = torch.ones_like(weights) if counts is None else counts.to(weights)
    prior = counts.double() * weights.double()
    return (prior / prior.sum()).log()


def logits(log_probs: torch.Tensor, persons: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """(posts, k) log-probabilities, (posts,) person numbers 0..n-1 and the (k,) log prior the scores carry ->
    (n, k) person logits: the posts' evidence summed, the prior added once."""
    n = int(persons.max()) + 1 if len(persons) else 0
    evidence = log_probs.double() - log_prior.double()
    return evidence.new_zeros(n, log_probs.shape[-1]).index_add_(0, persons, evidence) + log_prior.double()


def labels_of(labels: torch.Tensor | np.ndarray, persons: torch.Tensor | np.ndarray, k: int) -> torch.Tensor:
    """(posts,) class ids and (posts,) person numbers 0..n-1 -> (n,) each person's label: the most common label of
    their posts (the lowest class id on a tie). The one definition every figure per person uses."""
    labels, persons = torch.as_tensor(labels), torch.as_tensor(persons, device=torch.as_tensor(labels).device)
    n = int(persons.max()) + 1 if len(persons) else 0
    counts = torch.zeros(n, k, device=labels.device).index_put_(
        (persons, labels), torch.ones(len(labels), device=labels.device), accumulate=True
    )
    return counts.argmax(-1)


def calibrated_prior(log_prior: torch.Tensor, cal) -> torch.Tensor:
    """The log prior of scores calibrated by `cal` (a `calibration.Calibration`): the calibration is an affine map
    of the logits, so a post with no evidence (the prior's logits) maps to the calibrated scores' prior. (Offsets
    carried on a bias-free head's inputs are taken at their mean scale, 1.)"""
    return cal(log_prior[None].double(), torch.ones(1, dtype=torch.float64))[0].log_softmax(-1)


def votes(log_probs: np.ndarray, persons: np.ndarray, log_prior: np.ndarray | torch.Tensor) -> np.ndarray:
    """The class `logits` gives each person, for the NumPy callers (the report and the card)."""
    x = logits(torch.as_tensor(log_probs), torch.as_tensor(persons), torch.as_tensor(log_prior))
    return x.argmax(-1).numpy()


@dataclass
class Persons:
    """How a model's posts become a person's answer: the log prior its scores carry and, where fitted, the
    temperature that makes a person's probability calibrated."""

    log_prior: torch.Tensor  # (k,)
    temperature: float | None = None  # None: not fitted (too few validation persons)

    @classmethod
    def uniform(cls, k: int) -> Persons:
        """For scores whose prior is unknown: taken as uniform, the probabilities not calibrated."""
        return cls(torch.full((k,), -math.log(k), dtype=torch.float64))

    @property
    def calibrated(self) -> bool:
        return self.temperature is not None

    def log_probs(self, log_probs: torch.Tensor, persons: torch.Tensor) -> torch.Tensor:
        """(n, k) each person's log-probabilities: their `logits`, divided by the temperature where there is one."""
        x = logits(log_probs, persons, self.log_prior)
        return (x / (self.temperature or 1.0)).log_softmax(-1).float()

    def to_dict(self) -> dict:
        return {"log_prior": self.log_prior.tolist(), "temperature": self.temperature}

    @classmethod
    def from_dict(cls, d: dict) -> Persons:
        return cls(torch.tensor(d["log_prior"], dtype=torch.float64), d.get("temperature"))


def fit(log_probs: torch.Tensor, labels: np.ndarray, persons: np.ndarray, log_prior: torch.Tensor) -> Persons:
    """`Persons` for scores with `log_prior`, its temperature fitted on the persons of a split (validation) where
    at least `MIN_PERSONS` of them have two posts or more; a person's label is the most common of their posts'."""
    persons = torch.as_tensor(persons)
    sizes = torch.bincount(persons)
    if int((sizes >= 2).sum()) < MIN_PERSONS:
        return Persons(log_prior)
    k = log_probs.shape[-1]
    truth = labels_of(labels, persons, k)
    several = sizes >= 2  # a single post's person says nothing of how posts add up
    x = logits(log_probs, persons, log_prior)
    cal = calibration.fit(x[several], truth[several], offsets=False, name="persons")
    return Persons(log_prior, cal.temperature)
