"""One model for all four axes against four single-axis models, on the offline demo (CPU).

Runs `mbti-lightning fit --config configs/demo.yaml` five times, each in its own process and
working folder under `--out`: once per axis, and once with `--data.target all`. Prints each run's
wall-clock time (the whole command, as a user pays it) and best validation MCC, then

- the time ratio: the `all` run over the mean single-axis run (goal: at most 1.3), and
- per axis: the `all` model's MCC at its own best checkpoint (picked by mean MCC) minus the single
  model's best MCC (goal: no worse than -0.05).

    python bench/multi_axis.py                     # about 10 minutes on a 2-core CPU
    python bench/multi_axis.py --args "--trainer.max_epochs 1"

Writes the same as JSON to `--out/multi_axis.json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AXES = ["E-I", "N-S", "F-T", "J-P"]


def fit(target: str, folder: Path, extra: list[str]) -> float:
    """Seconds that `mbti-lightning fit` on the demo takes, run in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "mbti_lightning",
        "fit",
        "--config",
        str(REPO / "configs/demo.yaml"),
        "--data.target",
        target,
        *extra,
    ]
    start = time.perf_counter()
    subprocess.run(command, cwd=folder, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def run(target: str, out: Path, extra: list[str]) -> dict:
    folder = out / target
    seconds = fit(target, folder, extra)
    (log,) = sorted(folder.glob("logs/demo/version_*/metrics.csv"))[-1:]
    rows = [row for row in csv.DictReader(log.open()) if row["val/mcc"]]
    best = max(rows, key=lambda row: float(row["val/mcc"]))  # the row the best checkpoint was saved at
    mcc = (
        {axis: float(best[f"val/{axis}/mcc"]) for axis in AXES} if target == "all" else {target: float(best["val/mcc"])}
    )
    return {"target": target, "seconds": round(seconds, 1), "best_step": int(best["step"]) + 1, "mcc": mcc}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench/out/multi_axis")
    parser.add_argument("--args", default="", help="extra CLI overrides for every run, in one string")
    args = parser.parse_args(argv)
    # Warm the demo's cached corpus, tokenizer and tokenized splits, so no run pays for building them.
    for target in [*AXES, "all"]:
        fit(target, args.out / "warm-up", shlex.split(args.args) + ["--trainer.max_steps", "1"])
    results = [run(target, args.out, shlex.split(args.args)) for target in [*AXES, "all"]]
    single, joint = results[:4], results[4]
    ratio = joint["seconds"] / (sum(r["seconds"] for r in single) / 4)
    print(f"{'run':8} {'seconds':>8} {'best step':>10}  best val MCC")
    for r in results:
        print(
            f"{r['target']:8} {r['seconds']:8.1f} {r['best_step']:10d}  "
            + ", ".join(f"{axis} {mcc:.3f}" for axis, mcc in r["mcc"].items())
        )
    print(f"time ratio, all / mean single axis: {ratio:.2f} (goal <= 1.3)")
    gaps = {axis: joint["mcc"][axis] - r["mcc"][axis] for axis, r in zip(AXES, single)}
    print(
        "MCC of all minus single, per axis: " + ", ".join(f"{a} {g:+.3f}" for a, g in gaps.items()) + " (goal >= -0.05)"
    )
    (args.out / "multi_axis.json").write_text(
        json.dumps({"runs": results, "time_ratio": ratio, "mcc_gap": gaps}, indent=1)
    )


if __name__ == "__main__":
    main()
