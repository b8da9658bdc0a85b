"""A model of persons against adding up a post model's evidence, per person, on two generated corpora (CPU).

Each corpus (`mbti_lightning.demo.person_rows`, E-I, 7 in 10 persons I, eight posts each, split by person):

- ``post``: every post carries one weak cue word for its person's letter (right 6 times in 10): independent
  evidence, which adding up uses best;
- ``person``: every post carries a topic word; an I keeps to one topic, an E picks one per post. No post says
  anything alone; the letter shows only across a person's posts.

On each, from `mbti-lightning report` (per-person figures with 95% intervals resampling persons):

(a) a fine-tuned post model, its posts' evidence summed (`configs/demo.yaml`; skipped with ``--skip finetune``);
(b) a post head on the frozen backbone's features, summed (`model.frozen`);
(c) the person head on those features, gated attention and mean (`model.person_head`), with the paired difference
    (c) - (b) on the same persons and which one the tool chose on the validation persons;
(d) the TF-IDF baseline, fitted on the same training split.

    python bench/persons.py                                  # about 8 minutes on a 2-core CPU
    python bench/persons.py --tiny                           # a smoke run (too few persons to learn from)
    python bench/persons.py --model ~/.cache/real-models/minilm --skip finetune
    python bench/persons.py --model ~/.cache/real-models/gemma-3-270m --skip finetune --corpora person --persons 1000

Writes the same as JSON to `--out/persons.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from frozen import cli  # this folder's: `mbti-lightning ARGS` in its own process, timed

REPO = Path(__file__).resolve().parents[1]
CORPORA = ("post", "person")
HEAD = ["--model.frozen", "{}", "--model.learning_rate", "1e-2", "--model.optimizer", "adamw"]
KEYS = ("mcc", "macro_f1")


def data_args(path: Path, model: str | None, max_length: int) -> list[str]:
    from mbti_lightning.demo import PERSON_DATA

    keys = PERSON_DATA | {"data_files": path, "max_length": max_length}
    backbone = ["--model.model_name_or_path", model, "--model.from_scratch", "false"] if model else []
    config = ["--config", str(REPO / "configs/demo.yaml")]
    return [*config, *(a for k, v in keys.items() for a in (f"--data.{k}", str(v))), *backbone]


def fit_and_report(folder: Path, args: list[str], fit: list[str], resamples: int) -> tuple[dict, float]:
    """`fit` then `report` on its last checkpoint: the report's E-I figures and the fit's seconds."""
    seconds = cli(folder, "fit", *args, *fit, "--checkpoint.dirpath", "checkpoints")
    ckpt = folder / "checkpoints/last.ckpt"
    cli(folder, "report", *args, "--ckpt_path", str(ckpt), "--out", "report", "--resamples", str(resamples))
    return json.loads((folder / "report/report.json").read_text())["heads"]["E-I"], seconds


def figures(people: dict, name: str) -> dict:
    return {key: people[name][key] for key in KEYS}


def person_systems(head: dict) -> tuple[dict, dict, dict, str]:
    """From a report with a person head: (summed post head, person head, person head - summed, who answers)."""
    people, answer = head["figures"]["people"], head["person_answer"]["answer"]
    if answer == "person head":
        return (
            figures(people, "summed posts"),
            figures(people, "model"),
            figures(people, "model - summed posts"),
            answer,
        )
    flipped = {  # the report's difference is summed - person head: turned round
        key: {"value": -v["value"], "interval": [-v["interval"][1], -v["interval"][0]]}
        for key, v in figures(people, "model - person head").items()
    }
    return figures(people, "model"), figures(people, "person head"), flipped, answer


def run_corpus(folder: Path, cue: str, args: argparse.Namespace) -> dict:
    from mbti_lightning.demo import write_person_rows

    folder.mkdir(parents=True, exist_ok=True)
    data = write_person_rows(folder / f"{cue}.csv", cue, args.persons, args.posts)
    common = data_args(data, args.model, args.max_length)
    epochs = ["--trainer.max_epochs", str(args.epochs), "--trainer.val_check_interval", "1.0"]
    batch = ["--data.batch_size", str(args.batch_size), "--data.eval_batch_size", str(args.batch_size)]
    out: dict = {"corpus": cue, "persons": args.persons, "posts": args.posts, "systems": {}}
    systems = out["systems"]
    if "finetune" not in args.skip:
        head, seconds = fit_and_report(folder / "finetuned", common, [*epochs, *batch], args.resamples)
        people = head["figures"]["people"]
        systems["(a) fine-tuned, summed"] = figures(people, "model") | {"fit_s": seconds}
        systems["(d) TF-IDF baseline"] = figures(people, "baseline")
    for pooling in ("attention", "mean"):
        fit = [*HEAD, "--model.person_head", f"{{pooling: {pooling}}}", *epochs, *batch]
        head, seconds = fit_and_report(folder / f"frozen-{pooling}", common, fit, args.resamples)
        summed, person, difference, answer = person_systems(head)
        systems.setdefault("(b) frozen post head, summed", summed | {"fit_s": seconds})
        systems[f"(c) person head, {pooling}"] = person | {
            "minus (b)": difference,
            "answers on validation": answer,
            "why": head["person_answer"]["why"],
            "fit_s": seconds,
        }
        systems.setdefault("(d) TF-IDF baseline", figures(head["figures"]["people"], "baseline"))
    return out


def show(f: dict) -> str:
    return f"{f['value']:.3f} [{f['interval'][0]:.3f}, {f['interval'][1]:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a backbone folder (default: the demo's tiny Phi-3, random)")
    parser.add_argument("--persons", type=int, default=1500)
    parser.add_argument("--posts", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["finetune"])
    parser.add_argument("--corpora", nargs="*", default=list(CORPORA), choices=CORPORA)
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 60 persons, 1 epoch, 50 resamples")
    parser.add_argument("--out", type=Path, default=REPO / "bench/out")
    args = parser.parse_args()
    if args.tiny:
        args.persons, args.epochs, args.resamples = 60, 1, 50
    results = {"model": args.model or "demo (tiny Phi-3, random weights)", "corpora": []}
    with tempfile.TemporaryDirectory(prefix="bench-persons-") as tmp:
        os.environ.setdefault("MBTI_LIGHTNING_CACHE", str(Path(tmp) / "cache"))
        for cue in args.corpora:
            results["corpora"].append(run_corpus(Path(tmp) / cue, cue, args))
    print(f"backbone: {results['model']}; {args.persons} persons x {args.posts} posts; per-person test figures")
    for corpus in results["corpora"]:
        print(f"\ncorpus: cue per {corpus['corpus']}")
        print(f"{'system':34} {'MCC':24} {'macro-F1':24} notes")
        for name, f in corpus["systems"].items():
            notes = ""
            if "minus (b)" in f:
                notes = (
                    f"MCC minus (b) {show(f['minus (b)']['mcc'])}; chosen on validation: {f['answers on validation']}"
                )
            print(f"{name:34} {show(f['mcc']):24} {show(f['macro_f1']):24} {notes}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "persons.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
