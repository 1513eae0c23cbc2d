"""Benchmark: held-out accuracy of a preference model trained by the `pm` stage on human helpfulness data.

Trains the stage's PM (its own `train` and `evaluate`, on a scratch run directory) on N HH-RLHF
helpfulness comparisons (../shared/data, test split; the chosen answer placed at A or B at random)
and reports accuracy on a disjoint held-out set of conversations, beside chance (50%) and a
length-only baseline (the longer answer wins). Human-feedback PMs of tens of billions of parameters
reach roughly 65-72% on HH-RLHF data; this says where a small model lands.

    python bench/pm_accuracy.py [--model embedded] [--train 256] [--eval 300] [--epochs 1]
                                [--batch-size 8] [--max-length 256] [--lr 1e-5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from constitutional.config import config_from_dict
from constitutional.models import resolve_model_name
from constitutional.records import append_records
from constitutional.rundir import RunDir
from constitutional.sources import load_preference_pairs
from constitutional.stages import pm

REPO = Path(__file__).resolve().parents[1]
HELPFUL = REPO.parent / "shared" / "data" / "hh-rlhf" / "helpful-base-test.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--train", type=int, default=256, help="training comparisons")
    parser.add_argument("--eval", type=int, default=300, help="held-out comparisons")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    pairs = load_preference_pairs(str(HELPFUL))
    pairs = [pair for pair in pairs if pair["chosen"].strip() != pair["rejected"].strip()]
    # Held out by conversation: the first human turn decides, so no conversation is on both sides.
    rng = random.Random(0)
    conversations = sorted({pair["history"][0][1] if pair["history"] else pair["prompt"] for pair in pairs})
    rng.shuffle(conversations)
    held_out_keys = set(conversations[: len(conversations) // 4])
    key = lambda pair: pair["history"][0][1] if pair["history"] else pair["prompt"]  # noqa: E731
    held_out = [row(pair, rng) for pair in pairs if key(pair) in held_out_keys][: args.eval]
    train = [row(pair, rng) for pair in pairs if key(pair) not in held_out_keys][: args.train]

    config = config_from_dict(
        {
            "seed": 0,
            "pm": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "learning_rate": args.lr,
                "save_steps": 10_000,
                "logging_steps": 10,
            },
        },  # fmt: skip
        base_dir=os.getcwd(),
    )
    work = Path(tempfile.mkdtemp(prefix="pm-accuracy-"))
    try:
        run = RunDir(work)
        append_records(run.path("pm_train"), train)
        append_records(run.path("pm_eval"), held_out)
        started = time.perf_counter()
        summary = pm.train(config.training, config.pm, config.seed, resolve_model_name(args.model, os.getcwd()), run)
        trained = time.perf_counter() - started
        report = pm.evaluate(config.pm, run, [], config.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = report["accuracy"]["human_helpfulness"]
    print(
        f"model {args.model}: trained on {summary['examples'] - summary['dropped_too_long']} HH-RLHF helpfulness "
        f"comparisons ({summary['dropped_too_long']} longer than {args.max_length} tokens left out), "
        f"{summary['steps']} steps in {trained / 60:.1f} min ({summary['train_tokens_per_s']} tok/s), "
        f"train_loss {summary['train_loss']:.4f}"
    )
    print(
        f"held-out accuracy on {result['comparisons']} comparisons: PM {result['pm']:.1%}, "
        f"length baseline {result['length_baseline']:.1%}, chance 50.0%; "
        f"ECE {report['calibration']['human_helpfulness']['ece']:.3f}"
    )
    print(json.dumps({"train": len(train), "minutes": round(trained / 60, 2), **result}))


def row(pair: dict, rng: random.Random) -> dict:
    chosen_first = rng.random() < 0.5
    first, second = (pair["chosen"], pair["rejected"]) if chosen_first else (pair["rejected"], pair["chosen"])
    return {
        "id": pair["id"], "source": "human_helpfulness", "prompt": pair["prompt"],
        "history": [{"role": role, "text": text} for role, text in pair["history"]],
        "response_a": first, "response_b": second, "p_a": 1.0 if chosen_first else 0.0,
    }  # fmt: skip


if __name__ == "__main__":
    main()
