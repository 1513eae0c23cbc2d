"""Stage `rl`'s algorithms that TRL implements: RLOO and GRPO (online, a group baseline) and DPO (offline).

RLOO and GRPO sample `group_size` answers per prompt and use the group's other answers as the
baseline instead of a value model. The PM scores each answer cut at the first turn marker: TRL
samples without stop strings, so an answer may run on into a "Human:" turn the model invents.

DPO trains on the PM's training mix (`data/pm_train.jsonl`: the AI harmlessness labels and the
helpfulness comparisons, as the paper's PM sees them) instead of a reward. Each comparison becomes
a (chosen, rejected) pair, the preferred answer first, with its soft label p >= 0.5 as the target
of a per-pair conservative DPO loss (`soft_dpo_loss`): the feedback model's labels lie close to 0.5,
and a hard pair would teach a 0.52 label as firmly as a 1.0.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Any

from constitutional.distributed import is_main_process, world_size
from constitutional.errors import UserError, require, require_positive
from constitutional.lm_head import loss_positions_only
from constitutional.models import load_causal_lm, load_tokenizer, resolve_model_name
from constitutional.preference import PreferenceModel
from constitutional.prompts import render_plain, trim_at_turn_marker
from constitutional.records import conversation, numbered_records, write_records_atomic
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
    # Optional filter: comparisons with |p_a - 0.5| below this are dropped as near-ties. 0 (the
    # default) keeps every comparison but exact ties: the loss weighs each by its soft label anyway,
    # and the feedback model's labels (clamped to [0.4, 0.6] with feedback.cot) mostly lie near 0.5.
    dpo_margin: float = 0.0
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
    dataset = Dataset.from_list([{"prompt": render_plain(conversation(row), "assistant")} for row in prompts["train"]])
    reward = pm_reward_function(reward_model)
    trainer = _group_trainer(training, seed, algorithm, options, run_dir, model, tokenizer, reward, dataset)
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


def pm_reward_function(reward_model: PreferenceModel) -> Any:
    """The reward TRL's RLOO and GRPO trainers call: the PM's score of each answer, cut at a turn marker.

    TRL 1.16 cannot stop sampling at a string on its transformers path (it calls `generate` without
    the tokenizer, which `stop_strings` needs), so an answer may go on into a "Human:" turn the
    model invents and an "Assistant:" reply to it. The PM scores only the answer, as it does PPO's
    rollouts (`rl/rollout.py`); the tokens after the marker stay in TRL's loss with the answer's
    advantage.

    Returns:
        A function (prompts, completions, **TRL's other columns) -> one score per completion.
    """

    def pm_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        # The prompts are plain transcripts ending in "Assistant:", as the PM reads them.
        return reward_model.score_transcripts(
            [prompt + " " + trim_at_turn_marker(completion) for prompt, completion in zip(prompts, completions)]
        )

    return pm_reward


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

_TIE_TOLERANCE = 1e-9  # labels are floats: abs(0.6 - 0.5) is 0.09999999999999998, below a margin of 0.1


def dpo_pairs(rows: list[dict[str, Any]], margin: float) -> tuple[list[dict[str, Any]], int]:
    """Comparisons -> DPO pairs, the preferred answer first ("chosen"), each with its soft label.

    Args:
        rows: `pm_train.jsonl` rows: `prompt`, optional `history`, `response_a`, `response_b`, `p_a`, `source`.
        margin: `rl.dpo_margin`: rows with |p_a - 0.5| below it are dropped; exact ties always are
            (neither answer is preferred, and the loss would only hold the policy at the reference).

    Returns:
        The pairs in TRL's prompt/chosen/rejected format plus `p` (the probability that chosen is the
        better answer, in (0.5, 1]) and `source`; and how many rows were dropped.
    """
    pairs, dropped = [], 0
    for row in rows:
        p_a = float(row["p_a"])
        distance = abs(p_a - 0.5)
        if distance <= _TIE_TOLERANCE or distance < margin - _TIE_TOLERANCE:
            dropped += 1
            continue
        a_first = p_a > 0.5
        chosen, rejected = (row["response_a"], row["response_b"]) if a_first else (row["response_b"], row["response_a"])
        pairs.append({"prompt": render_plain(conversation(row), "assistant"), "chosen": " " + chosen.strip(),
                      "rejected": " " + rejected.strip(), "p": p_a if a_first else 1.0 - p_a,
                      "source": row["source"]})  # fmt: skip
    return pairs, dropped


def soft_dpo_loss(margins: Any, p: Any, beta: float) -> Any:
    """DPO with one soft target per pair: conservative DPO (Mitchell 2023) with label smoothing 1 - p per pair.

    loss = -[p log sigma(beta * margin) + (1 - p) log sigma(-beta * margin)]: the cross-entropy
    between the label and the policy's implicit preference sigma(beta * margin), as the PM's
    `soft_bradley_terry_loss` is for its scores (paper step 8). Its gradient with respect to the
    margin, beta * (sigma(beta * margin) - p), vanishes where sigma(beta * margin) = p: a 0.55 label
    is learnt until the implicit odds are 0.55 : 0.45, not pushed without end as a hard pair would
    be, and a tie (p = 0.5) at the reference (margin 0) teaches nothing. p = 1 is standard DPO.

    Args:
        margins: (batch,) (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)).
        p: (batch,) the probability that the chosen answer is the better one.
        beta: `rl.dpo_beta`.

    Returns:
        (batch,) the loss of each pair.
    """
    import torch.nn.functional as F

    scaled = beta * margins
    return -(p * F.logsigmoid(scaled) + (1 - p) * F.logsigmoid(-scaled))


def _soft_label_dpo_class() -> type:
    """`SoftLabelDPOTrainer`, defined on first use so that importing this module does not import TRL."""
    import torch
    from trl import DPOTrainer

    class SoftLabelDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer whose loss is `soft_dpo_loss`, with each pair's target from a `p` column.

        TRL 1.16 has no per-pair label: `DPOConfig.label_smoothing` is one number for the whole data
        set, read only by its `robust` loss (rDPO, whose noise correction divides by 1 - 2 epsilon:
        no pair may be a near-tie) and `exo_pair`. So only the loss is replaced; tokenising,
        collating, the reference (a frozen copy, or the LoRA policy with its adapters off, through
        TRL's `compute_ref_log_probs`), the fused LM head, checkpoints and logging stay TRL's. TRL
        options this stage never sets (loss_type, ld_alpha, f_divergence_type, use_weighting) are
        not read.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            collate = self.data_collator  # TRL's collator keeps only the token columns: add `p` back
            self.data_collator = lambda rows: {**collate(rows), "p": torch.tensor([row["p"] for row in rows])}

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            if "p" not in self._signature_columns:  # else the Trainer drops the column before collating
                self._signature_columns = [*self._signature_columns, "p"]

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:  # fmt: skip
            p = inputs["p"]
            inputs = {key: value for key, value in inputs.items() if key != "p"}
            mask = inputs["completion_mask"]  # (2 batch, length): the chosen answers, then the rejected
            labels = inputs["input_ids"].masked_fill(mask == 0, -100)
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                            use_cache=False, fused_lm_head=True)  # fmt: skip
            # (2 batch,): each answer's log-probability; the fused head gives 0 at unlabelled positions.
            chosen, rejected = outputs.log_probs[:, -(mask.size(1) - 1) :].sum(dim=1).chunk(2, dim=0)
            reference = model if self.ref_model is None else self.ref_model  # None: LoRA, adapters switched off
            ref_chosen, ref_rejected = self.compute_ref_log_probs(reference, inputs)
            margins = (chosen - ref_chosen) - (rejected - ref_rejected)
            rewards = self.accelerator.gather(self.beta * margins.detach())
            metrics = self._metrics["train" if self.model.training else "eval"]
            metrics["rewards/margins"].append(rewards.mean().item())
            metrics["rewards/accuracies"].append((rewards > 0).float().mean().item())
            loss = soft_dpo_loss(margins, p.to(margins.dtype), self.beta).mean()
            return (loss, outputs) if return_outputs else loss

    return SoftLabelDPOTrainer


def dpo_config(training: TrainingSettings, seed: int, options: DPOOptions, run_dir: Any) -> Any:
    """DPO's TrainingArguments, its scratch files under the run's checkpoints (built before the model: ZeRO-3)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(run_dir.checkpoints("rl")), beta=options.dpo_beta, learning_rate=options.learning_rate,
        num_train_epochs=options.dpo_epochs, per_device_train_batch_size=options.minibatch_size,
        seed=seed, save_strategy="no", logging_steps=1, disable_tqdm=False, **trainer_arguments(training),
    )  # fmt: skip


def dpo_trainer(
    training: TrainingSettings, seed: int, options: DPOOptions, run_dir: Any, model: Any, tokenizer: Any,
    pairs: list[dict[str, Any]], args: Any = None,
) -> Any:  # fmt: skip
    """The soft-label DPO trainer on `pairs` (from `dpo_pairs`); `args` from `dpo_config` (built here if None)."""
    from datasets import Dataset

    return _soft_label_dpo_class()(
        model=model, args=args or dpo_config(training, seed, options, run_dir), train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer, peft_config=options.lora.peft_config("CAUSAL_LM"),
    )  # fmt: skip


def run_dpo(training: TrainingSettings, seed: int, options: DPOOptions, run_dir: Any) -> dict[str, Any]:
    """Offline DPO from SL-CAI on the PM's training mix, one soft target per pair (LoRA: adapters off = reference).

    Returns:
        The summary: pairs (in all and per source), rows dropped as near-ties, steps, train_loss.

    Raises:
        UserError: a malformed `pm_train.jsonl`, or one without a comparison left to learn from.
    """
    import torch

    path = run_dir.path("pm_train")
    rows = read_comparisons(path)
    pairs, dropped = dpo_pairs(rows, options.dpo_margin)
    if not pairs:
        raise UserError(
            f"{path}: all {len(rows)} comparisons are ties or within rl.dpo_margin ({options.dpo_margin}) of 0.5; "
            "nothing to learn from"
        )
    sl_cai = resolve_model_name(str(run_dir.path("sl_cai").resolve()))
    tokenizer = load_tokenizer(sl_cai, training.trust_remote_code)
    tokenizer.padding_side = "right"
    # The arguments first, as in sl and pm: under ZeRO-3 the model then loads partitioned, under FSDP
    # with CPU-RAM-efficient loading on meta outside local rank 0.
    args = dpo_config(training, seed, options, run_dir)
    model = load_causal_lm(sl_cai, torch.float32, "cpu", training.trust_remote_code, for_trainer=True).train()
    trainer = dpo_trainer(training, seed, options, run_dir, model, tokenizer, pairs, args)
    with loss_positions_only() as positions_only:  # the vocabulary head only at the answers' tokens, on CPU too
        result = trainer.train()
    summary = {"algorithm": "dpo", "pairs": len(pairs), "pairs_by_source": dict(Counter(p["source"] for p in pairs)),
               "dropped_near_ties": dropped, "mean_target": round(sum(p["p"] for p in pairs) / len(pairs), 4),
               "steps": trainer.state.global_step, "train_loss": round(result.training_loss, 6),
               "lm_head_positions_only": positions_only}  # fmt: skip
    save_trained_model(trainer, tokenizer, run_dir.path("rl_cai"), summary, merge_lora=options.lora.enabled)
    if is_main_process():
        shutil.rmtree(run_dir.checkpoints("rl"), ignore_errors=True)
    return summary


def read_comparisons(path: Any) -> list[dict[str, Any]]:
    """`pm_train.jsonl` (stage pm's rows), checked: the text fields are strings and p_a a probability.

    Raises:
        UserError: naming the file and line of a row without them.
    """
    rows = []
    for number, row in numbered_records(path):
        for name in ("prompt", "response_a", "response_b", "source"):
            if not isinstance(row.get(name), str):
                raise UserError(f"{path}:{number}: field {name!r}: expected a string")
        p_a = row.get("p_a")
        if isinstance(p_a, bool) or not isinstance(p_a, (int, float)) or not 0 <= p_a <= 1:
            raise UserError(f"{path}:{number}: field 'p_a': expected a probability in [0, 1], got {p_a!r}")
        rows.append(row)
    return rows
