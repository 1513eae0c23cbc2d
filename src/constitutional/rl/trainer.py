"""The PPO loop of stage `rl` (paper step 9), on `accelerate`: the same code on a CPU, a GPU or a launch.

Each step samples answers to a batch of red-team and helpfulness prompts (`rollout.py`), scores them
with the PM (minus penalties for answers that never end and for empty or one-word ones), turns the
score into per-token rewards with a KL penalty to the reference, estimates advantages with GAE
against the value model, and takes `ppo_epochs` passes of clipped policy and value updates over
minibatches. Log-probabilities (the ratio and the KL) are taken at the sampling temperature. The
math is in `ppo.py`; the models, wrapped so their forward returns what PPO reads, in `policy.py`.

The policy and value model go through `accelerator.prepare`: under a DDP launch the wrapper
averages the gradients (each process rolls out its share of every batch), so every process takes
the same optimizer step and keeps identical weights.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from constitutional import trackers
from constitutional.errors import UserError, require, require_positive
from constitutional.records import append_records, conversation, read_records, write_records_atomic
from constitutional.resume import refuse_unloaded_random_states, refuse_unsafe_checkpoint
from constitutional.rl.held_out import RewardFn, compare_on_held_out, plot_curves
from constitutional.rl.policy import Models, causal_lm, encode, load_models, policy_outputs, reference_logprobs
from constitutional.rl.rollout import generate, rollout_prompts, short_answers
from constitutional.sections import runtime
from constitutional.seeding import rng_for, seed_for
from constitutional.training import LoraSettings, TrainingSettings, save_model_atomic, trainer_arguments

log = logging.getLogger(__name__)


@dataclass
class PolicyOptions:
    """What every algorithm of stage `rl` that trains from SL-CAI shares (config section `rl`)."""

    steps: int = 20  # PPO: rollout batches
    rollout_batch_size: int = 16  # prompts per rollout batch
    minibatch_size: int = 4
    learning_rate: float = 1e-5
    max_new_tokens: int = 64  # answers longer than this are cut (and penalised as never ending)
    temperature: float = 1.0
    kl_coef: float = 0.05  # beta of the per-token KL penalty to SL-CAI
    max_eval_prompts: int = 16
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(enabled=True))
    save_steps: int = runtime(5)
    score_batch_size: int = runtime(8)

    def validate_policy(self) -> None:
        for key in ("steps", "rollout_batch_size", "minibatch_size", "learning_rate", "max_new_tokens",
                    "temperature", "max_eval_prompts", "save_steps", "score_batch_size"):  # fmt: skip
            require_positive(f"rl.{key}", getattr(self, key))
        require(self.kl_coef >= 0, f"rl.kl_coef: expected 0 or more, got {self.kl_coef}")
        self.lora.check("rl.lora")


@dataclass
class PPOOptions(PolicyOptions):
    """PPO's own fields of config section `rl`."""

    ppo_epochs: int = 2  # passes over each rollout batch
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive_kl: bool = False  # Ziegler et al. 2019: move kl_coef towards kl_target
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    missing_eos_penalty: float = 1.0  # subtracted from the PM score of an answer that hits max_new_tokens
    # Reward hacks the paper's setting would not reward: an empty, blank or one-word answer (fewer
    # than min_answer_words words) loses empty_answer_penalty, as a never-ending one loses
    # missing_eos_penalty (an answer that is both loses both).
    empty_answer_penalty: float = 1.0
    min_answer_words: int = 2
    value_model: Literal["pm", "policy_head"] = "pm"  # PPO's critic: initialised from the PM, or a head on the policy
    max_grad_norm: float = 1.0

    def validate_ppo(self) -> None:
        for key in ("ppo_epochs", "kl_target", "kl_horizon", "max_grad_norm"):
            require_positive(f"rl.{key}", getattr(self, key))
        for key in ("clip_range", "value_clip_range", "vf_coef", "missing_eos_penalty", "empty_answer_penalty",
                    "min_answer_words"):  # fmt: skip
            require(getattr(self, key) >= 0, f"rl.{key}: expected 0 or more, got {getattr(self, key)}")
        require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "rl.gamma, rl.lam: expected numbers in [0, 1]")


def run_ppo(
    training: TrainingSettings, seed: int, options: PPOOptions, run_dir: Any, prompts: dict[str, list[dict[str, Any]]],
    reward_fn: RewardFn,
) -> dict[str, Any]:  # fmt: skip
    """The PPO loop: rollouts, scoring, advantages, clipped updates; checkpoints every `save_steps`.

    Args:
        training: the `training` section (device, precision, checkpointing, trackers).
        seed: the run seed.
        options: the `rl` section's PPO fields.
        run_dir: the run directory (SL-CAI and the PM are read from it; RL-CAI and the figures written).
        prompts: {"train": [...], "eval": [...]} prompt records, and optionally "held_out_source" (named in
            the summary).
        reward_fn: scores (conversation, response) pairs: the PM, or a known function in tests.

    Returns:
        The training summary (also saved next to the model); {} on every process but the first.
    """
    from constitutional.rl.ppo import AdaptiveKLController, FixedKLController

    accelerator, models, optimizer = prepare(training, seed, options, run_dir)
    kl_control = (
        AdaptiveKLController(options.kl_coef, options.kl_target, options.kl_horizon)
        if options.adaptive_kl
        else FixedKLController(options.kl_coef)
    )
    checkpoints, metrics_path, main = run_dir.checkpoints("rl"), run_dir.path("rl_metrics"), accelerator.is_main_process
    start = resume(accelerator, checkpoints, kl_control)
    if main:
        _keep_metrics_up_to(metrics_path, start)
    processes, rank = accelerator.num_processes, accelerator.process_index
    for step in range(start, options.steps):
        batch = rollout_prompts(prompts["train"], options.rollout_batch_size, step, seed)[rank::processes]
        metrics = ppo_step(accelerator, models, optimizer, kl_control, options, batch, step, seed, reward_fn)
        if main:
            append_records(metrics_path, [metrics])
            trackers.log_step(metrics, metrics["step"])
            log.info(
                "rl step %d/%d: reward %.3f, kl %.3f, entropy %.3f, value loss %.4f, clip %.3f, length %.1f",
                step + 1, options.steps, metrics["mean_reward"], metrics["kl"], metrics["entropy"],
                metrics["value_loss"], metrics["clip_fraction"], metrics["response_length"],
            )  # fmt: skip
        if (step + 1) % options.save_steps == 0 and step + 1 < options.steps:
            save_checkpoint(accelerator, checkpoints, step + 1, kl_control)
    if not main:  # the other processes of a launch only help train; process 0 evaluates and saves
        return {}
    return _finish(models, options, run_dir, prompts, seed, reward_fn, start, kl_control.value)


def prepare(training: TrainingSettings, seed: int, options: PPOOptions, run_dir: Any) -> tuple[Any, Models, Any]:
    """The accelerator, the models placed (DDP-wrapped under a launch) and their optimizer."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device_args = trainer_arguments(training)
    # Accelerate keeps one mixed-precision setting per process and refuses another; a Trainer's
    # arguments reset it before each Trainer, and so does rl (an earlier Accelerator in this process,
    # a notebook's or a test's, may have had another precision). The process group is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=device_args["use_cpu"], mixed_precision="bf16" if device_args["bf16"] else "no")
    models = load_models(
        run_dir, options.lora, options.value_model, seed, training.gradient_checkpointing, training.trust_remote_code,
        "cpu" if device_args["use_cpu"] else "cuda", bf16=device_args["bf16"],
    )  # fmt: skip
    trained = [models.policy] + ([models.value] if models.value is not None else [])
    parameters = [p for model in trained for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=options.learning_rate)
    *prepared, optimizer = accelerator.prepare(*trained, optimizer)
    models.policy = prepared[0]
    models.value = prepared[1] if models.value is not None else None
    if models.reference is not None:
        models.reference.to(accelerator.device)
    return accelerator, models, optimizer


def _finish(
    models: Models, options: PPOOptions, run_dir: Any, prompts: dict[str, Any], seed: int, reward_fn: RewardFn,
    start: int, kl_coef: float,
) -> dict[str, Any]:  # fmt: skip
    """Curves, the held-out comparison and the merged model, written by process 0."""
    history = read_records(run_dir.path("rl_metrics"))
    plot_curves(history, run_dir.path("rl_curves"))
    evaluation = compare_on_held_out(
        models, options.max_new_tokens, options.temperature, prompts["eval"][: options.max_eval_prompts], seed,
        reward_fn, run_dir.path("rl_samples"),
    )  # fmt: skip
    if "held_out_source" in prompts:  # where the held-out prompts came from (stages/rl.py, split_prompts)
        evaluation["held_out_source"] = prompts["held_out_source"]
    policy = causal_lm(models)
    merged = policy.merge_and_unload() if options.lora.enabled else policy
    summary = {
        "algorithm": "ppo",
        "steps": options.steps,
        "resumed_from_step": start,
        "final_kl": history[-1]["kl"] if history else None,
        "final_kl_coef": kl_coef,
        "final_mean_reward": history[-1]["mean_reward"] if history else None,
        **evaluation,
    }
    save_model_atomic(merged, models.tokenizer, run_dir.path("rl_cai"), summary)
    shutil.rmtree(run_dir.checkpoints("rl"), ignore_errors=True)
    return summary


# ----------------------------------------------------------------------------- one step


def ppo_step(
    accelerator: Any, models: Models, optimizer: Any, kl_control: Any, options: PPOOptions,
    prompts: list[dict[str, Any]], step: int, seed: int, reward_fn: RewardFn,
) -> dict[str, Any]:  # fmt: skip
    """One PPO iteration on one rollout batch (this process's share of it); returns the step's metrics."""
    started = time.perf_counter()
    experience, timings = collect_experience(accelerator, models, kl_control, options, prompts, step, seed, reward_fn)
    started = time.perf_counter()
    stats = optimise(accelerator, models, optimizer, options, experience, step, seed)
    timings["optimisation_s"] = time.perf_counter() - started
    from constitutional.rl.ppo import masked_mean

    mask = experience["batch"]["response_mask"]  # [B, R]
    sequence_kl = (experience["kl"] * mask).sum(dim=1)  # [B] KL of each whole answer, in nats
    # Every process has its share of the rollout batch: the figures (and so the KL controller,
    # which must move the same way everywhere) are means over all of them.
    means = across_processes(accelerator, {
        "mean_reward": experience["scores"].mean().item(),  # the PM's score, before penalties
        "mean_penalised_reward": experience["penalised"].mean().item(),
        "kl": sequence_kl.mean().item(),
        "mean_value": masked_mean(experience["old_values"], mask).item(),  # the critic's estimate, before updates
        **{name: sum(values) / len(values) for name, values in stats.items()},
        "response_length": mask.sum(dim=1).float().mean().item(),
        "truncated": float(sum(experience["truncated"])),
        "short_answers": float(sum(experience["short"])),
    })  # fmt: skip
    kl_control.update(means["kl"], len(prompts) * accelerator.num_processes)
    return {
        "step": step + 1,
        **{name: round(value, 3 if name == "response_length" else 6) for name, value in means.items()},
        "kl_coef": kl_control.value,
        "truncated": round(means["truncated"] * accelerator.num_processes),  # a count over all processes
        "short_answers": round(means["short_answers"] * accelerator.num_processes),
        **{name: round(seconds, 3) for name, seconds in timings.items()},
    }


def collect_experience(
    accelerator: Any, models: Models, kl_control: Any, options: PPOOptions, prompts: list[dict[str, Any]],
    step: int, seed: int, reward_fn: RewardFn,
) -> tuple[dict[str, Any], dict[str, float]]:  # fmt: skip
    """Roll out, score, and compute the old log-probabilities, values, rewards and advantages."""
    import torch

    from constitutional.rl import ppo

    timings, started = {}, time.perf_counter()
    conversations = [conversation(record) for record in prompts]
    seeds = [seed_for(seed, "rl", str(step), p["id"]) for p in prompts]
    rollout = generate(models, options.max_new_tokens, options.temperature, conversations, seeds)
    timings["rollout_s"] = time.perf_counter() - started
    started = time.perf_counter()
    scores = torch.tensor(reward_fn(conversations, rollout.texts), dtype=torch.float32)  # [B]
    short = short_answers(rollout.texts, options.min_answer_words)
    penalised = (
        scores
        - options.missing_eos_penalty * torch.tensor(rollout.truncated, dtype=torch.float32)
        - options.empty_answer_penalty * torch.tensor(short, dtype=torch.float32)
    )  # [B]
    timings["scoring_s"] = time.perf_counter() - started
    batch = encode(models.tokenizer, conversations, rollout.token_ids, accelerator.device)
    mask = batch["response_mask"]  # [B, R]
    old_logprobs, old_values, ref_logprobs = score_rollout(models, batch, options)  # [B, R] each
    rewards, kl = ppo.token_rewards(
        penalised.to(mask.device), old_logprobs, ref_logprobs, mask, kl_control.value, options.kl_estimator
    )
    if options.whiten_rewards:
        rewards = ppo.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = ppo.gae_advantages(rewards, old_values, mask, options.gamma, options.lam)
    experience = {
        "batch": batch, "old_logprobs": old_logprobs, "old_values": old_values, "kl": kl, "scores": scores,
        "penalised": penalised, "truncated": rollout.truncated, "short": short,
        "advantages": ppo.masked_whiten(advantages, mask), "returns": returns,
    }  # fmt: skip
    return experience, timings


def score_rollout(models: Models, batch: dict[str, Any], options: PPOOptions) -> tuple[Any, Any, Any]:
    """The policy's log-probabilities and values and the reference's log-probabilities of the rollout [B, R].

    A minibatch at a time, as `optimise` reads them: the logits over the whole vocabulary for every
    answer token of the whole rollout batch at once would be the step's largest tensors.
    """
    import torch

    parts: list[tuple[Any, Any, Any]] = []
    with torch.no_grad():
        for begin in range(0, len(batch["response_mask"]), options.minibatch_size):
            rows = slice(begin, begin + options.minibatch_size)
            part = {key: value[rows] for key, value in batch.items() if hasattr(value, "shape")}
            # At the sampling temperature: the distribution the answers were drawn from.
            logprobs, _, values = policy_outputs(models, part, temperature=options.temperature)
            parts.append((logprobs, values, reference_logprobs(models, part, options.temperature)))
    return tuple(torch.cat(column) for column in zip(*parts))


def optimise(
    accelerator: Any, models: Models, optimizer: Any, options: PPOOptions, experience: dict[str, Any], step: int,
    seed: int,
) -> dict[str, list[float]]:  # fmt: skip
    """`ppo_epochs` passes of clipped policy and value updates over shuffled minibatches."""
    import torch

    from constitutional.rl import ppo

    batch, mask = experience["batch"], experience["batch"]["response_mask"]
    stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "entropy": []}
    for model in (models.policy, models.value):
        if model is not None:
            model.train()
    order_rng = rng_for(seed, f"rl-minibatches:{step}")
    for _ in range(options.ppo_epochs):
        order = sorted(range(len(mask)), key=lambda i: order_rng.random())
        for begin in range(0, len(order), options.minibatch_size):
            rows = order[begin : begin + options.minibatch_size]
            part = {key: value[rows] for key, value in batch.items() if hasattr(value, "shape")}
            logprobs, entropy, values = policy_outputs(models, part, with_entropy=True, temperature=options.temperature)
            policy_loss, clipped = ppo.clipped_policy_loss(
                logprobs, experience["old_logprobs"][rows], experience["advantages"][rows], mask[rows],
                options.clip_range,
            )  # fmt: skip
            value_loss, _ = ppo.clipped_value_loss(
                values, experience["old_values"][rows], experience["returns"][rows], mask[rows],
                options.value_clip_range,
            )  # fmt: skip
            loss = policy_loss + options.vf_coef * value_loss
            if not torch.isfinite(loss):
                raise UserError(
                    f"rl step {step + 1}: the loss is not finite ({loss.item()}); the last checkpoint is kept"
                )
            optimizer.zero_grad()
            accelerator.backward(loss)  # under DDP the wrappers average the gradients over the processes
            accelerator.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                        options.max_grad_norm)  # fmt: skip
            optimizer.step()
            for name, value in zip(stats, (policy_loss, value_loss, clipped, entropy)):
                stats[name].append(value.item())
    return stats


def across_processes(accelerator: Any, values: dict[str, float]) -> dict[str, float]:
    """Each value's mean over the processes of a launch (the values themselves in one process)."""
    if accelerator.num_processes == 1:
        return values
    import torch

    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=accelerator.device)
    return dict(zip(values, accelerator.reduce(stacked, reduction="mean").tolist()))


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(accelerator: Any, directory: Path, step: int, kl_control: Any) -> None:
    """Models, optimizer and RNG state (accelerate), then `state.json` last: present means complete.

    Every process of a launch takes part (each saves its RNG state); process 0 writes the rest.
    """
    target = directory / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(target, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(target), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = json.dumps({"step": step, "kl_coef": kl_control.value}) + "\n"
        (target / "state.json").write_text(state, encoding="utf-8")
        for older in directory.glob("step-*"):
            if older != target:
                shutil.rmtree(older, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume(accelerator: Any, directory: Path, kl_control: Any) -> int:
    """Load the newest complete checkpoint, if any; returns the step to continue from (0 to start)."""
    complete = sorted(
        (path for path in directory.glob("step-*") if (path / "state.json").exists()),
        key=lambda path: int(path.name.split("-")[1]),
    )
    if not complete:
        return 0
    state = json.loads((complete[-1] / "state.json").read_text(encoding="utf-8"))
    with refuse_unsafe_checkpoint("rl", complete[-1]), refuse_unloaded_random_states("rl", complete[-1]):
        accelerator.load_state(str(complete[-1]))
    kl_control.value = state["kl_coef"]
    log.info("rl: resuming from %s", complete[-1])
    return int(state["step"])


def _keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop metric lines after `step` (written by a run that stopped before its next checkpoint)."""
    if not path.exists():
        return
    write_records_atomic(path, [row for row in read_records(path, repair=True) if row["step"] <= step])
