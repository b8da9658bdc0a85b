"""A classic baseline on the model's own split: TF-IDF (word 1-2 grams) + class-balanced logistic regression.

On short Reddit comments this is hard to beat with a small model, so a fine-tuned model's number
means little without it. It is fitted on exactly the training rows the model sees, as the model sees
them (type mentions masked, truncated to `data.max_length` tokens: the texts are decoded from the
cached token ids, a batch at a time), at most `MAX_TRAIN_ROWS` of them, and scored on the same validation and test rows with the same metrics.
Needs scikit-learn (``pip install "mbti-lightning[baseline]"``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from mbti_lightning.data.tokenized import decode

NAME = "TF-IDF + logistic regression"
#: At most this many training rows are fitted on (a random subset, named in the log and the card): on the full
#: data set (2.3M posts) the features and the fit would take gigabytes and many minutes for a reference figure.
MAX_TRAIN_ROWS = 200_000


def available() -> bool:
    return importlib.util.find_spec("sklearn") is not None


def split_labels(dm, split: str) -> np.ndarray:
    """(rows, heads) class ids of a tokenized split."""
    return np.asarray(dm.splits[split]["labels"][:]).reshape(len(dm.splits[split]), -1)


@dataclass
class Baseline:
    """The fitted vectorizer and one logistic regression per head."""

    vectorizer: Any
    models: list

    def log_probs(self, dm, split: str) -> list[np.ndarray]:
        """Per head, the (rows, classes) log-probabilities of a split's rows."""
        x = self.vectorizer.transform(decode(dm.splits[split], dm.tokenizer))
        return [model.predict_log_proba(x) for model in self.models]

    def top_features(self, heads: dict, n: int) -> dict[str, dict[str, list[tuple[str, float]]]]:
        """Per head and class, the `n` n-grams that weigh most towards it, with their weights. (A binary model has
        one weight per n-gram: positive towards the second class, negative towards the first.)"""
        names = self.vectorizer.get_feature_names_out()
        out = {}
        for (head, classes), model in zip(heads.items(), self.models):
            coef = model.coef_
            if len(classes) == 2:
                coef = np.stack([-coef[0], coef[0]])
            out[head] = {
                letter: [(str(names[i]), float(row[i])) for i in np.argsort(-row)[:n]]
                for letter, row in zip(classes, coef)
            }
        return out


def fit(dm) -> Baseline:
    """Fit one classifier per head on `dm`'s training split (a random `MAX_TRAIN_ROWS` of it beyond that size)."""
    if not available():
        raise ImportError('the baseline needs scikit-learn: pip install "mbti-lightning[baseline]"')
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    n = len(dm.splits["train"])
    rows = None
    if n > MAX_TRAIN_ROWS:
        rows = np.sort(np.random.default_rng(0).choice(n, MAX_TRAIN_ROWS, replace=False))
        rank_zero_info(f"{NAME}: fitted on a random {MAX_TRAIN_ROWS:,} of the {n:,} training rows")
    # min_df 2 keeps a large corpus's vocabulary (and memory) in bounds; a tiny one needs every word.
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2 if n > 1000 else 1)
    features = vectorizer.fit_transform(decode(dm.splits["train"], dm.tokenizer, rows))
    labels = split_labels(dm, "train")[slice(None) if rows is None else rows]
    models = [
        LogisticRegression(class_weight="balanced", max_iter=1000).fit(features, labels[:, h])
        for h in range(labels.shape[1])
    ]
    return Baseline(vectorizer, models)


def fit_predict(dm, splits: tuple[str, ...]) -> dict[str, np.ndarray]:
    """(rows, heads) predicted class ids of the baseline (see `fit`) per split in `splits` that `dm` has."""
    fitted = fit(dm)
    return {
        split: np.stack([lp.argmax(-1) for lp in fitted.log_probs(dm, split)], 1)
        for split in splits
        if split in dm.splits
    }


def log_keys(stage: str, scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{stage}/baseline/{metric}``; with several heads also per head (``val/baseline/J-P/mcc``), the plain
    name being their mean, as the model's metrics are logged."""
    if len(scores) == 1:
        (values,) = scores.values()
        return {f"{stage}/baseline/{name}": v for name, v in values.items()}
    out = {f"{stage}/baseline/{head}/{name}": v for head, values in scores.items() for name, v in values.items()}
    names = next(iter(scores.values()))
    return out | {f"{stage}/baseline/{name}": float(np.mean([s[name] for s in scores.values()])) for name in names}
