"""Stage `rl` (paper step 9): reinforcement learning from SL-CAI against the preference model -> RL-CAI.

`rl.algorithm: ppo` (the paper's): the policy starts from SL-CAI and the reference policy is SL-CAI,
frozen (with LoRA, the same weights with the adapters switched off, so there is no second copy).
Each step samples answers to a batch of red-team and helpfulness prompts through the back-end
generation interface (one seed per row, so a rollout batch is reproducible), scores them with the
PM (minus a penalty for answers that never end), turns the score into per-token rewards with a KL
penalty to the reference, estimates advantages with GAE against a value model initialised from the
PM, and takes `ppo_epochs` passes of clipped policy and value updates over minibatches. The math is
in `rl/ppo.py`; this module is the loop, on `accelerate`, so the same code runs on a CPU or GPUs.

`rl.algorithm: dpo`: offline DPO on the AI labels with TRL's `DPOTrainer` (the recipe of Hugging
Face's CAI reproduction): each soft label becomes a (chosen, rejected) pair, near-ties dropped.

Outputs: `models/rl-cai/` (the policy, LoRA merged, safetensors), `data/rl_prompts.jsonl` (the
prompts and their train/held-out split), `eval/rl_metrics.jsonl` (one line per step), `eval/rl_curves.png`,
`eval/rl_samples.jsonl` (SL-CAI and RL-CAI answers to held-out prompts, with their PM scores).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from constitutional.backends import SamplingParams
from constitutional.distributed import is_main_process, main_process_first, sharding_strategy, world_size
from constitutional.errors import UserError, require, require_positive
from constitutional.models import load_tokenizer, resolve_model_name
from constitutional.preference import PreferenceModel
from constitutional.prompts import STOP_STRINGS, Turn, render_plain, trim_at_turn_marker
from constitutional.records import (
    append_records,
    conversation,
    read_ai_labels,
    read_critiques,
    read_records,
    write_records_atomic,
)
from constitutional.rundir import ARTEFACTS, RunDir
from constitutional.sections import CoreConfig, runtime
from constitutional.seeding import rng_for, seed_for
from constitutional.training import (
    SUMMARY,
    LoraSettings,
    TrainingSettings,
    check_launch,
    is_complete_model,
    save_model_atomic,
    save_trained_model,
    trainer_arguments,
)

log = logging.getLogger(__name__)

NAME = "rl"
CONFIG_KEYS = ("seed", "training.precision")
RewardFn = Callable[[Sequence[Sequence[Turn]], Sequence[str]], list[float]]


@dataclass
class Settings:
    """Config section `rl` (paper step 9)."""

    algorithm: Literal["ppo", "rloo", "grpo", "dpo"] = "ppo"
    steps: int = 20  # PPO: rollout batches
    rollout_batch_size: int = 16  # prompts per rollout batch
    ppo_epochs: int = 2  # passes over each rollout batch
    minibatch_size: int = 4
    learning_rate: float = 1e-5
    max_new_tokens: int = 64  # answers longer than this are cut (and penalised as never ending)
    temperature: float = 1.0
    kl_coef: float = 0.05  # beta of the per-token KL penalty to SL-CAI
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
    value_model: Literal["pm", "policy_head"] = "pm"  # PPO's critic: initialised from the PM, or a head on the policy
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.1  # prompts held out for the SL-CAI vs RL-CAI comparison
    max_eval_prompts: int = 16
    group_size: int = 4  # rloo, grpo: answers sampled per prompt (rollout_batch_size must be a multiple)
    dpo_beta: float = 0.1
    dpo_margin: float = 0.1  # DPO: labels with |p_a - 0.5| below this are near-ties, dropped
    dpo_epochs: float = 1.0
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(enabled=True))
    save_steps: int = runtime(5)
    score_batch_size: int = runtime(8)

    def validate(self) -> None:
        for key in ("steps", "rollout_batch_size", "ppo_epochs", "minibatch_size", "learning_rate", "max_new_tokens",
                    "temperature", "kl_target", "kl_horizon", "max_grad_norm", "max_eval_prompts", "dpo_beta",
                    "dpo_epochs", "save_steps", "score_batch_size"):  # fmt: skip
            require_positive(f"rl.{key}", getattr(self, key))
        for key in ("kl_coef", "clip_range", "value_clip_range", "vf_coef", "missing_eos_penalty"):
            require(getattr(self, key) >= 0, f"rl.{key}: expected 0 or more, got {getattr(self, key)}")
        require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "rl.gamma, rl.lam: expected numbers in [0, 1]")
        require(0 < self.eval_fraction < 1, f"rl.eval_fraction: expected a number in (0, 1), got {self.eval_fraction}")
        require(0 <= self.dpo_margin < 0.5, f"rl.dpo_margin: expected a number in [0, 0.5), got {self.dpo_margin}")
        require(self.group_size >= 2, f"rl.group_size: expected 2 or more, got {self.group_size}")
        if self.algorithm in ("rloo", "grpo"):
            require(
                self.rollout_batch_size % self.group_size == 0,
                f"rl.rollout_batch_size: expected a multiple of rl.group_size ({self.group_size}) "
                f"for {self.algorithm}, got {self.rollout_batch_size}",
            )
        self.lora.check("rl.lora")


def reads(config: CoreConfig, settings: Settings) -> list[str]:
    """PPO, RLOO, GRPO: the prompts (critiques), SL-CAI and the PM; DPO: the AI labels and SL-CAI."""
    return ["ai_labels", "sl_cai"] if settings.algorithm == "dpo" else ["critiques", "sl_cai", "pm"]


def check(config: CoreConfig, settings: Settings) -> None:
    """Nothing outside the run directory (SL-CAI and the PM are this run's own); what the launch allows.

    Raises:
        UserError: under a multi-process launch, a rollout batch that does not split evenly over
            the processes, or a sharded strategy for PPO, RLOO or GRPO (each process samples with
            whole models); LoRA merging under a sharded launch.
    """
    processes = world_size()
    if processes > 1 and settings.algorithm != "dpo":
        share = settings.rollout_batch_size // processes
        smallest = settings.minibatch_size if settings.algorithm == "ppo" else 1
        if settings.rollout_batch_size % processes or share < smallest:
            raise UserError(
                f"rl.rollout_batch_size: {settings.rollout_batch_size} do not split into {processes} equal "
                f"shares of at least {smallest}{' (rl.minibatch_size)' if smallest > 1 else ''} for this launch's "
                "processes"
            )
        if sharding_strategy():
            raise UserError(
                f"rl.algorithm: {settings.algorithm} keeps whole models in every process (it samples with them); "
                f"launch it with DDP, not {sharding_strategy()}"
            )
    check_launch(NAME, merge_lora=settings.lora.enabled)


def input_hashes(inputs: None) -> dict[str, str]:
    return {}


def run(config: CoreConfig, settings: Settings, run_dir: RunDir, inputs: None) -> dict[str, Any]:
    """Train RL-CAI with the configured algorithm, resuming from the last complete checkpoint.

    Returns:
        Counts for the manifest: which algorithm ran, steps, final KL, held-out rewards.
    """
    for artefact in reads(config, settings):  # also when called directly, outside the pipeline's check
        if not run_dir.path(artefact).exists():
            maker = ARTEFACTS[artefact].made_by
            raise UserError(
                f"{run_dir.path(artefact)}: not found; make it with `cai run CONFIG --stages {maker}` first"
            )
    output = run_dir.path("rl_cai")
    if is_complete_model(output):
        log.info("rl: %s already exists, not training again", output)
        return json.loads((output / SUMMARY).read_text(encoding="utf-8"))
    if settings.algorithm == "dpo":
        return run_dpo(config, settings, run_dir)
    with main_process_first():  # under a launch: written once, then read by every process
        prompts = split_prompts(run_dir, settings, config.seed)
    device = "cpu" if trainer_arguments(config.training)["use_cpu"] else "cuda"
    reward_model = PreferenceModel.load(run_dir.path("pm"), device=device, batch_size=settings.score_batch_size)
    if settings.algorithm in ("rloo", "grpo"):
        return run_group(config, settings, run_dir, prompts, reward_model)
    return run_ppo(config, settings, run_dir, prompts, reward_model.score)


# ----------------------------------------------------------------------------- prompts


def split_prompts(run_dir: RunDir, settings: Settings, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Red-team and helpfulness prompts (as in the paper), split by a seeded hash; kept in `rl_prompts.jsonl`."""
    path = run_dir.path("rl_prompts")
    if not path.exists():
        records = read_critiques(run_dir.path("critiques"))
        rows = []
        for record in records:
            held_out = rng_for(seed, "rl-split:" + record["id"]).random() < settings.eval_fraction
            row = {"id": record["id"], "kind": record["kind"], "prompt": record["prompt"]}
            if record.get("history"):
                row["history"] = record["history"]
            rows.append({**row, "split": "eval" if held_out else "train"})
        if not any(row["split"] == "eval" for row in rows) and len(rows) > 1:
            rows[-1]["split"] = "eval"  # a tiny prompt set still gets one held-out prompt
        write_records_atomic(path, rows)
    rows = read_records(path)
    split = {"train": [r for r in rows if r["split"] == "train"], "eval": [r for r in rows if r["split"] == "eval"]}
    if not split["train"]:
        raise UserError(f"{path}: no training prompts (the critiques file holds {len(rows)} prompts)")
    return split


# ----------------------------------------------------------------------------- PPO


@dataclass
class Models:
    """What PPO trains and reads: the policy (LoRA on SL-CAI), its reference, and the value model."""

    policy: Any
    value: Any  # the PM-initialised value model, or (value_model: policy_head) a linear head on the policy
    tokenizer: Any
    reference: Any | None  # None: the policy with its adapters switched off
    value_on_policy: bool = False
    sampler: Any | None = None  # a bf16 copy of the policy for rollouts, where the hardware has native bf16


def load_models(training: TrainingSettings, settings: Settings, run_dir: RunDir, seed: int) -> Models:
    """SL-CAI as the policy (LoRA when `rl.lora.enabled`); the value model from the PM, or a head on the policy."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    from constitutional.backends.transformers import choose_dtype

    set_seed(seed)
    sl_cai = resolve_model_name(str(run_dir.path("sl_cai").resolve()))
    tokenizer = load_tokenizer(sl_cai, training.trust_remote_code)
    policy = AutoModelForCausalLM.from_pretrained(str(run_dir.path("sl_cai")), dtype=torch.float32)
    on_policy = settings.value_model == "policy_head"
    if on_policy:
        # A fresh linear value head on the policy's last hidden state; it shares the policy's body.
        value = torch.nn.Linear(policy.config.get_text_config().hidden_size, 1)
        torch.nn.init.zeros_(value.weight)
        torch.nn.init.zeros_(value.bias)
    else:
        value = AutoModelForSequenceClassification.from_pretrained(str(run_dir.path("pm")), dtype=torch.float32)
        value.config.pad_token_id = tokenizer.pad_token_id
    if training.gradient_checkpointing:
        # Non-reentrant: it needs no gradient on the inputs, which LoRA's frozen embeddings lack.
        policy.activation_checkpointing_enable({"use_reentrant": False})
    reference = None
    if settings.lora.enabled:
        from peft import get_peft_model

        policy = get_peft_model(policy, settings.lora.peft_config("CAUSAL_LM"))
        if not on_policy:
            value = get_peft_model(value, settings.lora.peft_config("SEQ_CLS"))
    else:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    sampler = None
    if choose_dtype("auto", "cpu" if trainer_arguments(training)["use_cpu"] else "cuda") == torch.bfloat16:
        sampler = AutoModelForCausalLM.from_pretrained(str(run_dir.path("sl_cai")), dtype=torch.bfloat16).eval()
    return Models(policy, value, tokenizer, reference, on_policy, sampler)


def run_ppo(
    config: CoreConfig,
    settings: Settings,
    run_dir: RunDir,
    prompts: dict[str, list[dict[str, Any]]],
    reward_fn: RewardFn,
) -> dict[str, Any]:
    """The PPO loop: rollouts, scoring, advantages, clipped updates; checkpoints every `save_steps`.

    Args:
        config: the run's config (seed, training).
        settings: the `rl` section.
        run_dir: the run directory.
        prompts: {"train": [...], "eval": [...]} prompt records.
        reward_fn: scores (conversation, response) pairs: the PM, or a known function in tests.

    Returns:
        The training summary (also saved next to the model).
    """
    import torch
    from accelerate import Accelerator

    from constitutional.rl.ppo import AdaptiveKLController, FixedKLController

    device_args = trainer_arguments(config.training)
    accelerator = Accelerator(cpu=device_args["use_cpu"], mixed_precision="bf16" if device_args["bf16"] else "no")
    models = load_models(config.training, settings, run_dir, config.seed)
    parameters = [p for model in (models.policy, models.value) for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate)
    # Placed and registered for checkpoints, never DDP-wrapped: PPO reads the value model's hidden
    # states directly, past its forward, which a wrapper would not synchronise. Under a launch of
    # several processes each takes its share of every rollout batch and the gradients are averaged
    # by hand (`average_gradients`), so every process keeps identical weights.
    models.policy = accelerator.prepare_model(models.policy, evaluation_mode=True)
    models.value = accelerator.prepare_model(models.value, evaluation_mode=True)
    optimizer = accelerator.prepare(optimizer)
    if models.reference is not None:
        models.reference.to(accelerator.device)
    processes, rank = accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    kl_control = (
        AdaptiveKLController(settings.kl_coef, settings.kl_target, settings.kl_horizon)
        if settings.adaptive_kl
        else FixedKLController(settings.kl_coef)
    )
    checkpoints = run_dir.checkpoints(NAME)
    start = resume(accelerator, checkpoints, kl_control)
    metrics_path = run_dir.path("rl_metrics")
    if main:
        _keep_metrics_up_to(metrics_path, start)
    tracker = open_tracker(config.training.report_to if main else "none", run_dir.path("rl_tensorboard"))
    for step in range(start, settings.steps):
        batch = _rollout_prompts(prompts["train"], settings.rollout_batch_size, step, config.seed)[rank::processes]
        metrics = ppo_step(accelerator, models, optimizer, kl_control, settings, batch, step, config.seed, reward_fn)
        if main:
            append_records(metrics_path, [metrics])
            tracker(metrics)
            log.info(
                "rl step %d/%d: reward %.3f, kl %.3f, entropy %.3f, value loss %.4f, clip %.3f, length %.1f",
                step + 1, settings.steps, metrics["mean_reward"], metrics["kl"], metrics["entropy"],
                metrics["value_loss"], metrics["clip_fraction"], metrics["response_length"],
            )  # fmt: skip
        if (step + 1) % settings.save_steps == 0 and step + 1 < settings.steps:
            save_checkpoint(accelerator, checkpoints, step + 1, kl_control)
    if not main:  # the other processes of a launch only help train; process 0 evaluates and saves
        return {}
    history = read_records(metrics_path)
    plot_curves(history, run_dir.path("rl_curves"))
    evaluation = compare_on_held_out(models, settings, prompts["eval"], config.seed, reward_fn, run_dir)
    policy = accelerator.unwrap_model(models.policy)
    merged = policy.merge_and_unload() if settings.lora.enabled else policy
    summary = {
        "algorithm": "ppo",
        "steps": settings.steps,
        "resumed_from_step": start,
        "final_kl": history[-1]["kl"] if history else None,
        "final_kl_coef": kl_control.value,
        "final_mean_reward": history[-1]["mean_reward"] if history else None,
        **evaluation,
    }
    save_model_atomic(merged, models.tokenizer, run_dir.path("rl_cai"), summary)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return summary


def open_tracker(report_to: str, log_dir: Path) -> Callable[[dict[str, Any]], None]:
    """A function that logs one step's metrics to TensorBoard or W&B (`training.report_to`), or does nothing."""
    if report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(log_dir))

        def to_tensorboard(metrics: dict[str, Any]) -> None:
            for name, value in metrics.items():
                if name != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(f"rl/{name}", value, metrics["step"])
            writer.flush()

        return to_tensorboard
    if report_to == "wandb":
        import wandb

        wandb.init(project="constitutional", job_type="rl", resume="allow")
        return lambda metrics: wandb.log(
            {f"rl/{k}": v for k, v in metrics.items() if k != "step"}, step=metrics["step"]
        )
    return lambda metrics: None


def _rollout_prompts(train: list[dict[str, Any]], size: int, step: int, seed: int) -> list[dict[str, Any]]:
    """The prompts of one rollout batch: a seeded shuffle of the training prompts per pass, cycled."""
    order = sorted(
        range(len(train)), key=lambda i: rng_for(seed, f"rl-order:{(step * size) // len(train)}:{i}").random()
    )
    offset = (step * size) % len(train)
    return [train[order[(offset + i) % len(train)]] for i in range(size)]


def ppo_step(
    accelerator: Any, models: Models, optimizer: Any, kl_control: Any, settings: Settings,
    prompts: list[dict[str, Any]], step: int, seed: int, reward_fn: RewardFn,
) -> dict[str, Any]:  # fmt: skip
    """One PPO iteration on one rollout batch; returns the step's metrics."""
    import torch

    from constitutional.rl import ppo

    timings = {}
    started = time.perf_counter()
    conversations = [conversation(record) for record in prompts]
    seeds = [seed_for(seed, "rl", str(step), p["id"]) for p in prompts]
    rollout = generate(models, settings, conversations, seeds)
    timings["rollout_s"] = time.perf_counter() - started

    started = time.perf_counter()
    scores = torch.tensor(reward_fn(conversations, rollout.texts), dtype=torch.float32)  # [B]
    penalised = scores - settings.missing_eos_penalty * torch.tensor(rollout.truncated, dtype=torch.float32)  # [B]
    timings["scoring_s"] = time.perf_counter() - started

    started = time.perf_counter()
    batch = encode(models.tokenizer, conversations, rollout.token_ids, accelerator.device)
    mask = batch["response_mask"]  # [B, R]
    with torch.no_grad():
        old_logprobs = response_logprobs(models.policy, batch)  # [B, R]
        ref_logprobs = reference_logprobs(models, batch)  # [B, R]
        old_values = response_values(models, batch)  # [B, R]
    rewards, kl = ppo.token_rewards(
        penalised.to(mask.device), old_logprobs, ref_logprobs, mask, kl_control.value, settings.kl_estimator
    )
    if settings.whiten_rewards:
        rewards = ppo.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = ppo.gae_advantages(rewards, old_values, mask, settings.gamma, settings.lam)
    advantages = ppo.masked_whiten(advantages, mask)

    stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "entropy": []}
    models.policy.train()
    models.value.train()
    order_rng = rng_for(seed, f"rl-minibatches:{step}")
    for _ in range(settings.ppo_epochs):
        order = sorted(range(len(prompts)), key=lambda i: order_rng.random())
        for begin in range(0, len(order), settings.minibatch_size):
            rows = order[begin : begin + settings.minibatch_size]
            part = {key: value[rows] for key, value in batch.items() if hasattr(value, "shape")}
            part["prompt_width"] = batch["prompt_width"]
            logprobs, entropy = response_logprobs(models.policy, part, with_entropy=True)
            values = response_values(models, part)
            policy_loss, clipped = ppo.clipped_policy_loss(
                logprobs, old_logprobs[rows], advantages[rows], mask[rows], settings.clip_range
            )
            value_loss, _ = ppo.clipped_value_loss(
                values, old_values[rows], returns[rows], mask[rows], settings.value_clip_range
            )
            loss = policy_loss + settings.vf_coef * value_loss
            if not torch.isfinite(loss):
                raise UserError(
                    f"rl step {step + 1}: the loss is not finite ({loss.item()}); the last checkpoint is kept"
                )
            optimizer.zero_grad()
            accelerator.backward(loss)
            average_gradients(accelerator, optimizer)
            accelerator.clip_grad_norm_(
                [p for group in optimizer.param_groups for p in group["params"]], settings.max_grad_norm
            )
            optimizer.step()
            stats["policy_loss"].append(policy_loss.item())
            stats["value_loss"].append(value_loss.item())
            stats["clip_fraction"].append(clipped.item())
            stats["entropy"].append(entropy.item())
    timings["optimisation_s"] = time.perf_counter() - started
    sequence_kl = (kl * mask).sum(dim=1)  # [B] KL of each whole answer, in nats
    # Every process has its share of the rollout batch: the figures (and so the KL controller,
    # which must move the same way everywhere) are means over all of them.
    means = across_processes(accelerator, {
        "mean_reward": scores.mean().item(),  # the PM's score, before penalties
        "mean_penalised_reward": penalised.mean().item(),
        "kl": sequence_kl.mean().item(),
        "mean_value": ppo.masked_mean(old_values, mask).item(),  # the critic's estimate, before updates
        **{name: sum(values) / len(values) for name, values in stats.items()},
        "response_length": mask.sum(dim=1).float().mean().item(),
        "truncated": float(sum(rollout.truncated)),
    })  # fmt: skip
    kl_control.update(means["kl"], len(prompts) * accelerator.num_processes)
    return {
        "step": step + 1,
        **{name: round(value, 3 if name == "response_length" else 6) for name, value in means.items()},
        "kl_coef": kl_control.value,
        "truncated": round(means["truncated"] * accelerator.num_processes),  # a count over all processes
        **{name: round(seconds, 3) for name, seconds in timings.items()},
    }


GRADIENT_BUCKET = 1 << 24  # elements per all-reduce (64 MB of fp32), as DDP's buckets are about that size


def average_gradients(accelerator: Any, optimizer: Any) -> None:
    """Average the trainable parameters' gradients over the processes of a launch (no-op in one process).

    Each process computed its gradients on its share of the minibatch; the mean is the gradient of
    the whole minibatch, and every process then takes the same optimizer step.
    """
    if accelerator.num_processes == 1:
        return
    import torch
    import torch.distributed as dist

    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    for parameter in parameters:
        if parameter.grad is None:  # unused in this minibatch here, maybe not elsewhere
            parameter.grad = torch.zeros_like(parameter)
    # Flattened into buckets of at most GRADIENT_BUCKET elements of one dtype and device: a few
    # large all-reduces instead of one per parameter, and never a second copy of all gradients.
    buckets: list[list[Any]] = []
    sizes: dict[tuple[Any, Any], int] = {}
    open_bucket: dict[tuple[Any, Any], list[Any]] = {}
    for parameter in parameters:
        kind, grad = (parameter.grad.dtype, parameter.grad.device), parameter.grad
        if kind not in open_bucket or sizes[kind] + grad.numel() > GRADIENT_BUCKET:
            open_bucket[kind], sizes[kind] = [], 0
            buckets.append(open_bucket[kind])
        open_bucket[kind].append(grad)
        sizes[kind] += grad.numel()
    for grads in buckets:
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= accelerator.num_processes
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def across_processes(accelerator: Any, values: dict[str, float]) -> dict[str, float]:
    """Each value's mean over the processes of a launch (the values themselves in one process)."""
    if accelerator.num_processes == 1:
        return values
    import torch

    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=accelerator.device)
    return dict(zip(values, accelerator.reduce(stacked, reduction="mean").tolist()))


@dataclass
class Rollout:
    """Sampled answers: their text, the token ids the policy sampled, and which never ended."""

    texts: list[str]
    token_ids: list[list[int]]  # end-of-sequence included where the answer ended
    truncated: list[bool]


def generate(
    models: Models, settings: Settings, conversations: list[list[Turn]], seeds: list[int], adapters: bool = True
) -> Rollout:
    """Sample answers through the back-end interface (batched, one seed per row).

    PPO trains on the tokens that were sampled. Where the text was cut (a stop string, or the model
    starting the next turn), the kept text is tokenised again and ended with end-of-sequence: the
    answer ended there.
    """
    import contextlib

    from constitutional.backends.transformers import TransformersBackend

    policy, tokenizer = models.policy, models.tokenizer
    switch_off = policy.disable_adapter() if not adapters and settings.lora.enabled else contextlib.nullcontext()
    policy.eval()
    if models.sampler is not None:
        sync_sampler(policy, models.sampler, settings.lora.enabled, merge=adapters)
        policy, switch_off = models.sampler, contextlib.nullcontext()
    backend = TransformersBackend(policy, tokenizer, "rl-policy", batch_size=len(conversations), share_prefix=False)
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, stop=STOP_STRINGS)
    with switch_off:
        raw = backend.generate([render_plain(turns, "assistant") for turns in conversations], params, seeds)
    texts, token_ids, truncated = [], [], []
    for text, ids in zip(raw, backend.last_token_ids):
        kept = trim_at_turn_marker(text)
        ended = bool(ids) and ids[-1] == tokenizer.eos_token_id
        if kept != tokenizer.decode(ids, skip_special_tokens=True).strip():
            ids = tokenizer(" " + kept, add_special_tokens=False)["input_ids"] if kept else []
            ended = True
        if ended and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        texts.append(kept)
        token_ids.append(ids or [tokenizer.eos_token_id])
        truncated.append(not ended)
    return Rollout(texts, token_ids, truncated)


def sync_sampler(policy: Any, sampler: Any, lora: bool, merge: bool = True) -> None:
    """Copy the policy's current weights (LoRA merged in when `merge`, else SL-CAI's) into the bf16 sampler.

    Sampling in bf16 is about twice as fast on hardware that has it; a copy per step costs well under
    a second. The log-probabilities PPO trains on are recomputed in the policy's own precision.
    """
    import torch

    with torch.no_grad():
        if lora and merge:
            policy.merge_adapter()
        source = policy.get_base_model() if lora else policy
        targets = dict(sampler.named_parameters())
        for name, parameter in source.named_parameters():
            if "lora_" in name:
                continue
            targets[name.replace(".base_layer", "")].copy_(parameter)
        if lora and merge:
            policy.unmerge_adapter()


def encode(tokenizer: Any, conversations: list[list[Turn]], answers: list[list[int]], device: Any) -> dict[str, Any]:
    """Prompts left-padded to width P, answers right-padded to width R, in one [B, P + R] batch.

    Every answer then starts at column P, so the logits that predict answer tokens are the last
    R + 1 positions of the model's output (minus the very last): the vocabulary head runs on those
    only.
    """
    import torch

    prompts = [tokenizer(render_plain(turns, "assistant"))["input_ids"] for turns in conversations]
    width_p, width_r = max(map(len, prompts)), max(map(len, answers))
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(prompts), width_p + width_r), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        input_ids[row, width_p - len(prompt) : width_p] = torch.tensor(prompt)
        input_ids[row, width_p : width_p + len(answer)] = torch.tensor(answer)
        attention[row, width_p - len(prompt) : width_p + len(answer)] = 1
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),  # [B, P + R]
        "attention_mask": attention.to(device),  # [B, P + R]
        "position_ids": position_ids.to(device),  # [B, P + R]
        "response_ids": input_ids[:, width_p:].to(device),  # [B, R]
        "response_mask": attention[:, width_p:].float().to(device),  # [B, R]
        "prompt_width": width_p,
    }


def response_logprobs(model: Any, batch: dict[str, Any], with_entropy: bool = False) -> Any:
    """Log-probabilities [B, R] of the answer tokens (and the mean entropy), the head applied to R positions only."""
    import torch

    from constitutional.rl.ppo import entropy_from_logits

    width_r = batch["response_ids"].shape[1]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        logits_to_keep=width_r + 1, use_cache=False,
    ).logits[:, :-1].float()  # fmt: skip  # [B, R, V]: position P-1+t predicts answer token t
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, batch["response_ids"].unsqueeze(-1)).squeeze(-1)  # [B, R]
    if not with_entropy:
        return logprobs
    with torch.no_grad():
        entropy = entropy_from_logits(logits, batch["response_mask"])
    return logprobs, entropy


def reference_logprobs(models: Models, batch: dict[str, Any]) -> Any:
    """The frozen SL-CAI's log-probabilities of the same tokens: the policy without its adapters."""
    if models.reference is not None:
        return response_logprobs(models.reference, batch)
    with models.policy.disable_adapter():
        return response_logprobs(models.policy, batch)


def response_values(models: Models, batch: dict[str, Any]) -> Any:
    """Values [B, R]: the value head on the hidden state that precedes each answer token."""
    width_r = batch["response_ids"].shape[1]
    if models.value_on_policy:
        hidden = models.policy(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
            output_hidden_states=True, logits_to_keep=1, use_cache=False,
        ).hidden_states[-1]  # fmt: skip  # [B, P + R, H]
        return models.value(hidden[:, -width_r - 1 : -1]).squeeze(-1).float()  # [B, R]
    value_model = models.value
    backbone = (
        value_model.base_model
        if not hasattr(value_model, "get_base_model")
        else value_model.get_base_model().base_model
    )
    head = value_model.score if not hasattr(value_model, "get_base_model") else value_model.get_base_model().score
    hidden = backbone(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        use_cache=False,
    )[0]  # fmt: skip  # [B, P + R, H]
    return head(hidden[:, -width_r - 1 : -1]).squeeze(-1).float()  # [B, R]


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
    accelerator.load_state(str(complete[-1]))
    kl_control.value = state["kl_coef"]
    log.info("rl: resuming from %s", complete[-1])
    return int(state["step"])


def _keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop metric lines after `step` (written by a run that stopped before its next checkpoint)."""
    if not path.exists():
        return
    write_records_atomic(path, [row for row in read_records(path, repair=True) if row["step"] <= step])


# ----------------------------------------------------------------------------- evaluation and plots


def compare_on_held_out(
    models: Models, settings: Settings, prompts: list[dict[str, Any]], seed: int, reward_fn: RewardFn, run_dir: RunDir
) -> dict[str, Any]:
    """Mean PM score of SL-CAI and RL-CAI answers to the held-out prompts (same seeds); samples saved."""
    prompts = prompts[: settings.max_eval_prompts]
    if not prompts:
        return {}
    conversations = [conversation(record) for record in prompts]
    seeds = [seed_for(seed, "rl-eval", record["id"]) for record in prompts]
    if models.reference is not None:
        reference = Models(models.reference, None, models.tokenizer, None)
        before = generate(reference, settings, conversations, seeds).texts
    else:
        before = generate(models, settings, conversations, seeds, adapters=False).texts
    after = generate(models, settings, conversations, seeds).texts
    scores_before, scores_after = reward_fn(conversations, before), reward_fn(conversations, after)
    samples = [
        {"id": record["id"], "kind": record["kind"], "prompt": record["prompt"], "sl_cai": a, "rl_cai": b,
         "sl_cai_score": round(sa, 4), "rl_cai_score": round(sb, 4)}
        for record, a, b, sa, sb in zip(prompts, before, after, scores_before, scores_after)
    ]  # fmt: skip
    write_records_atomic(run_dir.path("rl_samples"), samples)
    mean = lambda values: round(sum(values) / len(values), 4)  # noqa: E731
    return {"held_out_prompts": len(prompts), "held_out_reward_sl_cai": mean(scores_before),
            "held_out_reward_rl_cai": mean(scores_after)}  # fmt: skip


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


# ----------------------------------------------------------------------------- RLOO and GRPO


def run_group(
    config: CoreConfig, settings: Settings, run_dir: RunDir, prompts: dict[str, list[dict[str, Any]]],
    reward_model: PreferenceModel,
) -> dict[str, Any]:  # fmt: skip
    """RLOO or GRPO through TRL's trainers, the PM as the reward, a KL penalty to SL-CAI.

    Both sample `group_size` answers per prompt and use the group's other answers as the baseline
    instead of a value model. GRPO's own default KL coefficient is 0 (no reference model at all):
    not the paper's method, so `rl.kl_coef` (default 0.05) is passed as beta to both.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from constitutional.training import last_complete_checkpoint

    set_seed(config.seed)
    tokenizer = load_tokenizer(
        resolve_model_name(str(run_dir.path("sl_cai").resolve())), config.training.trust_remote_code
    )
    model = AutoModelForCausalLM.from_pretrained(str(run_dir.path("sl_cai")), dtype=torch.float32)

    def pm_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        # The prompts are plain transcripts ending in "Assistant:", as the PM reads them.
        return reward_model.score_transcripts(
            [prompt + " " + completion.strip() for prompt, completion in zip(prompts, completions)]
        )

    config_class, trainer_class = (
        (GRPOConfig, GRPOTrainer) if settings.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    )
    checkpoints = run_dir.checkpoints(NAME)
    args = config_class(
        output_dir=str(checkpoints), max_steps=settings.steps, learning_rate=settings.learning_rate,
        # Under a launch each process takes its share: the rollout batch stays rl.rollout_batch_size.
        per_device_train_batch_size=settings.rollout_batch_size // world_size(), num_generations=settings.group_size,
        max_completion_length=settings.max_new_tokens, temperature=settings.temperature, beta=settings.kl_coef,
        seed=config.seed, logging_steps=1, save_strategy="steps", save_steps=settings.save_steps, save_total_limit=1,
        disable_tqdm=False, **trainer_arguments(config.training),
    )  # fmt: skip
    dataset = Dataset.from_list([{"prompt": render_plain(conversation(row), "assistant")} for row in prompts["train"]])
    trainer = trainer_class(
        model=model, reward_funcs=pm_reward, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=settings.lora.peft_config("CAUSAL_LM"),
    )  # fmt: skip
    resume_from = last_complete_checkpoint(checkpoints)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if not is_main_process():  # the other processes of a launch only help train; process 0 evaluates and saves
        return {}
    history = [
        {"step": entry["step"], "mean_reward": entry.get("reward"), "kl": entry.get("kl"),
         "entropy": entry.get("entropy"), "response_length": entry.get("completions/mean_length"),
         **{key: value for key, value in entry.items() if isinstance(value, (int, float))}}
        for entry in trainer.state.log_history if "reward" in entry
    ]  # fmt: skip
    write_records_atomic(run_dir.path("rl_metrics"), history)
    plot_curves(
        [{name: row.get(name) or 0.0 for name in ("step", "mean_reward", "kl", "entropy", "response_length")}
         | {"value_loss": 0.0, "clip_fraction": row.get("clip_ratio/region_mean", 0.0) or 0.0} for row in history],
        run_dir.path("rl_curves"),
    )  # fmt: skip
    policy = trainer.model
    models = Models(
        policy,
        None,
        tokenizer,
        None if settings.lora.enabled else AutoModelForCausalLM.from_pretrained(str(run_dir.path("sl_cai"))),
    )
    evaluation = compare_on_held_out(models, settings, prompts["eval"], config.seed, reward_model.score, run_dir)
    merged = policy.merge_and_unload() if settings.lora.enabled else policy
    summary = {
        "algorithm": settings.algorithm, "steps": trainer.state.global_step, "kl_coef": settings.kl_coef,
        "final_kl": history[-1]["kl"] if history else None,
        "final_mean_reward": history[-1]["mean_reward"] if history else None, **evaluation,
    }  # fmt: skip
    save_model_atomic(merged, tokenizer, run_dir.path("rl_cai"), summary, trainer.state)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return summary


# ----------------------------------------------------------------------------- DPO


def dpo_pairs(labels: list[dict[str, Any]], margin: float) -> tuple[list[dict[str, str]], int]:
    """Soft labels -> (prompt, chosen, rejected); labels within `margin` of 0.5 are near-ties, dropped.

    Returns:
        The pairs in TRL's prompt/chosen/rejected format, and how many labels were dropped.
    """
    pairs, dropped = [], 0
    for label in labels:
        if abs(label["p_a"] - 0.5) < margin or math.isclose(label["p_a"], 0.5):
            dropped += 1
            continue
        better, worse = (
            (label["response_a"], label["response_b"])
            if label["p_a"] > 0.5
            else (label["response_b"], label["response_a"])
        )
        pairs.append({"prompt": render_plain(conversation(label), "assistant"), "chosen": " " + better.strip(),
                      "rejected": " " + worse.strip()})  # fmt: skip
    return pairs, dropped


def run_dpo(config: CoreConfig, settings: Settings, run_dir: RunDir) -> dict[str, Any]:
    """Offline DPO from SL-CAI on the AI labels (TRL's DPOTrainer; LoRA's disabled adapters are the reference)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    pairs, dropped = dpo_pairs(read_ai_labels(run_dir.path("ai_labels")), settings.dpo_margin)
    if not pairs:
        raise UserError(
            f"{run_dir.path('ai_labels')}: every label is within rl.dpo_margin of 0.5; nothing to learn from"
        )
    tokenizer = load_tokenizer(
        resolve_model_name(str(run_dir.path("sl_cai").resolve())), config.training.trust_remote_code
    )
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(str(run_dir.path("sl_cai")), dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(run_dir.checkpoints(NAME)), beta=settings.dpo_beta, learning_rate=settings.learning_rate,
        num_train_epochs=settings.dpo_epochs, per_device_train_batch_size=settings.minibatch_size,
        seed=config.seed, save_strategy="no", logging_steps=1, report_to=[], disable_tqdm=False,
        **{key: value for key, value in trainer_arguments(config.training).items() if key != "report_to"},
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
        peft_config=settings.lora.peft_config("CAUSAL_LM"),
    )  # fmt: skip
    result = trainer.train()
    summary = {"algorithm": "dpo", "pairs": len(pairs), "dropped_near_ties": dropped,
               "steps": trainer.state.global_step, "train_loss": round(result.training_loss, 6)}  # fmt: skip
    save_trained_model(trainer, tokenizer, run_dir.path("rl_cai"), summary, merge_lora=settings.lora.enabled)
    if is_main_process():
        shutil.rmtree(run_dir.checkpoints(NAME), ignore_errors=True)
    return summary
