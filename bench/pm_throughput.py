"""Benchmark: training tokens/s of the `pm` stage's soft-label trainer vs TRL's stock `RewardTrainer`.

Both get the same comparisons (HH-RLHF helpfulness pairs from ../shared/data, the chosen answer as
transcript A; the stock trainer's hard label says A wins, the stage's soft label is p_a = 1, the
same loss), the same model loaded fresh as a one-output classifier, the same batch size,
max_length, number of steps, seed (hence the same batches) and precision. The stage's trainer is
built by `constitutional.stages.pm.build_trainer`, exactly as the stage builds it; the stock one by
the same function with `soft_labels=False`, i.e. `trl.RewardTrainer` itself. Checkpoints are pushed
past the last step, so the timing is of training alone.

Timed: steps 2..S of each run (the first pays warm-up costs), non-padding tokens.

    python bench/pm_throughput.py [--model embedded] [--steps 8] [--batch-size 4] [--max-length 256]

Target (issue): the soft-label trainer at >= 90% of the stock trainer's tokens/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from constitutional.config import config_from_dict
from constitutional.models import load_sequence_classifier, load_tokenizer, local_weights_dir, resolve_model_name
from constitutional.sources import load_preference_pairs
from constitutional.stages import pm

from sl_throughput import StepTimer

REPO = Path(__file__).resolve().parents[1]
HELPFUL = REPO.parent / "shared" / "data" / "hh-rlhf" / "helpful-base-test.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    config = config_from_dict(
        {
            "seed": 0,
            "pm": {
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "learning_rate": 1e-5,
                "save_steps": args.steps + 1,
                "logging_steps": args.steps,
            },
        },  # fmt: skip
        base_dir=os.getcwd(),
    )
    ref = resolve_model_name(args.model, os.getcwd())
    local_weights_dir(ref)  # converts the embedded GGUF once, outside any timing
    tokenizer = load_tokenizer(ref)
    # More comparisons than needed: TRL drops those longer than max_length; one epoch of S steps is kept.
    rows = helpful_rows(args.steps * args.batch_size * 3)
    dataset = pm.to_dataset(rows)
    print(
        f"model {args.model}, batch {args.batch_size} comparisons, max_length {args.max_length}, {args.steps} steps, "
        f"CPU threads {torch.get_num_threads()}, {len(rows)} HH-RLHF helpfulness comparisons offered"
    )
    work = Path(tempfile.mkdtemp(prefix="pm-bench-"))
    speeds = {}
    try:
        for index, (name, soft) in enumerate(
            [("stock RewardTrainer (hard labels)", False), ("pm stage (soft labels)", True)]
        ):
            speeds[name] = time_run(name, soft, config, ref, tokenizer, dataset, args, work / f"run{index}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    names = list(speeds)
    ratio = speeds[names[1]] / speeds[names[0]]
    print(f"ratio soft-label trainer / stock RewardTrainer: {ratio:.3f} (target >= 0.90)")
    print(json.dumps({**{name: round(speed, 2) for name, speed in speeds.items()}, "ratio": round(ratio, 3)}))


def helpful_rows(limit: int) -> list[dict]:
    """`limit` HH-RLHF helpfulness comparisons as `pm_train.jsonl` rows: the chosen answer is A, p_a = 1."""
    return [
        {"prompt": p["prompt"], "history": [{"role": r, "text": t} for r, t in p["history"]],
         "response_a": p["chosen"], "response_b": p["rejected"], "p_a": 1.0}
        for p in load_preference_pairs(str(HELPFUL), limit=limit)
    ]  # fmt: skip


def time_run(name, soft, config, ref, tokenizer, dataset, args, output_dir: Path) -> float:
    """Train `steps` steps with one trainer and return its tokens/s over steps 2..S."""
    timer = StepTimer()
    torch.manual_seed(0)
    model = load_sequence_classifier(ref)
    trainer = pm.build_trainer(
        config.training, config.pm, config.seed, model, tokenizer, dataset, output_dir, [timer], soft_labels=soft
    )
    trainer.args.max_steps = args.steps
    trainer.train()
    loss = next(entry["train_loss"] for entry in reversed(trainer.state.log_history) if "train_loss" in entry)
    print(
        f"{name}: {timer.tokens_per_s():.1f} tok/s ({timer.steps} timed steps in {timer.seconds():.1f} s; "
        f"{len(trainer.train_dataset)} comparisons kept of {len(dataset)}, train_loss {loss:.4f})",
        flush=True,
    )
    speed = timer.tokens_per_s()
    del trainer, model
    gc.collect()
    return speed


if __name__ == "__main__":
    main()
