"""Stage `rl` (paper step 9): reinforcement learning from SL-CAI against the preference model -> RL-CAI.

`rl.algorithm: ppo` (the paper's): the policy starts from SL-CAI and the reference policy is SL-CAI,
frozen (with LoRA, the same weights with the adapters switched off, so there is no second copy).
Each step samples answers to a batch of red-team and helpfulness prompts through the back-end
generation interface (one seed per row, so a rollout batch is reproducible), scores them with the
PM (minus a penalty for answers that never end), turns the score into per-token rewards with a KL
penalty to the reference, estimates advantages with GAE against a value model initialised from the
PM, and takes `ppo_epochs` passes of clipped policy and value updates over minibatches. The loop is
`rl/trainer.py` (on `accelerate`, so the same code runs on a CPU, GPUs or a DDP launch), the models
`rl/policy.py`, the math `rl/ppo.py`.

`rl.algorithm: rloo | grpo`: TRL's trainers with the PM as the reward (`rl/trl_trainers.py`).

`rl.algorithm: dpo`: offline DPO on the AI labels with TRL's `DPOTrainer` (the recipe of Hugging
Face's CAI reproduction): each soft label becomes a (chosen, rejected) pair, near-ties dropped.

This module is the stage: its settings (the YAML section stays flat; each algorithm's fields are
grouped in its own options class, which `Settings` combines), its checks, the prompt split, and
the choice of algorithm.

Outputs: `models/rl-cai/` (the policy, LoRA merged, safetensors), `data/rl_prompts.jsonl` (the
prompts and their train/held-out split), `eval/rl_metrics.jsonl` (one line per step), `eval/rl_curves.png`,
`eval/rl_samples.jsonl` (SL-CAI and RL-CAI answers to held-out prompts, with their PM scores).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from constitutional.distributed import main_process_first, sharding_strategy, world_size
from constitutional.errors import UserError, require
from constitutional.preference import PreferenceModel
from constitutional.records import read_critiques, read_records, write_records_atomic
from constitutional.rl.trainer import PPOOptions, run_ppo
from constitutional.rl.trl_trainers import DPOOptions, GroupOptions, run_dpo, run_group
from constitutional.rundir import ARTEFACTS, RunDir
from constitutional.sections import CoreConfig
from constitutional.seeding import rng_for
from constitutional.training import SUMMARY, check_launch, is_complete_model, trainer_arguments

log = logging.getLogger(__name__)

NAME = "rl"
CONFIG_KEYS = ("seed", "training.precision")


@dataclass
class Settings(DPOOptions, GroupOptions, PPOOptions):
    """Config section `rl` (paper step 9): the shared fields, then PPO's, RLOO/GRPO's and DPO's."""

    algorithm: Literal["ppo", "rloo", "grpo", "dpo"] = "ppo"
    eval_fraction: float = 0.1  # prompts held out for the SL-CAI vs RL-CAI comparison

    def validate(self) -> None:
        self.validate_policy()
        self.validate_ppo()
        self.validate_group(self.algorithm)
        self.validate_dpo()
        require(0 < self.eval_fraction < 1, f"rl.eval_fraction: expected a number in (0, 1), got {self.eval_fraction}")


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
            # PPO's models go through accelerator.prepare, but accelerate shards (FSDP) only on GPUs
            # and that path has never run here: refused until it has.
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
        return run_dpo(config.training, config.seed, settings, run_dir)
    with main_process_first():  # under a launch: written once, then read by every process
        prompts = split_prompts(run_dir, settings, config.seed)
    device = "cpu" if trainer_arguments(config.training)["use_cpu"] else "cuda"
    reward_model = PreferenceModel.load(run_dir.path("pm"), device=device, batch_size=settings.score_batch_size)
    if settings.algorithm in ("rloo", "grpo"):
        return run_group(config.training, config.seed, settings.algorithm, settings, run_dir, prompts, reward_model)
    return run_ppo(config.training, config.seed, settings, run_dir, prompts, reward_model.score)


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
