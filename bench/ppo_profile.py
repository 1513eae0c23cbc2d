"""Benchmark: where a PPO step's seconds go, at the quickstart size, part by part.

Loads SL-CAI and the PM of a run where `sl` and `pm` have finished (e.g. `runs/quickstart` after
`make demo`) the way stage `rl` does (`rl.trainer.prepare`, the quickstart's `rl` settings, the
run's `training.precision`), then runs `--steps` PPO steps on a scratch copy and times each part:
the bf16 sampler's weight copy, sampling, the PM's scoring, the no-grad scoring of the rollout
(policy, value model, reference: the LoRA switch), and in the optimisation the policy and value
forwards, the backward pass, gradient clipping and the optimizer step. The first step is a warm-up
and is left out of the means. Nothing in the library is changed: the parts are timed by wrapping
the functions the trainer calls and by forward hooks on the two trained modules.

    python bench/ppo_profile.py RUN_DIR [--steps 4] [--precision auto]

Target (issue 20): the PPO optimisation step at >= 2x its fp32 speed (`bench/precision.py`); this
benchmark says which part to cut next.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECONDS: dict[str, list[float]] = defaultdict(list)  # part -> seconds, one entry per call


def timed(part: str, function):
    """`function`, adding its wall seconds to SECONDS[part] (a part named by the grad mode when part is None)."""
    import torch

    @functools.wraps(function)
    def inner(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            name = part if "{grad}" not in part else part.format(grad="train" if torch.is_grad_enabled() else "no-grad")
            SECONDS[name].append(time.perf_counter() - started)

    return inner


def instrument(accelerator, models, optimizer, reward_fn):
    """Wrap what a PPO step calls; returns the timed reward function."""
    from constitutional.rl import policy, rollout, trainer

    rollout.sync_sampler = timed("rollout: sampler weight copy", rollout.sync_sampler)
    trainer.generate = timed("rollout: sampling (copy included)", trainer.generate)
    trainer.reference_logprobs = timed("score rollout: reference forward", trainer.reference_logprobs)
    trainer.policy_outputs = timed("{grad}: policy + value forward", trainer.policy_outputs)
    policy.unwrapped(models.policy).forward = timed("{grad}: policy forward", policy.unwrapped(models.policy).forward)
    if models.value is not None:
        value = policy.unwrapped(models.value)
        value.forward = timed("{grad}: value forward", value.forward)
    accelerator.backward = timed("train: backward", accelerator.backward)
    accelerator.clip_grad_norm_ = timed("train: gradient clipping", accelerator.clip_grad_norm_)
    optimizer.step = timed("train: optimizer step", optimizer.step)
    return timed("scoring: PM", reward_fn)


def scratch_run(source: Path) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="ppo-profile-"))
    for name in ("data/critiques.jsonl", "models/sl-cai", "models/pm", "config.yaml"):
        target = scratch / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (source / name).is_dir() else shutil.copy)(source / name, target)
    return scratch


def profile(run_dir: Path, steps: int, precision: str) -> list[dict[str, float]]:
    """Per step: {part: seconds} (the step's own total under "step")."""
    from constitutional.config import load_config
    from constitutional.preference import PreferenceModel
    from constitutional.rl import ppo, trainer
    from constitutional.rundir import RunDir
    from constitutional.stages import rl
    from constitutional.training import trainer_arguments

    config = load_config(REPO / "configs" / "quickstart.yaml", [f"training.precision={precision}"])
    run = RunDir(run_dir)
    prompts = rl.split_prompts(config, config.rl, run)
    accelerator, models, optimizer = trainer.prepare(config.training, config.seed, config.rl, run)
    bf16 = trainer_arguments(config.training)["bf16"]
    reward = PreferenceModel.load(run.path("pm"), bf16=bf16, batch_size=config.rl.score_batch_size)
    reward_fn = instrument(accelerator, models, optimizer, reward.score)
    kl_control = ppo.FixedKLController(config.rl.kl_coef)
    per_step = []
    for step in range(steps):
        SECONDS.clear()
        batch = trainer.rollout_prompts(prompts["train"], config.rl.rollout_batch_size, step, config.seed)
        started = time.perf_counter()
        metrics = trainer.ppo_step(accelerator, models, optimizer, kl_control, config.rl, batch, step, config.seed,
                                   reward_fn)  # fmt: skip
        parts = {part: sum(values) for part, values in SECONDS.items()}
        parts["step"] = time.perf_counter() - started
        parts["answer tokens"] = metrics["response_length"] * len(batch)
        per_step.append(parts)
        print(f"step {step + 1}: {parts['step']:.1f} s", flush=True)
    return per_step


def report(per_step: list[dict[str, float]], precision: str) -> None:
    measured = per_step[1:] or per_step  # the first step warms up allocators and kernels
    parts = sorted({part for step in measured for part in step if part not in ("step", "answer tokens")})
    mean = {part: sum(step.get(part, 0.0) for step in measured) / len(measured) for part in parts}
    total = sum(step["step"] for step in measured) / len(measured)
    tokens = sum(step["answer tokens"] for step in measured) / len(measured)
    print(f"\nPPO step, precision {precision}, mean of steps 2..{len(per_step)}: {total:.2f} s, "
          f"{tokens:.0f} answer tokens per rollout batch")  # fmt: skip
    print(f"{'part':45s} {'seconds':>8s} {'share':>6s}")
    for part in parts:
        print(f"{part:45s} {mean[part]:8.2f} {mean[part] / total:6.1%}")
    print("('policy + value forward' holds the two forwards below it; the no-grad policy forward, the reference's)")
    from constitutional.memory import peak_rss_mb

    print(f"peak RSS of this process (models loaded, {len(per_step)} steps): {peak_rss_mb()} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    scratch = scratch_run(args.run_dir)
    try:
        report(profile(scratch, args.steps, args.precision), args.precision)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
