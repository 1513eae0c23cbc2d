"""Stage `rl`'s algorithms that TRL implements: RLOO and GRPO (online, a group baseline) and DPO (offline).

RLOO and GRPO sample `group_size` answers per prompt and use the group's other answers as the
baseline instead of a value model. DPO trains on the AI labels directly (the recipe of Hugging
Face's CAI reproduction): each soft label becomes a (chosen, rejected) pair, near-ties dropped.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from typing import Any

from constitutional.distributed import is_main_process, world_size
from constitutional.errors import UserError, require, require_positive
from constitutional.models import load_tokenizer, resolve_model_name
from constitutional.preference import PreferenceModel
from constitutional.prompts import render_plain
from constitutional.records import conversation, read_ai_labels, write_records_atomic
from constitutional.rl.held_out import compare_on_held_out, plot_curves
from constitutional.rl.policy import Models, PolicyModule
from constitutional.rl.trainer import PolicyOptions
from constitutional.training import (
    TrainingSettings,
    last_complete_checkpoint,
    save_model_atomic,
    save_trained_model,
    trainer_arguments,
)


@dataclass
class GroupOptions(PolicyOptions):
    """RLOO's and GRPO's own field of config section `rl`."""

    group_size: int = 4  # answers sampled per prompt (rollout_batch_size must be a multiple)

    def validate_group(self, algorithm: str) -> None:
        require(self.group_size >= 2, f"rl.group_size: expected 2 or more, got {self.group_size}")
        if algorithm in ("rloo", "grpo"):
            require(
                self.rollout_batch_size % self.group_size == 0,
                f"rl.rollout_batch_size: expected a multiple of rl.group_size ({self.group_size}) "
                f"for {algorithm}, got {self.rollout_batch_size}",
            )


@dataclass
class DPOOptions(PolicyOptions):
    """DPO's own fields of config section `rl` (it also uses minibatch_size, learning_rate and lora)."""

    dpo_beta: float = 0.1
    dpo_margin: float = 0.1  # DPO: labels with |p_a - 0.5| below this are near-ties, dropped
    dpo_epochs: float = 1.0

    def validate_dpo(self) -> None:
        for key in ("dpo_beta", "dpo_epochs"):
            require_positive(f"rl.{key}", getattr(self, key))
        require(0 <= self.dpo_margin < 0.5, f"rl.dpo_margin: expected a number in [0, 0.5), got {self.dpo_margin}")


# ----------------------------------------------------------------------------- RLOO and GRPO


def run_group(
    training: TrainingSettings, seed: int, algorithm: str, options: GroupOptions, run_dir: Any,
    prompts: dict[str, list[dict[str, Any]]], reward_model: PreferenceModel,
) -> dict[str, Any]:  # fmt: skip
    """RLOO or GRPO through TRL's trainers, the PM as the reward, a KL penalty to SL-CAI.

    GRPO's own default KL coefficient is 0 (no reference model at all): not the paper's method, so
    `rl.kl_coef` (default 0.05) is passed as beta to both.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(seed)
    sl_cai = run_dir.path("sl_cai")
    tokenizer = load_tokenizer(resolve_model_name(str(sl_cai.resolve())), training.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(str(sl_cai), dtype=torch.float32)

    def pm_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        # The prompts are plain transcripts ending in "Assistant:", as the PM reads them.
        return reward_model.score_transcripts(
            [prompt + " " + completion.strip() for prompt, completion in zip(prompts, completions)]
        )

    dataset = Dataset.from_list([{"prompt": render_plain(conversation(row), "assistant")} for row in prompts["train"]])
    trainer = _group_trainer(training, seed, algorithm, options, run_dir, model, tokenizer, pm_reward, dataset)
    resume_from = last_complete_checkpoint(run_dir.checkpoints("rl"))
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if not is_main_process():  # the other processes of a launch only help train; process 0 evaluates and saves
        return {}
    history = _group_history(trainer.state.log_history)
    write_records_atomic(run_dir.path("rl_metrics"), history)
    plot_curves(
        [{name: row.get(name) or 0.0 for name in ("step", "mean_reward", "kl", "entropy", "response_length")}
         | {"value_loss": 0.0, "clip_fraction": row.get("clip_ratio/region_mean", 0.0) or 0.0} for row in history],
        run_dir.path("rl_curves"),
    )  # fmt: skip
    policy = trainer.model
    reference = None if options.lora.enabled else PolicyModule(AutoModelForCausalLM.from_pretrained(str(sl_cai)))
    models = Models(PolicyModule(policy), None, tokenizer, reference, options.lora.enabled)
    evaluation = compare_on_held_out(
        models, options.max_new_tokens, options.temperature, prompts["eval"][: options.max_eval_prompts], seed,
        reward_model.score, run_dir.path("rl_samples"),
    )  # fmt: skip
    summary = {
        "algorithm": algorithm, "steps": trainer.state.global_step, "kl_coef": options.kl_coef,
        "final_kl": history[-1]["kl"] if history else None,
        "final_mean_reward": history[-1]["mean_reward"] if history else None, **evaluation,
    }  # fmt: skip
    merged = policy.merge_and_unload() if options.lora.enabled else policy
    save_model_atomic(merged, tokenizer, run_dir.path("rl_cai"), summary, trainer.state)
    shutil.rmtree(run_dir.checkpoints("rl"), ignore_errors=True)
    return summary


def _group_trainer(
    training: TrainingSettings, seed: int, algorithm: str, options: GroupOptions, run_dir: Any, model: Any,
    tokenizer: Any, reward: Any, dataset: Any,
) -> Any:  # fmt: skip
    """TRL's GRPOTrainer or RLOOTrainer, checkpointing into the run directory."""
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    args = config_class(
        output_dir=str(run_dir.checkpoints("rl")), max_steps=options.steps, learning_rate=options.learning_rate,
        # Under a launch each process takes its share: the rollout batch stays rl.rollout_batch_size.
        per_device_train_batch_size=options.rollout_batch_size // world_size(), num_generations=options.group_size,
        max_completion_length=options.max_new_tokens, temperature=options.temperature, beta=options.kl_coef,
        seed=seed, logging_steps=1, save_strategy="steps", save_steps=options.save_steps, save_total_limit=1,
        disable_tqdm=False, **trainer_arguments(training),
    )  # fmt: skip
    return trainer_class(
        model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=options.lora.peft_config("CAUSAL_LM"),
    )  # fmt: skip


def _group_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One metrics row per step from TRL's log, under the names PPO's rows use."""
    return [
        {"step": entry["step"], "mean_reward": entry.get("reward"), "kl": entry.get("kl"),
         "entropy": entry.get("entropy"), "response_length": entry.get("completions/mean_length"),
         **{key: value for key, value in entry.items() if isinstance(value, (int, float))}}
        for entry in log_history if "reward" in entry
    ]  # fmt: skip


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


def run_dpo(training: TrainingSettings, seed: int, options: DPOOptions, run_dir: Any) -> dict[str, Any]:
    """Offline DPO from SL-CAI on the AI labels (TRL's DPOTrainer; LoRA's disabled adapters are the reference)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    pairs, dropped = dpo_pairs(read_ai_labels(run_dir.path("ai_labels")), options.dpo_margin)
    if not pairs:
        raise UserError(
            f"{run_dir.path('ai_labels')}: every label is within rl.dpo_margin of 0.5; nothing to learn from"
        )
    sl_cai = run_dir.path("sl_cai")
    tokenizer = load_tokenizer(resolve_model_name(str(sl_cai.resolve())), training.trust_remote_code)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(str(sl_cai), dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(run_dir.checkpoints("rl")), beta=options.dpo_beta, learning_rate=options.learning_rate,
        num_train_epochs=options.dpo_epochs, per_device_train_batch_size=options.minibatch_size,
        seed=seed, save_strategy="no", logging_steps=1, report_to=[], disable_tqdm=False,
        **{key: value for key, value in trainer_arguments(training).items() if key != "report_to"},
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
        peft_config=options.lora.peft_config("CAUSAL_LM"),
    )  # fmt: skip
    result = trainer.train()
    summary = {"algorithm": "dpo", "pairs": len(pairs), "dropped_near_ties": dropped,
               "steps": trainer.state.global_step, "train_loss": round(result.training_loss, 6)}  # fmt: skip
    save_trained_model(trainer, tokenizer, run_dir.path("rl_cai"), summary, merge_lora=options.lora.enabled)
    if is_main_process():
        shutil.rmtree(run_dir.checkpoints("rl"), ignore_errors=True)
    return summary
