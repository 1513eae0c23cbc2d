"""Benchmark: the `rl` stage at the quickstart size: PPO steps/s, its time split, peak memory, and
PPO vs RLOO vs GRPO wall time on the same prompts; rollout tokens/s against the `pairs` stage's.

Needs a run directory where `sl` and `pm` have finished (e.g. `runs/quickstart` after `make demo`).
Each algorithm runs in its own process on a scratch copy of SL-CAI, the PM and the critiques, with
the quickstart's `rl` settings (`--steps` overrides the step count); its resident memory is sampled
every 0.2 s (policy, reference, value model and PM all live in that process). The `pairs`-style
baseline samples the same number of answers to the same prompts from SL-CAI through the stage's
back end (batched, the run's dtype), one generate call per batch.

    python bench/rl_throughput.py RUN_DIR [--steps 3] [--algorithms ppo,rloo,grpo]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--algorithms", default="ppo,rloo,grpo")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one algorithm in this process
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.scratch, args.steps)
        return
    results = {}
    for algorithm in args.algorithms.split(","):
        scratch = Path(tempfile.mkdtemp(prefix=f"rl-bench-{algorithm}-"))
        try:
            for name in ("data/critiques.jsonl", "models/sl-cai", "models/pm"):
                source, target = args.run_dir / name, scratch / name
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
            command = [sys.executable, __file__, str(args.run_dir), "--one", algorithm, "--scratch", str(scratch),
                       "--steps", str(args.steps)]  # fmt: skip
            seconds, peak = timed_with_peak_memory(command)
            metrics = [json.loads(line) for line in (scratch / "eval" / "rl_metrics.jsonl").read_text().splitlines()]
            results[algorithm] = {
                "seconds": round(seconds, 1),
                "peak_rss_gb": round(peak / 2**30, 2),
                "metrics": metrics,
            }
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        summary = results[algorithm]
        print(f"{algorithm}: {args.steps} steps in {summary['seconds']} s (whole process, models loaded), "
              f"peak RSS {summary['peak_rss_gb']} GB (target for PPO <= 12 GB)", flush=True)  # fmt: skip
    if "ppo" in results:
        report_ppo(results["ppo"]["metrics"], args)
    print(json.dumps({name: {k: v for k, v in value.items() if k != "metrics"} for name, value in results.items()}))


def report_ppo(metrics: list[dict], args: argparse.Namespace) -> None:
    """The PPO step time split, rollout tokens/s, and the pairs-style baseline on the same prompts."""
    steps = len(metrics)
    split = {key: sum(row[key] for row in metrics) / steps for key in ("rollout_s", "scoring_s", "optimisation_s")}
    total = sum(split.values())
    print(
        f"ppo per step: {total:.1f} s = rollout {split['rollout_s']:.1f} s + scoring {split['scoring_s']:.1f} s "
        f"+ optimisation (logprobs, values, updates) {split['optimisation_s']:.1f} s; {1 / total:.3f} steps/s"
    )
    config = load_quickstart(args.steps)
    batch = config.rl.rollout_batch_size
    rollout_tokens = sum(row["response_length"] * batch for row in metrics)
    rollout_speed = rollout_tokens / sum(row["rollout_s"] for row in metrics)
    pairs_speed = pairs_baseline(args.run_dir, config, batch * steps)
    print(f"rollout {rollout_speed:.1f} tok/s vs pairs-stage generation {pairs_speed:.1f} tok/s: "
          f"{rollout_speed / pairs_speed:.2f} (target >= 0.80)")  # fmt: skip


def load_quickstart(steps: int):
    from constitutional.config import load_config

    return load_config(REPO / "configs" / "quickstart.yaml", [f"rl.steps={steps}", "rl.save_steps=1000"])


def run_one(algorithm: str, scratch: Path, steps: int) -> None:
    from constitutional.rundir import RunDir
    from constitutional.stages import rl

    config = load_quickstart(steps)
    config.rl.algorithm = algorithm
    rl.run(config, config.rl, RunDir(scratch), None)


def pairs_baseline(run_dir: Path, config, answers: int) -> float:
    """Tokens/s of sampling `answers` answers from SL-CAI the way stage `pairs` does."""
    from constitutional.backends import SamplingParams
    from constitutional.comparisons import sample_pairs
    from constitutional.records import read_critiques
    from constitutional.sections import ModelSpec

    records = [r for r in read_critiques(run_dir / "data" / "critiques.jsonl")]
    records = [
        records[i % len(records)] | {"id": f"{records[i % len(records)]['id']}-{i}"} for i in range(answers // 2)
    ]
    spec = ModelSpec(name=str((run_dir / "models" / "sl-cai").resolve()), prompt_format="plain")
    config.cache.enabled = False
    backend = config.open_backend(spec, None)
    params = SamplingParams(max_new_tokens=config.rl.max_new_tokens, temperature=1.0)
    tokens, seconds = 0, 0.0
    for start in range(0, len(records), config.rl.rollout_batch_size // 2):
        chunk = records[start : start + config.rl.rollout_batch_size // 2]
        began = time.perf_counter()
        sample_pairs(backend, chunk, params, config.seed)
        seconds += time.perf_counter() - began
        tokens += sum(backend.last_token_counts)
    return tokens / seconds


def timed_with_peak_memory(command: list[str]) -> tuple[float, int]:
    """Run `command`; return (wall seconds, peak resident bytes of the process and its children)."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(command)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        watched = psutil.Process(process.pid)
        while not done.is_set():
            try:
                rss = watched.memory_info().rss + sum(
                    child.memory_info().rss for child in watched.children(recursive=True)
                )
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    code = process.wait()
    done.set()
    thread.join()
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {code}")
    return time.perf_counter() - started, peak


if __name__ == "__main__":
    main()
