"""Benchmark: `training.precision` fp32 against auto (bf16 where the hardware has it), side by side.

For `sl` and `pm`: the stage's own trainer (`sl.train`; `pm.build_trainer`) on the same examples,
model, batch size, max_length, steps and seed, once per precision, timed over steps 2..S
(non-padding tokens/s; the first step pays warm-up) with the mean train loss of the S steps. For
PPO: the `rl` stage run for `--ppo-steps` steps on a scratch copy of a finished run's SL-CAI, PM and
critiques, once per precision, reporting the optimisation seconds per step (log-probs, values,
updates) and rollout seconds, from `eval/rl_metrics.jsonl`, with the policy loss and KL.

    python bench/precision.py [--model embedded] [--steps 8] [--batch-size 4] [--max-length 256]
                              [--run-dir runs/quickstart] [--ppo-steps 4]

Without `--run-dir` (or where it lacks models/sl-cai and models/pm), PPO is skipped with one line.
Targets (issue 20): sl, pm and the PPO optimisation step >= 2x fp32's speed with auto, where the
CPU has AVX512-BF16 or AMX; losses within 5% of fp32's (bf16 rounds activations to 8 bits of mantissa).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from constitutional.config import config_from_dict, load_config
from constitutional.models import (
    cpu_has_native_bf16,
    load_sequence_classifier,
    load_tokenizer,
    local_weights_dir,
    resolve_model_name,
)
from constitutional.records import read_records
from constitutional.rundir import RunDir
from constitutional.stages import pm, rl, sl
from constitutional.training import resolved_precision

# The sibling benchmarks' data and step timer.
sys.path.insert(0, str(Path(__file__).resolve().parent))
helpful_rows = importlib.import_module("pm_throughput").helpful_rows
StepTimer = importlib.import_module("sl_throughput").StepTimer
synthesise_critiques = importlib.import_module("sl_throughput").synthesise_critiques

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--run-dir", type=Path, help="a finished run (sl and pm done) for the PPO comparison")
    parser.add_argument("--ppo-steps", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"CPU threads {torch.get_num_threads()}, native bf16 (AVX512-BF16 or AMX): {cpu_has_native_bf16()}, "
          f"CUDA: {torch.cuda.is_available()}")  # fmt: skip
    results: dict[str, dict[str, dict[str, float]]] = {"sl": {}, "pm": {}, "ppo": {}}
    work = Path(tempfile.mkdtemp(prefix="precision-bench-"))
    try:
        for precision in PRECISIONS:
            config = stage_config(args, precision)
            label = f"{precision} ({resolved_precision(config.training)})"
            results["sl"][label] = time_sl(config, args, work / f"sl-{precision}")
            results["pm"][label] = time_pm(config, args, work / f"pm-{precision}")
            if has_models(args.run_dir):
                results["ppo"][label] = time_ppo(args, precision, work / f"ppo-{precision}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not results["ppo"]:
        print("ppo: skipped (give --run-dir a run where sl and pm have finished)")
    for stage, rows in results.items():
        labels = list(rows)
        for label in labels:
            print(f"{stage} {label}: " + ", ".join(f"{key} {value}" for key, value in rows[label].items()))
        if len(labels) == 2:
            speed = "tokens_per_s" if stage != "ppo" else "optimisation_steps_per_s"
            print(f"{stage}: auto / fp32 speed {rows[labels[1]][speed] / rows[labels[0]][speed]:.2f}x (target >= 2x)")
    print(json.dumps(results))


def stage_config(args: argparse.Namespace, precision: str):
    options = {"batch_size": args.batch_size, "max_length": args.max_length, "learning_rate": 1e-5,
               "save_steps": args.steps + 1, "logging_steps": 1}  # fmt: skip
    data = {"seed": 0, "models": {"base": args.model}, "training": {"precision": precision}}
    data.update(sl=options, pm=options)
    return config_from_dict(data, base_dir=os.getcwd())


def time_sl(config, args: argparse.Namespace, work: Path) -> dict[str, float]:
    base_model = sl.check(config, config.sl)
    local_weights_dir(base_model)  # converts the embedded GGUF once, outside any timing
    tokenizer = load_tokenizer(base_model)
    work.mkdir(parents=True)
    synthesise_critiques(work / "critiques.jsonl", 64)
    examples, _ = sl.load_examples(work / "critiques.jsonl", config.sl, config.seed, tokenizer.eos_token)
    examples = [examples[i % len(examples)] for i in range(args.steps * args.batch_size)]
    timer = StepTimer()
    trainer, summary = sl.train(config.training, config.sl, config.seed, base_model, tokenizer, examples, work, [timer])
    del trainer
    gc.collect()
    return {"tokens_per_s": round(timer.tokens_per_s(), 1), "train_loss": summary["train_loss"]}


def time_pm(config, args: argparse.Namespace, work: Path) -> dict[str, float]:
    ref = resolve_model_name(args.model, os.getcwd())
    tokenizer = load_tokenizer(ref)
    rows = helpful_rows(args.steps * args.batch_size * 3)
    timer = StepTimer()
    torch.manual_seed(0)
    model = load_sequence_classifier(ref)
    trainer = pm.build_trainer(config.training, config.pm, config.seed, model, tokenizer, pm.to_dataset(rows), work,
                               [timer])  # fmt: skip
    trainer.args.max_steps = args.steps
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    del trainer, model
    gc.collect()
    return {"tokens_per_s": round(timer.tokens_per_s(), 1), "train_loss": round(sum(losses) / len(losses), 4)}


def has_models(run_dir: Path | None) -> bool:
    return run_dir is not None and all((run_dir / name).is_dir() for name in ("models/sl-cai", "models/pm"))


def time_ppo(args: argparse.Namespace, precision: str, scratch: Path) -> dict[str, float]:
    for name in ("data/critiques.jsonl", "models/sl-cai", "models/pm"):
        source, target = args.run_dir / name, scratch / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    overrides = [f"rl.steps={args.ppo_steps}", "rl.save_steps=1000", "rl.max_eval_prompts=1",
                 f"training.precision={precision}"]  # fmt: skip
    config = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    rl.run(config, config.rl, RunDir(scratch), None)
    rows = read_records(scratch / "eval" / "rl_metrics.jsonl")[1:]  # the first step pays warm-up
    optimisation = sum(row["optimisation_s"] for row in rows) / len(rows)
    gc.collect()
    return {
        "optimisation_s": round(optimisation, 2),
        "optimisation_steps_per_s": round(1 / optimisation, 4),
        "rollout_s": round(sum(row["rollout_s"] for row in rows) / len(rows), 2),
        "policy_loss": round(sum(row["policy_loss"] for row in rows) / len(rows), 4),
        "kl": round(sum(row["kl"] for row in rows) / len(rows), 4),
    }


if __name__ == "__main__":
    main()
