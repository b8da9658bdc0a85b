"""Scoring a model on a split, once, for the export's card and the report alike.

`split_outputs` runs a model over a split; `figures` turns the outputs into every headline figure
(accuracy, balanced accuracy, macro-F1 and MCC per post and per person, each with a 95% bootstrap
interval that resamples persons) for the model, the TF-IDF baseline and the majority class, with the
paired differences; `calibrate` and `calibration_figures` fit calibration on one split and measure it
on another. Persons are the split's authors; without authors every row is its own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from mbti_lightning import baseline, calibration, folding
from mbti_lightning import persons as person_rules
from mbti_lightning.errors import UserError
from mbti_lightning.metrics import confusion, confusion_metrics

#: The headline metrics: key -> (name in tables, the Hub's metric type).
METRICS = {
    "acc": ("accuracy", "accuracy"),
    "bal_acc": ("balanced accuracy", "balanced_accuracy"),
    "macro_f1": ("macro-F1", "f1"),
    "mcc": ("MCC", "matthews_correlation"),
}
LEVEL = 0.95
#: What a person's answer is called where it adds up the evidence of the model's posts beside a person head's.
SUMMED = "summed posts"


@dataclass
class SplitOutputs:
    """A model's outputs on a split, in the split's row order."""

    logits: dict[str, torch.Tensor]  # per head (rows, classes), fp32
    labels: np.ndarray  # (rows, heads) class ids
    persons: np.ndarray  # (rows,) person numbers 0..n-1: the authors, else one per row
    inputs: torch.Tensor | None = None  # (rows, features) the classification head's inputs, where asked for

    def calibrated(self, head: str, cal: calibration.Calibration) -> torch.Tensor:
        """`head`'s logits under `cal`."""
        return cal(self.logits[head], None if cal.carrier is None else self.inputs @ cal.carrier)

    def under(self, fitted: dict[str, calibration.Calibration], invert: bool = False) -> SplitOutputs:
        """These outputs with every head's logits calibrated by `fitted` (with `invert`: uncalibrated, raw scores
        from calibrated ones), as fp32."""
        logits = {}
        for head, x in self.logits.items():
            cal = fitted[head]
            carried = None if cal.carrier is None else self.inputs @ cal.carrier
            logits[head] = (cal.invert(x, carried) if invert else cal(x, carried)).float()
        return SplitOutputs(logits, self.labels, self.persons, self.inputs)


def split_outputs(model, dm, split: str, inputs: bool = False) -> SplitOutputs:
    """`model` (an `MBTIClassifier`) over `dm`'s split `split`, through its forward pass (what `pipeline` runs);
    with `inputs`, with its classification head's inputs too."""
    trainer = L.Trainer(
        accelerator="auto", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False
    )
    loader = dm.val_dataloader() if split == "validation" else dm.test_dataloader()
    with folding.head_inputs(model.model) if inputs else contextlib.nullcontext() as collected:
        outputs = trainer.predict(model, dataloaders=loader)
    order = torch.cat([o["row"] for o in outputs]).cpu().argsort()
    logits = {head: torch.cat([o["logits"][head] for o in outputs]).float().cpu()[order] for head in model.heads}
    part = dm.splits[split]
    labels = np.asarray(part["labels"][:]).reshape(len(part), -1)
    persons = np.unique(np.asarray(part["author"][:]), return_inverse=True)[1]
    return SplitOutputs(logits, labels, persons, torch.cat(collected)[order] if inputs else None)


def majority_log_probs(counts: list[torch.Tensor], rows: int) -> list[np.ndarray]:
    """Per head, the training split's most common class as (rows, classes) log-probabilities (0 and -inf)."""
    return [np.where(np.arange(len(c)) == int(c.argmax()), 0.0, -np.inf)[None].repeat(rows, 0) for c in counts]


def comparisons(dm, split: str, trained=None) -> tuple[dict[str, list[np.ndarray]], baseline.Baseline | None]:
    """What a model is compared with on `dm`'s `split`, as `figures` takes them (per head (rows, classes)
    log-probabilities): the TF-IDF baseline fitted on the training split of `trained` (default `dm`; the corpus the
    model was trained on, where `dm` is another), where scikit-learn is installed (also returned, fitted), and
    `trained`'s majority class."""
    trained = trained or dm
    rows = len(dm.splits[split])
    others = {"majority": majority_log_probs(trained.train_label_counts(), rows)}
    if not baseline.available():
        return others, None
    fitted = baseline.fit(trained)
    return {"baseline": fitted.log_probs(dm, split)} | others, fitted


def person_votes(
    log_probs: np.ndarray, labels: np.ndarray, persons: np.ndarray, log_prior: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per person: the class their posts' evidence adds up to, the `log_prior` of the scores counting once
    (`mbti_lightning.persons`; uniform if None), and their label, the most common label of their posts; as
    ``val/author/*`` and ``predict --predictions.per author`` decide."""
    k = log_probs.shape[1]
    prior = person_rules.Persons.uniform(k).log_prior if log_prior is None else log_prior
    return person_rules.votes(log_probs, persons, prior), person_rules.labels_of(labels, persons, k).numpy()


def summed(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """scipy's resampled (features, batch, persons) per-person counts -> (batch, *shape) sums over the persons."""
    return np.moveaxis(x.sum(-1), 0, -1).reshape(*x.shape[1:-1], *shape)


def bootstrap(samples: tuple[np.ndarray, ...], statistic, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The `LEVEL` percentile interval of a vectorized `statistic` (returning one row per figure) over bootstrap
    resamples of the persons: the first axis of each of `samples`, drawn together (paired). Percentile intervals
    keep the cost at one pass over the resamples."""
    if len(samples[0]) < 2:
        raise UserError(
            f"the split scored has {len(samples[0])} person: an interval that resamples persons needs two or more "
            "(give the split more persons: data.test_fraction, data.val_fraction, or more data)"
        )
    batch = max(1, int(2e7 // (samples[0].size * len(samples))))  # bounds the memory of one batch of resamples
    result = stats.bootstrap(
        samples,
        statistic,
        axis=0,
        vectorized=True,
        paired=True,
        n_resamples=resamples,
        batch=batch,
        method="percentile",
        confidence_level=LEVEL,
        rng=np.random.default_rng(seed),
    )
    return result.confidence_interval


def scored(confusions: dict[str, np.ndarray], resamples: int, seed: int) -> dict[str, dict]:
    """Every metric of each system's (persons, k, k) confusion counts, and each system's paired difference from
    the first ("model"), each with its interval (`bootstrap`): one resampling for all of them, so the
    differences are of the same resamples."""
    names, k = list(confusions), next(iter(confusions.values())).shape[-1]
    flat = tuple(c.reshape(len(c), -1) for c in confusions.values())

    def values(*systems: np.ndarray) -> np.ndarray:  # each (..., k, k) -> (figures, ...)
        m = [confusion_metrics(c) for c in systems]
        return np.stack(
            [m[i][key] for i in range(len(m)) for key in METRICS]
            + [m[0][key] - m[i][key] for i in range(1, len(m)) for key in METRICS]
        )

    point = values(*(c.sum(0).reshape(k, k) for c in flat))
    low, high = bootstrap(flat, lambda *xs, axis=-1: values(*(summed(x, (k, k)) for x in xs)), resamples, seed)
    labels = [*names, *(f"model - {name}" for name in names[1:])]
    out: dict[str, dict] = {}
    for i, (label, key) in enumerate((label, key) for label in labels for key in METRICS):
        out.setdefault(label, {})[key] = {"value": float(point[i]), "interval": (float(low[i]), float(high[i]))}
    return out


def figures(
    heads: dict,
    outputs: SplitOutputs,
    others: dict[str, list[np.ndarray]],
    resamples: int = 1000,
    seed: int = 0,
    priors: dict[str, torch.Tensor] | None = None,
    person_systems: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, dict]:
    """Per head, per post and (with several posts to a person) per person: `scored` figures of the model and of
    each system in `others` (name -> per head (rows, classes) log-probabilities, e.g. the baseline's; a
    constant answer such as the majority class is a one-hot row), on the same rows and resamples. A person's
    answer adds up their posts' evidence (`person_votes`), the model's scores carrying `priors` per head (the
    others, class-balanced or constant, a uniform one). `person_systems` per head: systems that answer for a
    person directly, name -> (persons,) class ids (`person_head.person_systems`); one named "model" is the model's
    answer, and the evidence of its posts added up is then named `person_head.SUMMED`."""
    persons = outputs.persons
    several = len(np.unique(persons)) < len(persons)
    out = {}
    for h, (head, classes) in enumerate(heads.items()):
        k, labels = len(classes), outputs.labels[:, h]
        systems = {"model": outputs.logits[head].log_softmax(-1).numpy()} | {n: lp[h] for n, lp in others.items()}
        posts = {name: confusion(labels, lp.argmax(1), persons, k) for name, lp in systems.items()}
        out[head] = {"posts": scored(posts, resamples, seed), "rows": len(labels), "persons": int(persons.max()) + 1}
        if several:
            people = {}
            for name, lp in systems.items():
                prior = priors.get(head) if priors and name == "model" else None
                votes, truth = person_votes(lp, labels, persons, prior)
                people[name] = confusion(truth, votes, np.arange(len(votes)), k)
            direct = {
                name: confusion(truth, v, np.arange(len(v)), k)
                for name, v in (person_systems or {}).get(head, {}).items()
            }
            if "model" in direct:
                people = {"model": direct.pop("model"), SUMMED: people.pop("model")} | people
            out[head]["people"] = scored(people | direct, resamples, seed)
    return out


def persons_for(rules: dict, val: SplitOutputs, fitted: dict | None) -> dict:
    """Per head, how the scores as reported make a person's answer: the model's `rules` (`MBTIClassifier.persons`)
    with their prior passed through the `fitted` calibration (if any), and a temperature for persons fitted on
    `val`'s persons scored the same way, where there are enough (`persons.fit`)."""
    out = {}
    for h, (head, rule) in enumerate(rules.items()):
        cal = fitted[head] if fitted else None
        prior = rule.log_prior if cal is None else person_rules.calibrated_prior(rule.log_prior, cal)
        scores = val.logits[head] if cal is None else val.calibrated(head, cal)
        out[head] = person_rules.fit(scores.float().log_softmax(-1), val.labels[:, h], val.persons, prior)
    return out


def person_calibration(rule, log_probs: torch.Tensor, labels: np.ndarray, persons: np.ndarray) -> dict:
    """How well a person's probability (`rule`: `persons.Persons`) is calibrated on a split's persons: ECE of the
    top class over persons, and whether the rule was fitted for persons at all."""
    index = torch.as_tensor(persons)
    k = log_probs.shape[-1]
    truth = person_rules.labels_of(labels, persons, k)
    person_log_probs = rule.log_probs(log_probs, index)
    return {
        "temperature": rule.temperature,
        "calibrated": rule.calibrated,
        "persons": len(truth),
        "ece": calibration.ece(person_log_probs, truth),
    }


def needs_inputs(model) -> bool:
    """Whether calibrating `model` needs its head's inputs: a head without a bias carries its offsets on them."""
    return folding.classification_head(model.model).bias is None


#: What calibration can keep, fullest first: a temperature and class offsets, a temperature alone, nothing.
LEVELS = ("temperature and offsets", "temperature", "none")
#: Bootstrap resamples of the held-out check.
CHECK_RESAMPLES = 200


def _fit_level(level: str, x: torch.Tensor, y: torch.Tensor, head: str, carrier) -> calibration.Calibration:
    if level == "none":
        return calibration.Calibration()
    return calibration.fit(x, y, offsets=level == LEVELS[0], name=head, carrier=carrier)


def _held_out(level: str, x: torch.Tensor, y: torch.Tensor, fold: np.ndarray, head: str, inputs, carrier_vector):
    """`x` calibrated at `level` with each fold's calibration fitted on the other fold: scores on rows it never saw."""
    out = torch.empty_like(x, dtype=torch.float64)
    for f in (0, 1):
        fit_rows, rows = torch.as_tensor(fold != f), torch.as_tensor(fold == f)
        carrier = None if inputs is None else (carrier_vector, inputs[fit_rows])
        cal = _fit_level(level, x[fit_rows], y[fit_rows], head, carrier)
        out[rows] = cal(x[rows], None if inputs is None else inputs[rows] @ carrier_vector)
    return out


def calibrate(outputs: SplitOutputs, fit: bool, seed: int = 0) -> dict:
    """Per head, the calibration fitted on `outputs` (the validation split; none unless `fit`), decided on rows it
    was not fitted on: the validation persons are split in two, each half calibrated by a fit on the other, and a
    level (`LEVELS`) is kept only where, on those held-out rows, it lowers the NLL and does not lower MCC or
    balanced accuracy (the 95% interval of the paired difference, resampling persons, lies below 0). The level
    kept is then fitted on every validation row; `Calibration.decision` says what was kept and why. The offsets
    are held by the head's bias or, without one, carried on its inputs (`outputs.inputs`): the carrier is fitted
    to make ``c . h`` close to 1, without the labels, so it cannot fit them."""
    if not fit:
        why = {"kept": "none", "why": "not asked for (--no-calibrate)"}
        return {head: calibration.Calibration(decision=why) for head in outputs.logits}
    inputs = outputs.inputs
    vector = None if inputs is None else calibration.fit_carrier(inputs)  # one for every head
    n = int(outputs.persons.max()) + 1
    fold = (np.random.default_rng(seed).permutation(n) % 2)[outputs.persons]
    out = {}
    for h, (head, x) in enumerate(outputs.logits.items()):
        y = torch.as_tensor(outputs.labels[:, h])
        k = x.shape[-1]
        if min(np.bincount(fold, minlength=2)) == 0 or len(np.unique(outputs.persons)) < 4:
            level, checks = LEVELS[1], None
            why = "too few validation persons to check on held-out rows: a temperature only"
        else:
            held = {level: _held_out(level, x.double(), y, fold, head, inputs, vector) for level in LEVELS}
            confusions = {
                level: confusion(outputs.labels[:, h], held[level].argmax(-1).numpy(), outputs.persons, k)
                for level in LEVELS
            }
            checks = {}
            for level in LEVELS[:-1]:
                scores = scored({"model": confusions[level], "none": confusions["none"]}, CHECK_RESAMPLES, seed)
                difference = scores["model - none"]
                checks[level] = {
                    "nll": float(F.cross_entropy(held[level], y)),
                    **{key: scores["model"][key]["value"] for key in ("mcc", "bal_acc")},
                    "lowers": [key for key in ("mcc", "bal_acc") if difference[key]["interval"][1] < 0],
                }
            checks["none"] = {
                "nll": float(F.cross_entropy(held["none"], y)),
                **{
                    key: v["value"]
                    for key, v in scored({"model": confusions["none"]}, 1, seed)["model"].items()
                    if key in ("mcc", "bal_acc")
                },
            }
            level = next(
                (
                    level
                    for level in LEVELS[:-1]
                    if checks[level]["nll"] < checks["none"]["nll"] and not checks[level]["lowers"]
                ),
                "none",
            )
            rejected = [
                f"{name} ({'lowered ' + ' and '.join(c['lowers']) if c['lowers'] else 'did not lower the NLL'})"
                for name, c in checks.items()
                if name != "none" and LEVELS.index(name) < LEVELS.index(level)
            ]
            why = (
                "on held-out validation persons, "
                + (f"not {', '.join(rejected)}; " if rejected else "")
                + f"kept: {level}"
            )
        carrier = None if inputs is None else (vector, inputs)
        cal = _fit_level(level, x, y, head, carrier)
        kept = level if cal != calibration.Calibration() else "none"
        decision = {"kept": kept, "why": why, "held_out": checks}
        out[head] = calibration.Calibration(cal.temperature, cal.offsets, cal.carrier, decision)
    return out


def calibration_figures(
    fitted: dict, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], labels: np.ndarray, heads: dict
) -> dict[str, dict]:
    """Per head: what was fitted, and ECE, NLL and the largest class-share gap of the scores `before` calibration
    and `after` it, on the rows of `labels`; for a head whose calibration is None (nothing fitted here), those of
    the scores `after` alone."""
    out = {}
    for h, (head, cal) in enumerate(fitted.items()):
        y = torch.as_tensor(labels[:, h])
        out[head] = {"fitted": cal is not None}
        if cal is not None:
            out[head] |= {
                "temperature": cal.temperature,
                "offsets": dict(zip(heads[head], cal.offsets)) or None,
                "carried": cal.carrier is not None,
                "decision": cal.decision,
            }
        for when, x in (
            (("before", before[head]), ("after", after[head])) if cal is not None else (("after", after[head]),)
        ):
            out[head] |= {
                f"ece_{when}": calibration.ece(x, y),
                f"nll_{when}": calibration.nll(x, y),
                f"gap_{when}": calibration.prior_gap(x, y),
            }
    return out
