"""A classic baseline on the model's own split: TF-IDF (word 1-2 grams) + class-balanced logistic regression.

On short Reddit comments this is hard to beat with a small model, so a fine-tuned model's number
means little without it. It is fitted on exactly the training rows the model sees, as the model sees
them (type mentions masked, truncated to `data.max_length` tokens: the texts are decoded from the
cached token ids), and scored on the same validation and test rows with the same metrics.
Needs scikit-learn (``pip install "mbti-lightning[baseline]"``).
"""

from __future__ import annotations

import importlib.util

import numpy as np

NAME = "TF-IDF + logistic regression"


def available() -> bool:
    return importlib.util.find_spec("sklearn") is not None


def split_labels(dm, split: str) -> np.ndarray:
    """(rows, heads) class ids of a tokenized split."""
    return np.asarray(dm.splits[split]["labels"][:]).reshape(len(dm.splits[split]), -1)


def _texts(dm, split: str) -> list[str]:
    return dm.tokenizer.batch_decode(dm.splits[split]["input_ids"][:], skip_special_tokens=True)


def fit_predict(dm, splits: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Fit one classifier per head on `dm`'s training split; (rows, heads) predicted class ids per split in `splits`."""
    if not available():
        raise ImportError('the baseline needs scikit-learn: pip install "mbti-lightning[baseline]"')
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train = _texts(dm, "train")
    # min_df 2 keeps a large corpus's vocabulary (and memory) in bounds; a tiny one needs every word.
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2 if len(train) > 1000 else 1)
    features = vectorizer.fit_transform(train)
    labels = split_labels(dm, "train")
    models = [
        LogisticRegression(class_weight="balanced", max_iter=1000).fit(features, labels[:, h])
        for h in range(labels.shape[1])
    ]
    out = {}
    for split in splits:
        if split in dm.splits:
            x = vectorizer.transform(_texts(dm, split))
            out[split] = np.stack([model.predict(x) for model in models], 1)
    return out


def log_keys(stage: str, scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{stage}/baseline/{metric}``; with several heads also per head (``val/baseline/J-P/mcc``), the plain
    name being their mean, as the model's metrics are logged."""
    if len(scores) == 1:
        (values,) = scores.values()
        return {f"{stage}/baseline/{name}": v for name, v in values.items()}
    out = {f"{stage}/baseline/{head}/{name}": v for head, values in scores.items() for name, v in values.items()}
    names = next(iter(scores.values()))
    return out | {f"{stage}/baseline/{name}": float(np.mean([s[name] for s in scores.values()])) for name in names}
