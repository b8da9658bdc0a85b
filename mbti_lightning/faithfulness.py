"""Whether token contributions name the tokens a prediction rests on, as ERASER measures it (DeYoung et al.,
2020, "ERASER: A Benchmark to Evaluate Rationalized NLP Models").

Comprehensiveness: how much the shown letter's probability falls when the top k% of a text's tokens by
contribution are removed (large: the answer needed them). Sufficiency: how much it falls when only they are
kept (small: they were enough). Each is compared with the same count of tokens chosen at random (mean of
`DRAWS` draws), for k in `SHARES`, and summarised as a difference with a 95% bootstrap interval over texts:
comprehensiveness minus random's, random's sufficiency minus the top's; above 0 is better than random.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mbti_lightning import evaluation

#: Shares of a text's removable tokens chosen, and random draws each is compared with.
SHARES, DRAWS = (0.05, 0.1, 0.2), 5
KINDS = ("comprehensiveness", "sufficiency")


def removal_id(tokenizer: Any) -> int | None:
    """The id a removed token becomes: the unknown token, else the mask token (ids compared with None: Llama's and
    Phi-3's unknown id is 0); None where the tokenizer has neither (byte-level BPE): removed tokens are deleted,
    since padding in their place would move a decoder's pooled token."""
    for token_id in (tokenizer.unk_token_id, tokenizer.mask_token_id):
        if token_id is not None:
            return token_id
    return None


def remove(ids: list[int], positions: set[int], removal: int | None) -> list[int]:
    """`ids` with the tokens at `positions` replaced by `removal`, or deleted where it is None."""
    if removal is None:
        return [t for i, t in enumerate(ids) if i not in positions]
    return [removal if i in positions else t for i, t in enumerate(ids)]


def variants(
    ids: list[int], removable: list[int], contributions: torch.Tensor, removal: int | None, generator: torch.Generator
) -> dict[tuple[str, str, int], list[int]]:
    """One text's erased versions, keyed (share, kind, draw): draw -1 chooses the top tokens by contribution,
    0..DRAWS-1 random ones. Comprehensiveness removes the chosen tokens; sufficiency removes the others."""
    top = sorted(removable, key=lambda i: -float(contributions[i]))
    out = {}
    for share in SHARES:
        count = max(1, math.ceil(share * len(removable)))
        draws = [top] + [
            [removable[i] for i in torch.randperm(len(removable), generator=generator)] for _ in range(DRAWS)
        ]
        for draw, order in enumerate(draws, start=-1):
            chosen = set(order[:count])
            out[(f"{share:.0%}", "comprehensiveness", draw)] = remove(ids, chosen, removal)
            out[(f"{share:.0%}", "sufficiency", draw)] = remove(ids, set(removable) - chosen, removal)
    return out


def scores(before: float, after: dict[tuple[str, str, int], float]) -> dict[str, dict[str, float]]:
    """Per share, the fall from `before` of each kind for the top tokens and (mean over draws) for random ones."""
    out: dict[str, dict[str, float]] = {}
    for (share, kind, draw), probability in after.items():
        entry = out.setdefault(share, {k: 0.0 for kind in KINDS for k in (kind, f"{kind}_random")})
        if draw < 0:
            entry[kind] = before - probability
        else:
            entry[f"{kind}_random"] += (before - probability) / DRAWS
    return out


def summary(per_text: list[dict[str, dict[str, float]]], resamples: int = 2000) -> dict[str, dict[str, Any]]:
    """Per share: the mean of each figure over texts, and each kind's difference from random (above 0: better than
    random) with its bootstrap interval over texts (None for a single text)."""
    differences = {
        (share, kind): np.array(
            [
                t[share][kind] - t[share][f"{kind}_random"]
                if kind == "comprehensiveness"
                else t[share][f"{kind}_random"] - t[share][kind]
                for t in per_text
            ]
        )
        for share in per_text[0]
        for kind in KINDS
    }
    intervals = dict.fromkeys(differences)
    if len(per_text) > 1:
        low, high = evaluation.bootstrap(
            tuple(differences.values()), lambda *xs, axis=-1: np.stack([x.mean(axis) for x in xs]), resamples, seed=0
        )
        intervals = {key: [float(lo), float(hi)] for key, lo, hi in zip(differences, low, high)}
    out = {}
    for share in per_text[0]:
        entry = {k: float(np.mean([t[share][k] for t in per_text])) for k in per_text[0][share]}
        for kind in KINDS:
            entry[f"{kind}_over_random"] = float(differences[(share, kind)].mean())
            entry[f"{kind}_interval"] = intervals[(share, kind)]
        out[share] = entry
    return out
