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

`rl.algorithm: dpo`: offline DPO on the PM's training mix (`data/pm_train.jsonl`: the AI
harmlessness labels and the helpfulness comparisons) with TRL's `DPOTrainer`, one soft target per
pair (`rl/trl_trainers.py`).

This module is the stage: its settings (the YAML section stays flat; each algorithm's fields are
grouped in its own options class, which `Settings` combines), its checks, the prompt split, and
the choice of algorithm.

Prompts: RL trains on the prompts of `critiques.jsonl`. The held-out prompts of the SL-CAI vs RL-CAI
comparison are prompts of the run's own sources (`data.red_team`, `data.helpful`) that no earlier
stage trained on (not in `critiques.jsonl`, nor in `pm_train.jsonl`); only when none is left (every
prompt of the sources was used) are they a seeded share of the critiques' prompts, as before, with
a warning: SL-CAI and the PM trained on those. The summary's `held_out_source` says which.

Outputs: `models/rl-cai/` (the policy, LoRA merged, safetensors), `data/rl_prompts.jsonl` (the
prompts and their train/held-out split), `eval/rl_metrics.jsonl` (one line per step), `eval/rl_curves.png`,
`eval/rl_samples.jsonl` (SL-CAI and RL-CAI answers to held-out prompts, with their PM scores).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from itertools import zip_longest
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
from constitutional.sources import load_prompts
from constitutional.training import SUMMARY, check_launch, is_complete_model, trainer_arguments

log = logging.getLogger(__name__)

NAME = "rl"
# data.red_team and data.helpful: where the held-out prompts come from (see split_prompts).
CONFIG_KEYS = ("seed", "training.precision", "data.red_team", "data.helpful")
# Each prompt source with the id prefix and built-in set stage `critique` reads it with, so a
# prompt has the same id here as there.
PROMPT_SOURCES = {"red_team": ("rt", "red_team_prompts.jsonl"), "helpful": ("hp", "helpful_prompts.jsonl")}
# `held_out_source` in the summary: prompts no earlier stage trained on, or (when the sources had
# none left) the old seeded share of the critiques' prompts, which SL-CAI and the PM trained on.
UNUSED_PROMPTS, CRITIQUES_SPLIT = "unused_prompts", "critiques_split"


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
    """PPO, RLOO, GRPO: the prompts (critiques), SL-CAI and the PM; DPO: the PM's training mix and SL-CAI."""
    return ["pm_train", "sl_cai"] if settings.algorithm == "dpo" else ["critiques", "sl_cai", "pm"]


def optional_reads(config: CoreConfig, settings: Settings) -> list[str]:
    """PPO, RLOO, GRPO: the PM's training rows, whose prompts are never held out (the PM trained on them)."""
    return [] if settings.algorithm == "dpo" else ["pm_train"]


def check(config: CoreConfig, settings: Settings) -> None:
    """The prompt sources the held-out prompts come from (validated); what the launch allows.

    SL-CAI and the PM are this run's own. The sources are read past the prompts the run trained on
    only in `run` (`split_prompts`), once the critiques exist.

    Raises:
        UserError: a prompt source that is missing, malformed or empty (PPO, RLOO, GRPO).
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
    if settings.algorithm != "dpo":
        for kind, (prefix, builtin) in PROMPT_SOURCES.items():
            load_prompts(getattr(config.data, kind), prefix=prefix, limit=1, base_dir=config.base_dir, builtin=builtin)


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
        prompts = split_prompts(config, settings, run_dir)
    device_args = trainer_arguments(config.training)
    # The PM only scores here (frozen): in bf16 where training runs in bf16, half the memory of fp32.
    reward_model = PreferenceModel.load(
        run_dir.path("pm"), device="cpu" if device_args["use_cpu"] else "cuda", bf16=device_args["bf16"],
        batch_size=settings.score_batch_size,
    )  # fmt: skip
    if settings.algorithm in ("rloo", "grpo"):
        summary = run_group(config.training, config.seed, settings.algorithm, settings, run_dir, prompts, reward_model)
        return {**summary, "held_out_source": prompts["held_out_source"]} if summary else summary
    return run_ppo(config.training, config.seed, settings, run_dir, prompts, reward_model.score)


# ----------------------------------------------------------------------------- prompts


def split_prompts(config: CoreConfig, settings: Settings, run_dir: RunDir) -> dict[str, Any]:
    """The training prompts (the critiques') and the held-out ones; kept in `rl_prompts.jsonl`.

    Written once, so a resumed run holds out the same prompts. Held out are up to
    `rl.max_eval_prompts` prompts of `data.red_team` and `data.helpful` that no earlier stage trained
    on (`unused_prompts`); when the sources have none left, a seeded `rl.eval_fraction` of the
    critiques' prompts, with a warning.

    Args:
        config: the run's config (its prompt sources and seed).
        settings: the `rl` section.
        run_dir: the run directory (critiques in, `rl_prompts.jsonl` out).

    Returns:
        {"train": [...], "eval": [...], "held_out_source": "unused_prompts" | "critiques_split"}.

    Raises:
        UserError: no training prompts.
    """
    path = run_dir.path("rl_prompts")
    if not path.exists():
        train = [_prompt_row(record, record["kind"]) for record in read_critiques(run_dir.path("critiques"))]
        held_out = unused_prompts(config, settings, _trained_prompts(run_dir, train))
        if held_out:
            rows = [{**row, "split": "train"} for row in train]
            rows += [{**row, "split": "eval", "held_out_source": UNUSED_PROMPTS} for row in held_out]
        else:
            log.warning(
                "rl: every prompt of data.red_team and data.helpful was trained on; the held-out comparison "
                "uses a share of the critiques' prompts (rl.eval_fraction), which SL-CAI and the PM trained on"
            )
            rows = _seeded_split(train, settings.eval_fraction, config.seed)
        write_records_atomic(path, rows)
    rows = read_records(path)
    split = {"train": [r for r in rows if r["split"] == "train"], "eval": [r for r in rows if r["split"] == "eval"]}
    if not split["train"]:
        raise UserError(f"{path}: no training prompts (the critiques file holds {len(rows)} prompts)")
    # A file written before held-out prompts came from the sources holds the seeded split.
    sources = {row.get("held_out_source", CRITIQUES_SPLIT) for row in split["eval"]}
    return {**split, "held_out_source": sources.pop() if len(sources) == 1 else CRITIQUES_SPLIT}


def unused_prompts(config: CoreConfig, settings: Settings, trained: set[str]) -> list[dict[str, Any]]:
    """Up to `rl.max_eval_prompts` prompts of the run's sources whose text no earlier stage trained on.

    Red-team and helpfulness prompts alternate (each source in its own order), so a cap keeps both.

    Args:
        config: `data.red_team`, `data.helpful` and the config's folder.
        settings: the `rl` section (`max_eval_prompts`).
        trained: prompt texts to skip.

    Returns:
        Prompt rows (`id`, `kind`, `prompt`, `history` where there is one); empty when none is left.
    """
    per_source = []
    for kind, (prefix, builtin) in PROMPT_SOURCES.items():
        items = load_prompts(
            getattr(config.data, kind), prefix=prefix, limit=settings.max_eval_prompts, base_dir=config.base_dir,
            builtin=builtin, exclude=trained,
        )  # fmt: skip
        per_source.append([_prompt_row(item, kind) for item in items])
    rows, seen = [], set()
    for row in (row for group in zip_longest(*per_source) for row in group if row is not None):
        if row["prompt"] not in seen:  # a prompt in both sources is held out once
            seen.add(row["prompt"])
            rows.append(row)
    return rows[: settings.max_eval_prompts]


def _trained_prompts(run_dir: RunDir, train: list[dict[str, Any]]) -> set[str]:
    """Prompt texts an earlier stage trained on: the critiques' (SL-CAI, the PM's pairs) and the PM's rows."""
    trained = {row["prompt"] for row in train}
    if run_dir.path("pm_train").exists():
        trained.update(record["prompt"] for record in read_records(run_dir.path("pm_train")))
    return trained


def _seeded_split(rows: list[dict[str, Any]], eval_fraction: float, seed: int) -> list[dict[str, Any]]:
    """The fallback: a seeded hash holds out `eval_fraction` of the critiques' prompts (one at least)."""
    split = []
    for row in rows:
        held_out = rng_for(seed, "rl-split:" + row["id"]).random() < eval_fraction
        split.append({**row, "split": "eval" if held_out else "train"})
        if held_out:
            split[-1]["held_out_source"] = CRITIQUES_SPLIT
    if not any(row["split"] == "eval" for row in split) and len(split) > 1:
        split[-1].update(split="eval", held_out_source=CRITIQUES_SPLIT)  # a tiny prompt set still holds one out
    return split


def _prompt_row(record: Any, kind: str) -> dict[str, Any]:
    """A prompt row from a critiques record (a dict) or a source's `PromptItem`."""
    if isinstance(record, dict):
        row = {"id": record["id"], "kind": kind, "prompt": record["prompt"]}
        history = record.get("history") or []
    else:
        row = {"id": record.id, "kind": kind, "prompt": record.prompt}
        history = [{"role": role, "text": text} for role, text in record.history]
    if history:
        row["history"] = history
    return row
