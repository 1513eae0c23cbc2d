"""Stage `sl` (paper step 4): supervised fine-tuning of the pretrained model -> SL-CAI.

The *pretrained* model (`models.base`, as in the paper) is fine-tuned with TRL's `SFTTrainer` on
prompt/completion examples built from `data/critiques.jsonl`, as the paper's section 3.1 does: with
`sl.targets: all_revisions`, (conversation -> revision) for the revision of every round of every
red-team record (paper: 4 per prompt), with `final` only the last usable one; (conversation ->
sample) for every helpfulness sample (paper: 2 per prompt, at T = 1); mixed by
`sl.helpful_fraction` (None: every example made). Flagged or empty revisions and samples are
skipped and counted. The prompt is the paper's plain transcript ("Human: ...\\n\\nAssistant:"),
the completion " <response><eos>", and the loss covers the completion tokens only; the output
layer is applied only where there is a loss, on CPU too (`loss_positions_only`).

Training checkpoints every `sl.save_steps` optimizer steps into `checkpoints/sl/`; an interrupted
run resumes from the last complete checkpoint. The model (LoRA merged into the weights by default)
is written to `models/sl-cai/` in `save_pretrained` layout, safetensors, through a temporary
directory that is renamed into place, so it is either absent or whole.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constitutional.errors import UserError, require
from constitutional.lm_head import loss_positions_only
from constitutional.models import ModelRef, fingerprint, load_causal_lm, load_tokenizer, resolve_model_name
from constitutional.prompts import render_plain
from constitutional.records import conversation, read_critiques
from constitutional.resume import refuse_unsafe_checkpoint
from constitutional.rundir import RunDir
from constitutional.sections import CoreConfig, runtime
from constitutional.training import (
    SUMMARY,
    LoraSettings,
    TrainerOptions,
    TrainingSettings,
    check_launch,
    checkpoint_step,
    is_complete_model,
    last_complete_checkpoint,
    remove_checkpoints,
    save_trained_model,
    tokens_seen,
)

log = logging.getLogger(__name__)

NAME = "sl"
CONFIG_KEYS = ("seed", "models.base.name", "training.precision")
# What a red-team record teaches: every usable revision (the paper), or only its final response.
TARGETS = ("all_revisions", "final")


@dataclass
class _Leading:
    """The keys of section `sl` that come before the Trainer options (fields keep their order in config.yaml)."""

    targets: str = "all_revisions"  # red-team examples: every usable revision of every round (paper) | final
    helpful_fraction: float | None = None  # share of helpfulness examples among all examples (None: all there are)


@dataclass
class Settings(TrainerOptions, _Leading):
    """Config section `sl` (paper step 4): supervised fine-tuning of the pretrained model -> SL-CAI.

    epochs ... max_length: `TrainerOptions` (the paper: 1 epoch at a constant learning rate;
    max_length counts prompt + response tokens, a longer example is truncated).
    """

    save_steps: int = runtime(50)  # checkpoint every N optimizer steps; an interrupted run resumes from the last
    logging_steps: int = runtime(5)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self) -> None:
        require(self.targets in TARGETS, f"sl.targets: expected one of {', '.join(TARGETS)}, got {self.targets!r}")
        require(
            self.helpful_fraction is None or 0 <= self.helpful_fraction < 1,
            f"sl.helpful_fraction: expected a number in [0, 1) or nothing, got {self.helpful_fraction}",
        )
        self.validate_training("sl", positive=("save_steps", "logging_steps"))
        self.lora.check("sl.lora")


def reads(config: CoreConfig, settings: Settings) -> list[str]:
    return ["critiques"]


@dataclass
class Example:
    """One SFT example in the paper's plain transcript format."""

    prompt: str  # "...Human: ...\n\nAssistant:"
    completion: str  # " <response><eos>"
    kind: str  # red_team | helpful


# --- validation -------------------------------------------------------------------------------


def check(config: CoreConfig, settings: Settings) -> ModelRef:
    """Validate the base model name; writes nothing.

    The critiques file is not read here: the pipeline validates every stage before `critique` runs.

    Returns:
        The resolved base model.

    Raises:
        UserError: a bad model name, naming the key; LoRA merging under a sharded launch.
    """
    check_launch(NAME, merge_lora=settings.lora.enabled and settings.lora.merge)
    try:
        return resolve_model_name(config.models.base.name, config.base_dir)
    except UserError as error:
        raise UserError(f"models.base: {error}") from None


def input_hashes(base_model: ModelRef) -> dict[str, str]:
    """Fingerprint of the base model's weights, for the manifest."""
    return {"base_model": fingerprint(base_model)}


# --- data -------------------------------------------------------------------------------------


def load_examples(
    path: Path, settings: Settings, seed: int, eos_token: str = ""
) -> tuple[list[Example], dict[str, Any]]:
    """Read critiques and build the shuffled SFT mix.

    Args:
        path: `data/critiques.jsonl`.
        settings: the `sl` section (`targets`, `helpful_fraction`).
        seed: the run seed (mix and order).
        eos_token: appended to every completion, so the model learns to stop.

    Returns:
        The examples, shuffled with `seed`, and counts: examples, examples_red_team,
        examples_helpful, examples_by_round (red-team examples by the round their target comes
        from; "0": the initial answer, which only `final` uses), skipped_degenerate (records that
        give no example), skipped_revisions and skipped_helpful_samples (flagged or empty ones),
        helpful_left_out (helpful examples `helpful_fraction` left out of the mix).

    Raises:
        UserError: a missing file, a malformed line, a record without a needed field, or
            `all_revisions` on a file whose red-team records have no revisions.
    """
    records = read_critiques(path)
    if settings.targets == "all_revisions":
        _require_revisions(path, records)
    made: dict[str, list[Example]] = {"red_team": [], "helpful": []}
    by_round: Counter[int] = Counter()
    skipped: Counter[str] = Counter()
    for record in records:
        candidates = _candidates(path, record, settings.targets)
        usable = [(round_, text.strip()) for round_, field, text in candidates if _usable(record, field, text)]
        skipped.update(field.split("[")[0] for _, field, text in candidates if not _usable(record, field, text))
        skipped["records"] += not usable
        for round_, text in usable:
            made[record["kind"]].append(_example(record, text, eos_token))
            if round_ is not None:
                by_round[round_] += 1
    red_team = made["red_team"]
    rng = random.Random(seed)
    helpful = _subsample(made["helpful"], len(red_team), settings.helpful_fraction, rng)
    examples = red_team + helpful
    rng.shuffle(examples)
    counts = {
        "examples": len(examples),
        "examples_red_team": len(red_team),
        "examples_helpful": len(helpful),
        "examples_by_round": {str(round_): by_round[round_] for round_ in sorted(by_round)},
        "skipped_degenerate": skipped["records"],
        "skipped_revisions": skipped["revisions"],
        "skipped_helpful_samples": skipped["helpful_samples"],
        "helpful_left_out": len(made["helpful"]) - len(helpful),
    }
    return examples, counts


def _require_revisions(path: Path, records: list[dict[str, Any]]) -> None:
    """`all_revisions` trains on revisions: a file whose red-team records have none cannot feed it."""
    red_team = [record for record in records if record["kind"] == "red_team"]
    if red_team and not any(record.get("revisions") for record in red_team):
        raise UserError(
            f"{path}: sl.targets: all_revisions, but no red-team record has revisions (made with "
            "critique.rounds: 0?); run critique with rounds, or set sl.targets: final"
        )


def _candidates(path: Path, record: dict[str, Any], targets: str) -> list[tuple[int | None, str, str]]:
    """What a record could teach: (round, field, text) per candidate completion.

    The round is 1.. for a revision, 0 for an initial answer, None for a helpfulness sample; the
    field is the name the critique stage flags it by (`revisions[1].revision`, `helpful_samples[0]`).
    """
    if record["kind"] == "helpful":
        samples = record.get("helpful_samples")
        if samples is None:  # a record from before helpfulness samples: its one answer
            return [(None, "final_response", record["final_response"])]
        _require_strings(path, record, "helpful_samples", samples)
        return [(None, f"helpful_samples[{index}]", text) for index, text in enumerate(samples)]
    revisions = record.get("revisions", [])
    texts = [revision.get("revision") if isinstance(revision, dict) else None for revision in revisions]
    _require_strings(path, record, "revisions", texts if isinstance(revisions, list) else None)
    if targets == "final":
        final = record["final_response"]
        # The round the critique stage took it from: the latest unflagged revision, else the initial answer.
        positions = [p for p, text in enumerate(texts) if _usable(record, f"revisions[{p}].revision", text)]
        round_ = next((p + 1 for p in reversed(positions) if texts[p] == final), 0)
        return [(round_, "final_response", final)]
    return [(position + 1, f"revisions[{position}].revision", text) for position, text in enumerate(texts)]


def _require_strings(path: Path, record: dict[str, Any], field: str, texts: Any) -> None:
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        detail = "a list of {principle_id, critique, revision}" if field == "revisions" else "a list of strings"
        raise UserError(f"{path}: record {record['id']!r}: field {field!r}: expected {detail}")


def _usable(record: dict[str, Any], field: str, text: str) -> bool:
    """Not flagged by the critique stage (degenerate, copied few-shot) and not empty."""
    return bool(text.strip()) and not any(flag.rsplit(":", 1)[0] == field for flag in record["flags"])


def _example(record: dict[str, Any], response: str, eos_token: str) -> Example:
    """The paper's plain transcript up to "Assistant:" and the response the model should write."""
    # The leading space belongs to the completion: at inference the model writes it after the colon.
    prompt = render_plain(conversation(record), "assistant")
    return Example(prompt, " " + response + eos_token, record["kind"])


def _subsample(helpful: list[Example], red_team: int, fraction: float | None, rng: random.Random) -> list[Example]:
    """Helpfulness examples so they make up `fraction` of all examples (None: all of them).

    Counted in examples, not prompts (the paper's SL data: 4 revisions per red-team prompt, 2
    samples per helpfulness prompt). With r red-team examples, h helpful ones give a share
    h / (r + h) = f when h = f r / (1 - f); capped by how many there are.
    """
    if fraction is None:
        return helpful
    wanted = min(len(helpful), round(fraction * red_team / (1 - fraction)))
    return rng.sample(helpful, wanted)


def to_dataset(examples: list[Example]) -> Any:
    """A `datasets.Dataset` in TRL's prompt/completion format (loss on the completion only)."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [e.prompt for e in examples], "completion": [e.completion for e in examples]})


# --- training ---------------------------------------------------------------------------------


def run(config: CoreConfig, settings: Settings, run_dir: RunDir, base_model: ModelRef) -> dict[str, Any]:
    """Fine-tune the base model on the critiques, resuming from the last checkpoint if any.

    Returns:
        Counts for the manifest: those of `load_examples` (examples by kind and round, skipped ones)
        and those of `train` (dropped_too_long, steps, train_loss, train_tokens_per_s, ...).

    Raises:
        UserError: bad critiques (see `load_examples`), before anything is trained or written.
    """
    output = run_dir.path("sl_cai")
    critiques = run_dir.path("critiques")
    if is_complete_model(output):
        # Finished before (the manifest may not say so if the process died right after the rename).
        log.info("sl: %s already exists, not training again", output)
        _, counts = load_examples(critiques, settings, config.seed)
        return {**counts, **json.loads((output / SUMMARY).read_text(encoding="utf-8"))}
    tokenizer = load_tokenizer(base_model, config.training.trust_remote_code)
    examples, counts = load_examples(critiques, settings, config.seed, tokenizer.eos_token)
    if not examples:
        raise UserError(f"{critiques}: no usable records (every revision and answer is empty or flagged)")
    log.info(
        "sl: %d examples (%d red-team by round %s, %d helpful); skipped %d records, %d revisions, %d helpful samples",
        counts["examples"],
        counts["examples_red_team"],
        counts["examples_by_round"],
        counts["examples_helpful"],
        counts["skipped_degenerate"],
        counts["skipped_revisions"],
        counts["skipped_helpful_samples"],
    )
    checkpoints = run_dir.checkpoints(NAME)
    trainer, summary = train(config.training, settings, config.seed, base_model, tokenizer, examples, checkpoints)
    save_trained_model(trainer, tokenizer, output, summary, merge_lora=settings.lora.enabled and settings.lora.merge)
    # Checkpoints only serve to resume this stage; with full fine-tuning each holds weights and
    # optimizer state (about 3x the model), so they go once the model is safely in place.
    remove_checkpoints(checkpoints)
    return {**counts, **summary}


def train(
    training: TrainingSettings,
    settings: Settings,
    seed: int,
    base_model: ModelRef,
    tokenizer: Any,
    examples: list[Example],
    checkpoints: Path,
    callbacks: Sequence[Any] = (),
) -> tuple[Any, dict[str, Any]]:
    """Train the base model on `examples`, resuming from the last complete checkpoint.

    Args:
        training: the `training` section (device, precision, trackers).
        settings: the `sl` section.
        seed: the run seed.
        base_model: the pretrained model to start from.
        tokenizer: its tokenizer.
        examples: from `load_examples`.
        checkpoints: the checkpoint directory (`checkpoints/sl`).
        callbacks: extra `TrainerCallback`s (benchmarks, tests).

    Returns:
        The trainer (its model trained) and what training measured: dropped_too_long, steps,
        resumed_from_step, train_loss, train_tokens_per_s, lm_head_positions_only.
    """
    import torch

    # The SFTConfig before the model, the order Hugging Face documents for ZeRO-3: under a DeepSpeed
    # launch it sets up the DeepSpeed config, and with it `from_pretrained` builds the model inside
    # `deepspeed.zero.Init`, each process keeping only its partition. Loaded first, every process
    # would hold the whole fp32 model (8 x 29 GB of host memory for a 7B). tests/test_sharded_loading.py
    # checks it.
    args = sft_config(training, settings, seed, checkpoints)
    # Master weights stay fp32; bf16 on CUDA runs under autocast (training.precision).
    model = load_causal_lm(base_model, torch.float32, "cpu", training.trust_remote_code, for_trainer=True)
    dataset = to_dataset(examples)
    trainer = build_trainer(training, settings, seed, model, tokenizer, dataset, checkpoints, callbacks, args=args)
    resume = last_complete_checkpoint(checkpoints)
    tokens_before = tokens_seen(resume)
    if resume:
        log.info("sl: resuming from %s", resume)
    started = time.perf_counter()
    with loss_positions_only() as positions_only, refuse_unsafe_checkpoint("sl", resume):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, {
        # TRL drops examples whose prompt alone fills max_length: nothing of the answer is left to learn.
        "dropped_too_long": len(examples) - len(trainer.train_dataset),
        "steps": trainer.state.global_step,
        "resumed_from_step": checkpoint_step(resume) if resume else 0,
        # Mean of the logged losses over the whole training, resumed parts included.
        "train_loss": round(sum(losses) / len(losses) if losses else result.training_loss, 6),
        # Non-padding tokens of this call (a resumed run counts only what it trained itself).
        "train_tokens_per_s": round((trainer.state.num_input_tokens_seen - tokens_before) / seconds, 2),
        "lm_head_positions_only": positions_only,
    }


def build_trainer(
    training: TrainingSettings,
    settings: Settings,
    seed: int,
    model: Any,
    tokenizer: Any,
    dataset: Any,
    output_dir: Path,
    callbacks: Sequence[Any] = (),
    args: Any | None = None,
) -> Any:
    """An `SFTTrainer` for prompt/completion data with the stage's settings.

    Args:
        training: the `training` section.
        settings: the `sl` section.
        seed: the run seed.
        model: the base model, fp32.
        tokenizer: its tokenizer (with a pad token).
        dataset: from `to_dataset`.
        output_dir: where checkpoints go.
        callbacks: extra `TrainerCallback`s.
        args: from `sft_config` with the same settings and `output_dir`, made before the
            model was loaded (see `train`); None: made here.

    Returns:
        The trainer; its `train_dataset` is tokenized, with labels -100 on prompt tokens.
    """
    from trl import SFTTrainer

    return SFTTrainer(
        model=model,
        args=args if args is not None else sft_config(training, settings, seed, output_dir),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=settings.lora.peft_config("CAUSAL_LM"),
        callbacks=list(callbacks),
    )


def sft_config(training: TrainingSettings, settings: Settings, seed: int, output_dir: Path) -> Any:
    """The stage's `SFTConfig` (TRL's TrainingArguments): build it before loading the model (see `train`)."""
    from trl import SFTConfig

    return SFTConfig(
        completion_only_loss=True,
        packing=False,  # one example per row: the paper's setup, and no cross-example attention
        shuffle_dataset=False,  # the examples are shuffled with the seed already; the sampler reshuffles
        # epochs, batch, learning rate, max_length, seeds, checkpoints, logging, device and precision
        **settings.trainer_kwargs(training, seed, output_dir, settings.save_steps, settings.logging_steps),
    )
