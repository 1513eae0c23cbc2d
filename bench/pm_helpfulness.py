"""Benchmark: a trained PM's helpfulness accuracy on real human comparisons it never saw.

Scores the first N comparisons of Anthropic's HH-RLHF helpful-base test split (../shared/data;
rows with an empty or identical final reply left out, the chosen answer put at A or B by the same
seeded coin as stage `pm`) with the run's `models/pm`, and prints the PM's accuracy with a 95%
Wilson interval, the length baseline (how often the longer answer is the chosen one), chance, how
often the PM picks the longer answer, and the expected calibration error. It is the same
computation, on the same rows, as stage `pm` with `pm.helpfulness_eval` set to that file and
`pm.max_eval` to N (its `eval/pm.json` entry `helpfulness_eval`), for a run that is already done.

The quickstart's PM learns helpfulness from the built-in comparisons only: this says whether what
it learnt transfers to real data (the held-out rows in its own `eval/pm.json` are of the built-in
set, in distribution).

    python bench/pm_helpfulness.py RUN_DIR [--n 200] [--data FILE] [--max-length (the run's pm.max_length)]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

from constitutional.intervals import wilson_interval
from constitutional.preference import PreferenceModel
from constitutional.preference_data import human_row
from constitutional.preference_eval import held_out_figures, verdict
from constitutional.sources import load_preference_pairs

REPO = Path(__file__).resolve().parents[1]
HELPFUL = REPO.parent / "shared" / "data" / "hh-rlhf" / "helpful-base-test.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory with a trained PM in models/pm")
    parser.add_argument("--n", type=int, default=200, help="comparisons scored (the first N of the file)")
    parser.add_argument("--data", type=Path, default=HELPFUL, help="an HH-RLHF-format helpfulness file")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per transcript (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = yaml.safe_load((args.run_dir / "config.yaml").read_text(encoding="utf-8"))
    seed = int(config.get("seed", 0))
    max_length = args.max_length or int(config.get("pm", {}).get("max_length", 256))

    # As stage pm reads pm.helpfulness_eval: the first N pairs, ids prefixed "hy", the chosen at A or B by a coin.
    pairs = load_preference_pairs(str(args.data), limit=args.n, prefix="hy")
    rows = [
        {**human_row(pair, seed), "source": "helpfulness_eval"}
        for pair in pairs
        if pair["chosen"].strip() != pair["rejected"].strip()
    ]
    pm = PreferenceModel.load(args.run_dir / "models" / "pm", max_length=max_length, batch_size=args.batch_size)
    started = time.perf_counter()
    accuracy, calibration, (predicted, labels) = held_out_figures(pm, rows, bins=10)
    seconds = time.perf_counter() - started
    by_length = split_by_length(rows, predicted, labels)
    n = accuracy["comparisons"]
    low, high = accuracy["pm_ci95"]
    base_low, base_high = wilson_interval(accuracy["length_baseline"] * n, n)
    print(f"{args.run_dir}/models/pm on {n} comparisons of {args.data.name} (max_length {max_length}, {seconds:.0f} s)")
    print(f"  PM accuracy      {accuracy['pm']:.1%}  95% CI [{low:.1%}, {high:.1%}]")
    print(f"  length baseline  {accuracy['length_baseline']:.1%}  95% CI [{base_low:.1%}, {base_high:.1%}]"
          "  (the longer answer is the chosen one)")  # fmt: skip
    print("  chance           50.0%")
    print(f"  the PM {verdict(accuracy)}")
    print(f"  PM picks the longer answer {accuracy['pm_prefers_longer']:.1%}; ECE {calibration['ece']:.3f}")
    for side, (right, count) in by_length.items():
        print(f"  where the chosen answer is the {side} one: PM {right}/{count} = {right / max(count, 1):.1%}")
    print(json.dumps({"run": str(args.run_dir), "data": args.data.name, "max_length": max_length, **accuracy,
                      "length_baseline_ci95": [round(base_low, 4), round(base_high, 4)],
                      "ece": calibration["ece"], "by_chosen_length": by_length}))  # fmt: skip


def split_by_length(rows: list[dict], predicted: list[float], labels: list[float]) -> dict[str, tuple[float, int]]:
    """PM accuracy (ties count half) on the comparisons whose chosen answer is the longer / the shorter one."""
    counts = {"longer": [0.0, 0], "shorter": [0.0, 0]}
    for row, p, label in zip(rows, predicted, labels):
        a, b = len(row["response_a"].strip()), len(row["response_b"].strip())
        if a == b:
            continue
        side = "longer" if (a > b) == (label > 0.5) else "shorter"
        counts[side][0] += 0.5 if p == 0.5 else float((p > 0.5) == (label > 0.5))
        counts[side][1] += 1
    return {side: (right, count) for side, (right, count) in counts.items()}


if __name__ == "__main__":
    main()
