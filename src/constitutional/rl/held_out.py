"""What every RL algorithm reports: SL-CAI vs RL-CAI on held-out prompts, training curves."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from constitutional.intervals import bootstrap_mean_interval
from constitutional.prompts import Turn
from constitutional.records import conversation, write_records_atomic
from constitutional.rl.policy import Models
from constitutional.rl.rollout import generate
from constitutional.seeding import seed_for

RewardFn = Callable[[Sequence[Sequence[Turn]], Sequence[str]], list[float]]


def compare_on_held_out(
    models: Models, max_new_tokens: int, temperature: float, prompts: list[dict[str, Any]], seed: int,
    reward_fn: RewardFn, samples_path: Path,
) -> dict[str, Any]:  # fmt: skip
    """Mean PM score of SL-CAI and RL-CAI answers to the held-out prompts (same seeds); samples saved.

    Args:
        models: the trained policy; SL-CAI is its reference (or the policy with adapters off).
        max_new_tokens, temperature: how answers are sampled (as in training).
        prompts: the held-out prompt records, already capped.
        seed: the run seed (one sampling seed per prompt derives from it).
        reward_fn: scores (conversation, answer) pairs.
        samples_path: where the answers and their scores are written (`eval/rl_samples.jsonl`).

    Returns:
        {held_out_prompts, held_out_reward_sl_cai, held_out_reward_rl_cai, held_out_reward_difference
        (RL-CAI minus SL-CAI, paired by prompt), held_out_reward_difference_ci95 (a 95% bootstrap
        interval over prompts)}, or {} without prompts. The PM is what RL optimised: the difference
        says whether RL moved its own reward on prompts it never saw, not whether the model got better.
    """
    if not prompts:
        return {}
    conversations = [conversation(record) for record in prompts]
    seeds = [seed_for(seed, "rl-eval", record["id"]) for record in prompts]
    if models.reference is not None:
        reference = Models(models.reference, None, models.tokenizer, None)
        before = generate(reference, max_new_tokens, temperature, conversations, seeds).texts
    else:
        before = generate(models, max_new_tokens, temperature, conversations, seeds, adapters=False).texts
    after = generate(models, max_new_tokens, temperature, conversations, seeds).texts
    scores_before, scores_after = reward_fn(conversations, before), reward_fn(conversations, after)
    samples = [
        {"id": record["id"], "kind": record["kind"], "prompt": record["prompt"], "sl_cai": a, "rl_cai": b,
         "sl_cai_score": round(sa, 4), "rl_cai_score": round(sb, 4)}
        for record, a, b, sa, sb in zip(prompts, before, after, scores_before, scores_after)
    ]  # fmt: skip
    write_records_atomic(samples_path, samples)
    mean = lambda values: round(sum(values) / len(values), 4)  # noqa: E731
    differences = [after - before for before, after in zip(scores_before, scores_after)]
    low, high = bootstrap_mean_interval(differences, seed=seed)
    return {"held_out_prompts": len(prompts), "held_out_reward_sl_cai": mean(scores_before),
            "held_out_reward_rl_cai": mean(scores_after), "held_out_reward_difference": mean(differences),
            "held_out_reward_difference_ci95": [round(low, 4), round(high, 4)]}  # fmt: skip


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Reward, KL, entropy, value loss, clip fraction and answer length per step, one panel each."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["mean_reward", "kl", "entropy", "value_loss", "clip_fraction", "response_length"]
    figure, axes = plt.subplots(2, 3, figsize=(11, 6))
    steps = [row["step"] for row in history]
    for axis, name in zip(axes.flat, panels):
        axis.plot(steps, [row[name] for row in history], marker=".")
        axis.set_title(name.replace("_", " "))
        axis.set_xlabel("PPO step")
    figure.suptitle("RL-CAI training (PPO against the preference model)")
    figure.tight_layout()
    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
