"""SL-CAI vs RL-CAI on the held-out RL prompts: the PM's mean score of each, and their paired difference.

    python bench/rl_held_out.py runs/quickstart [--resamples 2000]

Reads `eval/rl_samples.jsonl` (both models' answers to the same held-out prompts with the same
seeds, scored by the run's PM) and prints, per prompt kind and overall, the mean score of each
model and the mean paired difference RL-CAI - SL-CAI with a 95% bootstrap interval over prompts
(overall, the figure stage `rl` records in the manifest and the report shows; here also per kind).
The PM is what RL optimised: this says whether RL moved its own reward on unseen prompts, not
whether the model got better (that is eval's independent judge).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from constitutional.intervals import bootstrap_mean_interval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    path = args.run_dir / "eval" / "rl_samples.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    empty = sum(not row["rl_cai"].strip() for row in rows)
    print(f"{path}: {len(rows)} held-out prompts; RL-CAI empty answers: {empty}")
    for kind in sorted({row["kind"] for row in rows}) + ["all"]:
        part = [row for row in rows if kind in ("all", row["kind"])]
        before = [row["sl_cai_score"] for row in part]
        after = [row["rl_cai_score"] for row in part]
        differences = [b - a for a, b in zip(before, after)]
        low, high = bootstrap_mean_interval(differences, args.resamples)
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        print(
            f"{kind:>9}: n={len(part):3d}  SL-CAI {mean(before):+.3f}  RL-CAI {mean(after):+.3f}  "
            f"RL - SL {mean(differences):+.3f} [{low:+.3f}, {high:+.3f}] (95% bootstrap over prompts)"
        )


if __name__ == "__main__":
    main()
