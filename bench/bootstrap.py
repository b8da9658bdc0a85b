"""The report's bootstrap at scale: 100,000 posts of 2,000 persons, 1,000 resamples of the persons.

Times `evaluation.scored` (every metric of the model, the baseline and the majority class and the two
paired differences, with intervals) per post, from per-person confusion counts, against the goal of
10 s on 2 cores (docs/evaluation.md). Synthetic predictions, seeded.

    python bench/bootstrap.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mbti_lightning.evaluation import scored
from mbti_lightning.metrics import confusion


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=100_000)
    parser.add_argument("--persons", type=int, default=2_000)
    parser.add_argument("--resamples", type=int, default=1_000)
    parser.add_argument("--classes", type=int, default=2, help="2 for an axis, 16 for the type")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    person = rng.integers(0, args.persons, args.posts)
    labels = rng.integers(0, args.classes, args.persons)[person]
    model = np.where(rng.random(args.posts) < 0.7, labels, rng.integers(0, args.classes, args.posts))
    base = np.where(rng.random(args.posts) < 0.6, labels, rng.integers(0, args.classes, args.posts))
    start = time.perf_counter()
    systems = {
        "model": confusion(labels, model, person, args.classes),
        "baseline": confusion(labels, base, person, args.classes),
        "majority": confusion(labels, np.zeros_like(labels), person, args.classes),
    }
    figures = scored(systems, args.resamples, seed=0)
    seconds = time.perf_counter() - start
    mcc = figures["model - baseline"]["mcc"]
    print(
        f"{args.posts:,} posts, {args.persons:,} persons, {args.classes} classes, {args.resamples:,} resamples: "
        f"{seconds:.2f} s (goal 10 s); model - baseline MCC {mcc['value']:.3f} [{mcc['interval'][0]:.3f}, "
        f"{mcc['interval'][1]:.3f}]"
    )
    return seconds


if __name__ == "__main__":
    main()
