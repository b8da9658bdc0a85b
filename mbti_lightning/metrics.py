"""Evaluation metrics: post-level classification and calibration metrics, author-level ones, and the majority baseline.

The majority baseline is one thing everywhere (logs, model card, README): the training split's most
common class, scored on the evaluated split, which is what a deployed constant model would do.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.utilities import dim_zero_cat

from mbti_lightning import persons
from mbti_lightning.calibration import calibration_error

#: The headline metrics, in the order every table and log shows them.
SCORES = ("acc", "bal_acc", "macro_f1", "mcc")


class ClassificationScores(MulticlassConfusionMatrix):
    """Accuracy, balanced accuracy, macro-F1 and MCC of one head, from its confusion matrix by `confusion_metrics`:
    the same computation as the report's and the card's, so a figure is the same wherever it is logged. Balanced
    accuracy and macro-F1 average over the classes present (a class absent from the labels is not a recall of 0);
    MCC is 0 for a constant answer (torchmetrics' own gives a small eps-based value).

    Without torchmetrics' checks of the class ids: the data module validates labels, and each check would make the
    CPU wait for the GPU in every evaluation batch.
    """

    def __init__(self, num_classes: int, prefix: str = "") -> None:
        super().__init__(num_classes, validate_args=False)
        self.prefix = prefix

    def compute(self) -> dict[str, torch.Tensor]:
        conf = super().compute()
        values = confusion_metrics(conf.double().cpu().numpy())
        return {f"{self.prefix}{key}": torch.tensor(float(values[key]), device=conf.device) for key in SCORES}


def score_predictions(
    heads: dict[str, tuple[str, ...]], preds: torch.Tensor, labels: torch.Tensor
) -> dict[str, dict[str, float]]:
    """Per head: `ClassificationScores` of (rows, heads) predicted class ids against (rows, heads) labels."""
    out = {}
    for h, (head, classes) in enumerate(heads.items()):
        metrics = ClassificationScores(len(classes), "")
        metrics.update(torch.as_tensor(preds)[:, h], torch.as_tensor(labels)[:, h])
        out[head] = {name: float(value) for name, value in metrics.compute().items()}
    return out


def _mean() -> MeanMetric:
    """A weighted mean that keeps NaN (a NaN loss shows as NaN) and so never reads values back to the CPU."""
    return MeanMetric(nan_strategy="disable")


class AuthorMetrics(Metric):
    """Metrics per author, beside the majority-class baselines that give every number its context.

    Each author's answer adds up the evidence of their posts, the prior counting once (`persons.logits`,
    with the `log_prior` the scores carry; uniform until it is set), and the author's label is the most
    common label of their posts. `compute` returns
    ``author/{acc,bal_acc,macro_f1,mcc}``, ``author/count`` (how many authors) and, once `majority_class`
    (the training split's most common class) is set, ``majority_acc`` and ``author/majority_acc``:
    the accuracy of always answering it, over the posts and over the authors. States are
    concatenated across processes, so under DDP every rank computes on all posts.
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.majority_class: int | None = None
        self.log_prior: torch.Tensor | None = None
        self.add_state("log_probs", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("authors", default=[], dist_reduce_fx="cat")
        self.add_state("features", default=[], dist_reduce_fx="cat")
        # Where a person head answers for persons: (posts, features), (posts,) persons 0..n-1 -> (n, k) logits.
        self.person_answer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def update(
        self, logits: torch.Tensor, labels: torch.Tensor, authors: torch.Tensor, features: torch.Tensor | None = None
    ) -> None:
        """(posts, classes) logits, (posts,) class ids and (posts,) author ids; the (posts, features) that a person
        head reads, where the model has one."""
        if features is not None:
            self.features.append(features)
        self.log_probs.append(logits.detach().float().log_softmax(-1))
        self.labels.append(labels)
        self.authors.append(authors)

    def compute(self) -> dict[str, torch.Tensor]:
        log_probs, labels, authors = (dim_zero_cat(x) for x in (self.log_probs, self.labels, self.authors))
        _, author = torch.unique(authors, return_inverse=True)  # (posts,) -> 0..n_authors-1
        n_authors = int(author.max()) + 1
        rule = persons.Persons.uniform(self.num_classes) if self.log_prior is None else persons.Persons(self.log_prior)
        if self.person_answer is not None and self.features:
            votes = self.person_answer(dim_zero_cat(self.features), author).float()
        else:
            votes = persons.logits(log_probs, author, rule.log_prior.to(log_probs.device))
        author_labels = persons.labels_of(labels, author, self.num_classes)
        scores = ClassificationScores(self.num_classes, "author/").to(votes.device)
        scores.update(votes.argmax(-1), author_labels)
        values = {**scores.compute(), "author/count": torch.tensor(float(n_authors), device=votes.device)}
        if self.majority_class is not None:
            values["majority_acc"] = (labels == self.majority_class).float().mean()
            values["author/majority_acc"] = (author_labels == self.majority_class).float().mean()
        return values


class EvalMetrics(torch.nn.Module):
    """All that one evaluation stage logs, for one or several heads.

    Per head: loss, post-level metrics, calibration error (``ece``), author-level metrics and majority
    baselines (see `set_majority`). With one head
    the names are plain (``mcc``, ``author/mcc``); with several they are per head (``J-P/mcc``) plus
    their mean under the plain name, so ``val/mcc`` is always the number that picks checkpoints.
    ``type_acc`` (all four letters right) is there with the four axes' heads.
    """

    def __init__(self, heads: dict[str, tuple[str, ...]]) -> None:
        super().__init__()
        self.heads = heads
        self.loss = _mean()
        self.posts = torch.nn.ModuleDict({head: ClassificationScores(len(c), "") for head, c in heads.items()})
        self.calibration = torch.nn.ModuleDict({head: calibration_error(len(c)) for head, c in heads.items()})
        self.authors = torch.nn.ModuleDict({head: AuthorMetrics(len(c)) for head, c in heads.items()})
        self.type_acc = _mean() if len(heads) == 4 else None  # one 16-way head: `acc` is the type's

    def update(
        self,
        logits: list[torch.Tensor],
        labels: torch.Tensor,
        loss: torch.Tensor,
        loss_weight: torch.Tensor,
        authors: torch.Tensor,
        features: torch.Tensor | None = None,
    ) -> None:
        """Per-head (batch, classes) logits, (batch, heads) labels, per-row loss and its weight, author ids; the
        (batch, features) a person head reads, where the model has one."""
        self.loss.update(loss, loss_weight)
        right = torch.ones_like(labels[:, 0], dtype=torch.bool)
        for (head, posts), head_logits, head_labels in zip(self.posts.items(), logits, labels.T):
            posts.update(head_logits.argmax(-1), head_labels)
            self.calibration[head].update(head_logits.float().softmax(-1), head_labels)
            self.authors[head].update(head_logits, head_labels, authors, features)
            right &= head_logits.argmax(-1) == head_labels
        if self.type_acc is not None:
            self.type_acc.update(right.float())

    def compute(self) -> dict[str, torch.Tensor]:
        per_head = {
            head: {
                **self.posts[head].compute(),
                "ece": self.calibration[head].compute(),
                **self.authors[head].compute(),
            }
            for head in self.heads
        }
        if len(per_head) == 1:
            (values,) = per_head.values()
        else:
            values = {f"{head}/{name}": v for head, head_values in per_head.items() for name, v in head_values.items()}
            first = next(iter(per_head.values()))
            values |= {name: torch.stack([h[name] for h in per_head.values()]).mean() for name in first}
        values["loss"] = self.loss.compute()
        if self.type_acc is not None:
            values["type_acc"] = self.type_acc.compute()
        return values

    def set_majority(self, classes: list[int]) -> None:
        """The training split's most common class of each head, which the majority baseline answers."""
        for metric, majority in zip(self.authors.values(), classes):
            metric.majority_class = majority

    def set_priors(self, log_priors: list[torch.Tensor]) -> None:
        """The log prior each head's scores carry (`persons.trained_prior`), for the author-level answers."""
        for metric, prior in zip(self.authors.values(), log_priors):
            metric.log_prior = prior

    def set_person_answers(self, answers: dict[str, Callable | None]) -> None:
        """Per head, the person head's answer (see `AuthorMetrics.person_answer`) where it answers for persons."""
        for head, answer in answers.items():
            self.authors[head].person_answer = answer

    def reset(self) -> None:
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()


def confusion(labels: np.ndarray, preds: np.ndarray, groups: np.ndarray, k: int, weights=None) -> np.ndarray:
    """(groups, k, k) counts of [true class, predicted class] per group (a person, or a row); `weights` per row
    (default 1) make it a weighted count."""
    n = int(groups.max()) + 1 if len(groups) else 0
    flat = (groups * k + labels) * k + preds
    return np.bincount(flat, weights=weights, minlength=n * k * k).reshape(n, k, k)


def confusion_metrics(conf: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro-F1 and MCC of (..., k, k) [true, predicted] counts, over the leading
    dimensions at once (the bootstrap's resamples). Balanced accuracy and macro-F1 average over the classes
    present in the labels (and, for F1, the predictions), as scikit-learn does; MCC is 0 when the labels or
    the predictions are one class."""
    conf = np.asarray(conf, dtype=np.float64)
    hits = np.diagonal(conf, axis1=-2, axis2=-1)
    true, pred = conf.sum(-1), conf.sum(-2)
    total = true.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(true > 0, hits / true, np.nan)
        f1 = np.where(true + pred > 0, 2 * hits / (true + pred), np.nan)
        covariance = hits.sum(-1) * total - (true * pred).sum(-1)
        scale = np.sqrt((total**2 - (pred**2).sum(-1)) * (total**2 - (true**2).sum(-1)))
        return {
            "acc": hits.sum(-1) / total,
            "bal_acc": np.nanmean(recall, -1),
            "macro_f1": np.nanmean(f1, -1),
            "mcc": np.where(scale > 0, covariance / np.where(scale > 0, scale, 1), 0.0),
        }
