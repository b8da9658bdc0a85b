"""`mbti-lightning report`: the figures a user can publish, on the test split.

Per head, on the test rows (never the rows that chose the checkpoint or fitted the calibration):
accuracy, balanced accuracy, macro-F1 and MCC per post and per person, each with a 95% bootstrap
interval that resamples persons, for the model, the TF-IDF baseline and the majority class, with the
paired differences model - baseline; the four-axis average of macro-F1 per person (the figure
published results report); how much text a person needs; accuracy against coverage; calibration
fitted on validation and measured on test; and a leak audit of the baseline's strongest n-grams.
Writes ``report.md``, ``report.json`` and the plots into one folder (docs/evaluation.md explains
every figure).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mbti_lightning import baseline, evaluation, loading, person_head, plots
from mbti_lightning import persons as person_rules
from mbti_lightning.cache import atomic_folder
from mbti_lightning.errors import UserError
from mbti_lightning.labels import AXES
from mbti_lightning.loading import Loaded
from mbti_lightning.masking import is_type_vocabulary
from mbti_lightning.metrics import confusion, confusion_metrics

TEMPLATE = Path(__file__).parent / "templates" / "report.md"
#: How many posts of each person the how-much-text curve uses (None: all of them).
POSTS = (1, 2, 5, 10, 25, None)
COVERAGES = (1.0, 0.75, 0.5, 0.25)
#: How many of the baseline's strongest n-grams per class the leak audit lists.
TOP_FEATURES = 20


def how_much_text(
    log_probs: dict[str, np.ndarray],
    labels: np.ndarray,
    persons: np.ndarray,
    k: int,
    draws: int,
    resamples: int,
    priors: dict[str, torch.Tensor],
) -> list[dict]:
    """Per number of posts n in `POSTS`: per-person accuracy and macro-F1 (with intervals) when each person's
    answer uses n of their posts drawn at random (all if they have fewer; the evidence added up with each
    system's prior in `priors`, see `persons`), averaged over `draws` draws: the confusion counts of the draws
    are averaged per person, then resampled by person as everywhere."""
    rng = np.random.default_rng(0)
    truth = person_rules.labels_of(labels, persons, k).numpy()
    people = np.arange(len(truth))
    out = []
    for n in POSTS:
        counts = {name: np.zeros((len(truth), k, k)) for name in log_probs}
        for _ in range(draws if n else 1):
            # Each post's rank among its person's posts in a random order; keep ranks below n.
            order = np.lexsort((rng.random(len(persons)), persons))
            starts = np.searchsorted(persons[order], persons[order])
            rank = np.empty(len(persons), dtype=np.int64)
            rank[order] = np.arange(len(persons)) - starts
            keep = rank < n if n else np.ones(len(persons), dtype=bool)
            for name, lp in log_probs.items():
                votes = person_rules.votes(lp[keep], persons[keep], priors[name])
                counts[name] += confusion(truth, votes, people, k) / (draws if n else 1)
        scores = evaluation.scored(counts, resamples, seed=0)
        out.append(
            {"posts": n or "all"}
            | {name: {key: scores[name][key] for key in ("acc", "macro_f1")} for name in log_probs}
        )
    return out


def coverage_curve(logits: torch.Tensor, labels: np.ndarray) -> dict:
    """Accuracy of the most confident answers when the least confident are withheld: at every coverage (share of
    rows answered, from the most confident) and at `COVERAGES`."""
    confidence, predicted = logits.softmax(-1).max(-1)
    order = confidence.argsort(descending=True).numpy()
    right = (predicted.numpy() == labels)[order]
    accuracy = np.cumsum(right) / np.arange(1, len(right) + 1)
    coverage = np.arange(1, len(right) + 1) / len(right)
    at = {f"{c:.0%}": float(accuracy[max(0, int(np.ceil(c * len(right))) - 1)]) for c in COVERAGES}
    return {"coverage": coverage, "accuracy": accuracy, "at": at}


def leak_audit(fitted: baseline.Baseline | None, heads: dict, dm) -> dict:
    """The baseline's strongest n-grams per class, those that are type vocabulary flagged, and how many test rows
    the type-mention masking changed (None when masking is off)."""
    test = dm.splits["test"]
    masked = int(np.count_nonzero(test["mentions"][:])) if "mentions" in test.column_names else None
    if fitted is None:
        return {"masked_rows": masked, "rows": len(test), "features": None, "flagged": []}
    features = fitted.top_features(heads, TOP_FEATURES)
    flagged = [
        {"head": head, "class": letter, "ngram": ngram, "weight": weight}
        for head, classes in features.items()
        for letter, top in classes.items()
        for ngram, weight in top
        if is_type_vocabulary(ngram)
    ]
    return {"masked_rows": masked, "rows": len(test), "features": features, "flagged": flagged}


def axis_average(people: dict[str, dict[str, np.ndarray]], resamples: int) -> dict:
    """The mean over the four axes of per-person macro-F1, per system and as model - baseline, with intervals:
    the persons are resampled once for all four axes."""
    names = list(next(iter(people.values())))
    stacked = {name: np.stack([people[axis][name] for axis in AXES], 1) for name in names}  # (persons, 4, 2, 2)
    flat = tuple(s.reshape(len(s), -1) for s in stacked.values())

    def mean_f1(*xs: np.ndarray, axis: int = -1) -> np.ndarray:
        per = [confusion_metrics(evaluation.summed(x, (4, 2, 2)))["macro_f1"].mean(-1) for x in xs]
        return np.stack(per + [per[0] - p for p in per[1:]])

    point = mean_f1(*(f.T[:, None, :] for f in flat))[:, 0]  # scipy's layout: (features, batch, persons)
    low, high = evaluation.bootstrap(flat, mean_f1, resamples, seed=0)
    labels = names + [f"model - {name}" for name in names[1:]]
    return {
        label: {"value": float(point[i]), "interval": (float(low[i]), float(high[i]))} for i, label in enumerate(labels)
    }


def check_out(out: Path) -> None:
    """A `UserError` where folder `out` holds anything but an earlier report: the report replaces it whole."""
    if out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise UserError(f"--out {out} is the working folder or holds it; give the report a folder of its own")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise UserError(f"--out {out} holds other files than a report; give the report a folder of its own")


def build(
    loaded: Loaded,
    dm,
    out: Path,
    resamples: int = 1000,
    draws: int = 10,
    calibrate: bool = True,
    trained=None,
) -> dict:
    """Every figure of the report for the `loaded` model on `dm`'s test split, written to `out` whole (a stop or a
    failure leaves the earlier report, or none). A checkpoint's scores are calibrated on validation first, as the
    export does, unless not `calibrate`; an export's are reported as they are (calibrated at export, or not).
    `trained`: the data module of the corpus the model was trained on, where `dm` holds another
    (`loading.other_corpus`): its validation split calibrates, its training split fits the baseline."""
    check_out(out)
    with atomic_folder(out) as folder:
        report = _build(loaded, dm, folder, resamples, draws, calibrate, trained or dm)
    rank_zero_info(f"report written to {out / 'report.md'}")
    return report


def _build(loaded: Loaded, dm, out: Path, resamples: int, draws: int, calibrate: bool, trained) -> dict:
    dm.setup("test")
    dm.test_dataloader()  # a clear error, naming the fix for the split in use, when there is no test split
    model, heads = loaded.model, loaded.model.heads
    fit = calibrate and loaded.checkpoint is not None
    carried = fit and evaluation.needs_inputs(model)  # calibration offsets carried on the head's inputs
    inputs = carried or model.person_head is not None  # the person head reads them: the posts' features
    test = evaluation.split_outputs(model, dm, "test", inputs)
    # A checkpoint's validation split fits the calibration and the temperature for persons; an export brings both.
    val = evaluation.split_outputs(model, trained, "validation", inputs) if loaded.checkpoint is not None else None
    if fit:
        fitted = evaluation.calibrate(val if carried else dataclasses.replace(val, inputs=None), fit=True)
        calibrated = test.under(fitted).logits
        note = "fitted on the validation split by this report, as mbti-lightning-export does"
    else:
        fitted, calibrated = None, test.logits
        note = (
            loaded.calibration_note
            if loaded.checkpoint is None
            else "none: the checkpoint's raw scores (calibrate false)"
        )
    rules = model.persons if val is None else evaluation.persons_for(model.persons, val, fitted)
    priors = {head: rule.log_prior for head, rule in rules.items()}
    rows = len(test.labels)
    others, fitted_baseline = evaluation.comparisons(dm, "test", trained)
    if fitted_baseline is None:
        rank_zero_warn('the report\'s baseline needs scikit-learn: pip install "mbti-lightning[baseline]"')
    # The model as exported: calibrated (a class offset can move a letter), so these are the card's figures.
    exported = evaluation.SplitOutputs(calibrated, test.labels, test.persons)
    direct = person_head.person_systems(model, test)
    answers = person_head.answers(model)
    figures = evaluation.figures(heads, exported, others, resamples, priors=priors, person_systems=direct)

    out.mkdir(parents=True, exist_ok=True)
    several = "people" in next(iter(figures.values()))
    systems = ["model", *(["baseline"] if fitted_baseline else [])]
    curves, coverage = {}, {}
    for h, (head, classes) in enumerate(heads.items()):
        # The curve adds up posts: the model's answer, unless its person head answers for persons.
        summed = "model" if answers[head] != person_head.PERSON_HEAD else person_head.SUMMED
        log_probs = {summed: calibrated[head].log_softmax(-1).numpy()}
        if fitted_baseline:
            log_probs["baseline"] = others["baseline"][h]
        if several:
            uniform = person_rules.Persons.uniform(len(classes)).log_prior
            system_priors = {summed: priors[head], "baseline": uniform}
            curves[head] = how_much_text(
                log_probs, test.labels[:, h], test.persons, len(classes), draws, resamples, system_priors
            )
        coverage[head] = coverage_curve(calibrated[head], test.labels[:, h])
        plots.confusion_plot(
            calibrated[head],
            test.labels[:, h],
            list(classes),
            f"Test confusion matrix, {head}",
            out / f"confusion_{head}.png",
        )
    if curves:
        plots.how_much_text_plot(curves, out / "how_much_text.png")
    plots.coverage_plot(coverage, out / "coverage.png")
    reliability = {
        head: (torch.as_tensor(test.labels[:, h]), *([test.logits[head]] if fitted else []), calibrated[head])
        for h, head in enumerate(heads)
    }
    plots.reliability_plot(reliability, out / "reliability_test.png")

    average = None
    if several and list(heads) == list(AXES):
        people = {}
        for h, head in enumerate(heads):
            k = len(heads[head])
            people[head] = {}
            for name in systems + ["majority"]:
                lp = calibrated[head].log_softmax(-1).numpy() if name == "model" else others[name][h]
                prior = priors[head] if name == "model" else None
                votes, truth = evaluation.person_votes(lp, test.labels[:, h], test.persons, prior)
                votes = direct.get(head, {}).get(name, votes)  # the person head's, where it is the model's answer
                people[head][name] = confusion(truth, votes, np.arange(len(votes)), k)
        average = axis_average(people, resamples)

    audit = leak_audit(fitted_baseline, heads, dm)
    for flag in audit["flagged"]:
        rank_zero_warn(
            f"leak audit: the baseline's n-gram {flag['ngram']!r} is type vocabulary and among the {TOP_FEATURES} "
            f"strongest for {flag['class']} ({flag['head']}); the text may give the label away"
        )
    report = {
        "split": "test",
        "rows": rows,
        "persons": int(test.persons.max()) + 1,
        "resamples": resamples,
        "interval": f"{evaluation.LEVEL:.0%} percentile bootstrap, resampling persons",
        "heads": {
            head: {
                "figures": figures[head],
                "how_much_text": curves.get(head),
                "coverage": coverage[head]["at"],
                "calibration": evaluation.calibration_figures(
                    {head: fitted[head] if fitted else None},
                    {head: test.logits[head]},
                    {head: calibrated[head]},
                    test.labels[:, [h]],
                    heads,
                )[head],
                "person_calibration": evaluation.person_calibration(
                    rules[head], calibrated[head].log_softmax(-1), test.labels[:, h], test.persons
                )
                if several and answers[head] != person_head.PERSON_HEAD
                else None,
                "person_answer": (model.person_decision or {}).get(head, {}) if model.person_head is not None else None,
            }
            for h, head in enumerate(heads)
        },
        "axis_average_macro_f1_per_person": average,
        "leak_audit": audit,
        "model": loaded.name,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "chosen_by": loaded.chosen_by,
        "calibration": note,
        "data": {key: value for key, value in dm.hparams.items() if not key.startswith("_")},
        "other_corpus": {key: {"trained": a, "scored": b} for key, (a, b) in loading.other_corpus(loaded, dm).items()}
        or None,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _render(report, heads, out)
    return report


def _render(report: dict, heads: dict, out: Path) -> None:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATE.parent), undefined=StrictUndefined, trim_blocks=True)
    env.filters["ci"] = lambda f: f"{f['value']:.3f} [{f['interval'][0]:.3f}, {f['interval'][1]:.3f}]"
    text = env.get_template(TEMPLATE.name).render(
        report=report,
        heads=heads,
        metrics=evaluation.METRICS,
        posts_plot=(out / "how_much_text.png").exists(),
        data=yaml.safe_dump(report["data"], sort_keys=False).strip(),
    )
    (out / "report.md").write_text(text)
