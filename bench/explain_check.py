"""How `mbti-lightning explain` reads on a trained model: its undecided reference against all-padding, the old one.

Explains generated demo texts (`demo.generate_rows(num_rows=N, seed=123)`, the texts tests/test_explain.py uses)
with the model's first head, twice in the same run: with explain's reference (texts of padding and of the
unknown token, weighted so that their mean answer is undecided) and with all-padding alone (what explain used
before). For each it prints the share of texts whose contributions add up toward the letter shown, the planted
cue words (`demo.CUES`) among the top 3 words of right answers, the cue words whose contribution points toward
their own letter, the largest |delta|, and ERASER's comprehensiveness and sufficiency with their differences from
random removal (95% intervals over texts).

    python bench/explain_check.py --ckpt checkpoints/demo/best-step400-mcc0.5780.ckpt
    python bench/explain_check.py --ckpt /tmp/mini/ckpt/best-step60-mcc0.4206.ckpt      # MiniLM fine-tuned
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from mbti_lightning import explain, loading
from mbti_lightning.demo import CUES, generate_rows


def cue_figures(report: dict, head: str, truth: list[str]) -> tuple[int, int, int, int]:
    """(right answers, those with a cue of their letter among the top 3 words, cue words, cue words toward their
    letter)."""
    right = [t["heads"][head] for t, letter in zip(report["texts"], truth) if t["heads"][head]["letter"] == letter]
    hits = cues = toward = 0
    for r in right:
        top = sorted(r["words"], key=lambda w: -w["contribution"])[:3]
        hits += any(w["word"] in CUES[r["letter"]].split() for w in top)
        for word in r["words"]:
            for letter in head.split("-") if "-" in head else ():
                if word["word"] in CUES[letter].split():
                    cues += 1
                    toward += (word["contribution"] > 0) == (letter == r["letter"])
    return len(right), hits, cues, toward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a fit checkpoint, an export folder or a hub id")
    parser.add_argument("--texts", type=int, default=80)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    loaded = loading.load(args.ckpt)
    head = next(iter(loaded.model.heads))
    rows = generate_rows(num_rows=args.texts, seed=123)
    texts, truth = rows["body"][: args.texts], rows[head][: args.texts]
    print(f"model {args.ckpt} ({loaded.dtype}), head {head}, {len(texts)} texts, {args.steps} steps")
    undecided = explain.neutral_weights
    for name, weights in (
        ("undecided (padding and unknown, weighted)", undecided),
        (
            "all padding (before)",
            lambda values, _: torch.stack([torch.ones_like(values[0]), torch.zeros_like(values[0])]),
        ),
    ):
        explain.neutral_weights = weights
        with tempfile.TemporaryDirectory() as out:
            report = explain.run(loaded, texts, None, Path(out), args.steps)
        explain.neutral_weights = undecided
        summary = report["summary"][head]
        right, hits, cues, toward = cue_figures(report, head, truth)
        print(f"\nreference: {name}; {report['meta']['texts_per_s']} texts/s")
        reference = [t["heads"][head]["reference"]["probability"] for t in report["texts"]]
        print(f"  reference's probability of the letter shown: {min(reference):.3f} to {max(reference):.3f}")
        print(f"  contributions adding up toward the letter shown: {summary['toward_letter_shown']:.2f}")
        print(f"  right answers with a cue of their letter among the top 3 words: {hits}/{right}")
        print(f"  cue words in right answers toward their own letter: {toward}/{cues}")
        print(f"  largest |delta|: {summary['max_abs_delta']:.4f}")
        print("  k    comprehensiveness  random  over random [95%]          sufficiency  random  over random [95%]")
        for share, f in summary["faithfulness"].items():
            line = f"  {share:4s}"
            for kind in ("comprehensiveness", "sufficiency"):
                low, high = f[f"{kind}_interval"]
                line += f" {f[kind]:17.3f} {f[kind + '_random']:7.3f}  {f[kind + '_over_random']:+.3f} [{low:+.3f}, {high:+.3f}]"
            print(line)


if __name__ == "__main__":
    main()
