"""Stage `pm` (paper steps 7-8): mix AI harmlessness labels with helpfulness comparisons, train a
preference model on the soft labels, and evaluate it.

1. **Mixing.** The AI harmlessness labels of `data/ai_labels.jsonl` (soft `p_a`) are joined with
   helpfulness comparisons: human ones from `data.human_preferences` (HH-RLHF `chosen`/`rejected`
   format; the chosen answer is put at A or B at random, so `p_a` is exactly 1 or 0), or, with
   `data.human_preferences: none`, AI ones: SL-CAI answers the helpfulness prompts twice and the
   feedback model labels the pair against the constitution's helpfulness principles. Every row is
   tagged with its `source`. A deterministic share of *conversations* per source is held out, so
   no conversation is in both splits: `data/pm_train.jsonl`, `data/pm_eval.jsonl`.
2. **Training.** A one-output sequence classifier (a score head on `pm.init`: the pretrained model
   by default, as in the paper, or SL-CAI) scores each whole transcript; the loss is Bradley-Terry
   on the soft labels (`preference.soft_bradley_terry_loss`). TRL's `RewardTrainer` does the rest
   (tokenising, padding, checkpoints); its subclass in `preference_trainer.py` only adds the label
   column and the loss. A classifier has no vocabulary head, so the embedded model's 262k-token
   output layer is never computed. Checkpoints go to `checkpoints/pm/`; the model is saved
   atomically to `models/pm/`.
3. **Evaluation.** Accuracy on the held-out rows of each source (in distribution: the same
   sources as the training rows), and on human comparisons from outside the mix if
   `pm.harmlessness_eval` / `pm.helpfulness_eval` name HH-RLHF files, each with a 95% interval beside
   chance and a length-only baseline; calibration (expected calibration error and a reliability
   diagram). `eval/pm.json`, `eval/pm_calibration.png`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constitutional.backends import Backend, SamplingParams
from constitutional.chunks import append_in_chunks
from constitutional.comparisons import LabelOptions, label_comparisons, sample_pairs
from constitutional.constitution import Constitution, load_constitution
from constitutional.distributed import is_main_process, main_process_first
from constitutional.errors import UserError, require
from constitutional.models import ModelRef, fingerprint, load_sequence_classifier, load_tokenizer, resolve_model_name
from constitutional.preference import PreferenceModel, pm_transcript
from constitutional.preference_data import (
    ai_row,
    conversation_key,
    count_by_source,
    human_row,
    mix,
    split_by_conversation,
)
from constitutional.preference_eval import held_out_figures, plot_calibration
from constitutional.preference_trainer import soft_label_trainer_class
from constitutional.prompts import STOP_STRINGS
from constitutional.records import (
    conversation,
    read_ai_labels,
    read_critiques,
    read_records,
    write_json_atomic,
    write_records_atomic,
)
from constitutional.resume import refuse_unsafe_checkpoint
from constitutional.rundir import RunDir
from constitutional.sections import CoreConfig, ModelSpec, runtime
from constitutional.sources import load_preference_pairs
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

NAME = "pm"
CONFIG_KEYS = (
    "seed",
    "models.base.name",
    "data.human_preferences",
    "training.precision",
    # Only read with data.human_preferences: none (AI helpfulness labels).
    "constitution",
    "models.feedback.name",
)
BUILTIN_PREFERENCES = "helpful_comparisons.jsonl"  # written for the project, see its data card


@dataclass
class _Leading:
    """The keys of section `pm` that come before the Trainer options (fields keep their order in config.yaml)."""

    init: str = "base"  # the model the PM starts from: base (models.base, the paper), sl-cai, or a model name
    helpful_fraction: float | None = None  # share of helpfulness rows in the training mix (None: all of both)
    max_human: int | None = None  # read at most N human comparisons (None: all)
    eval_fraction: float = 0.1  # share of conversations held out per source
    harmlessness_eval: str | None = None  # an HH-RLHF harmless-format file: accuracy against human labels
    helpfulness_eval: str | None = None  # an HH-RLHF helpful-format file: accuracy against human labels
    max_eval: int | None = 500  # at most N comparisons read from each of harmlessness_eval, helpfulness_eval


@dataclass
class Settings(TrainerOptions, _Leading):
    """Config section `pm` (paper steps 7-8): the mix, the preference model's training and its evaluation.

    epochs ... max_length: `TrainerOptions` (batch_size counts comparisons per step, each two
    transcripts; max_length tokens per transcript, longer comparisons are left out of training).
    """

    calibration_bins: int = 10
    helpfulness_max_new_tokens: int = 128  # answer length for AI helpfulness pairs (human_preferences: none)
    lora: LoraSettings = field(default_factory=LoraSettings)
    save_steps: int = runtime(50)
    logging_steps: int = runtime(5)
    score_batch_size: int = runtime(8)
    chunk_size: int = runtime(32)

    def validate(self) -> None:
        require(
            self.helpful_fraction is None or 0 <= self.helpful_fraction < 1,
            f"pm.helpful_fraction: expected a number in [0, 1) or nothing, got {self.helpful_fraction}",
        )
        require(
            0 < self.eval_fraction <= 0.5, f"pm.eval_fraction: expected a number in (0, 0.5], got {self.eval_fraction}"
        )
        self.validate_training("pm", positive=("calibration_bins", "helpfulness_max_new_tokens", "save_steps",
                               "logging_steps", "score_batch_size", "chunk_size", "max_human", "max_eval"))  # fmt: skip
        require(bool(self.init.strip()), "pm.init: expected base, sl-cai or a model name")
        self.lora.check("pm.lora")


def reads(config: CoreConfig, settings: Settings) -> list[str]:
    """AI labels always; SL-CAI and the critiques for AI helpfulness labels or a PM started from SL-CAI."""
    needed = ["ai_labels"]
    if config.data.human_preferences == "none":
        needed += ["critiques", "sl_cai"]
    elif settings.init == "sl-cai":
        needed += ["sl_cai"]
    return needed


@dataclass
class Inputs:
    """What `check` loaded: the human comparisons, the starting model, and the constitution if needed."""

    human: list[dict[str, Any]]  # from load_preference_pairs; [] with human_preferences: none
    harmlessness_eval: list[dict[str, Any]]
    init: ModelRef | None  # None: SL-CAI of this run (made by stage sl)
    constitution: Constitution | None  # for AI helpfulness labels
    helpfulness_eval: list[dict[str, Any]] = field(default_factory=list)


def check(config: CoreConfig, settings: Settings) -> Inputs:
    """Load the human comparisons and resolve the starting model; writes nothing."""
    check_launch(NAME, merge_lora=settings.lora.enabled)
    spec = config.data.human_preferences
    human, constitution = [], None
    if spec == "none":
        config.check_model(config.models.feedback, "models.feedback", scores_options=True)
        constitution = load_constitution(config.constitution, config.base_dir)
    else:
        human = load_preference_pairs(
            spec, limit=settings.max_human, base_dir=config.base_dir, prefix="hh", builtin=BUILTIN_PREFERENCES
        )
    harmless = _eval_pairs(config, settings, "harmlessness_eval", prefix="hx")
    helpful = _eval_pairs(config, settings, "helpfulness_eval", prefix="hy")
    init = None
    if settings.init != "sl-cai":
        name = config.models.base.name if settings.init == "base" else settings.init
        try:
            init = resolve_model_name(name, config.base_dir)
        except UserError as error:
            raise UserError(f"pm.init: {error}") from None
    return Inputs(human, harmless, init, constitution, helpful)


def _eval_pairs(config: CoreConfig, settings: Settings, key: str, prefix: str) -> list[dict[str, Any]]:
    """The first `pm.max_eval` comparisons of the file `pm.<key>` names ([] if none); errors name the key."""
    spec = getattr(settings, key)
    if not spec:
        return []
    try:
        return load_preference_pairs(spec, limit=settings.max_eval, base_dir=config.base_dir, prefix=prefix)
    except UserError as error:
        raise UserError(f"pm.{key}: {error}") from None


def input_hashes(inputs: Inputs) -> dict[str, str]:
    """Fingerprints of the human comparisons, the evaluation file and the starting model."""

    def digest(rows: list[dict[str, Any]]) -> str:
        return hashlib.sha256(json.dumps([row["id"] for row in rows]).encode()).hexdigest()[:16]

    hashes = {
        "human_preferences": digest(inputs.human),
        "harmlessness_eval": digest(inputs.harmlessness_eval),
        "helpfulness_eval": digest(inputs.helpfulness_eval),
    }
    if inputs.init is not None:
        hashes["init_model"] = fingerprint(inputs.init)
    return hashes


def run(config: CoreConfig, settings: Settings, run_dir: RunDir, inputs: Inputs) -> dict[str, Any]:
    """Mix, train, evaluate; each step resumes from what an interrupted run left.

    Returns:
        Counts for the manifest: rows per source and split, training figures, held-out accuracies.
    """
    with main_process_first():  # under a multi-process launch: made once, then read by every process
        counts = write_mix(config, settings, run_dir, inputs)
    model_path = run_dir.path("pm")
    init = inputs.init or resolve_model_name(str(run_dir.path("sl_cai").resolve()), config.base_dir)
    if is_complete_model(model_path):
        log.info("pm: %s already exists, not training again", model_path)
        summary = json.loads((model_path / SUMMARY).read_text(encoding="utf-8"))
    else:
        summary = train(config.training, settings, config.seed, init, run_dir)
    if not is_main_process():  # the other processes of a launch only help train
        return {**counts, **summary}
    report = evaluate(settings, run_dir, inputs.harmlessness_eval, config.seed, inputs.helpfulness_eval)
    accuracies = {source: values["pm"] for source, values in report["accuracy"].items()}
    return {**counts, **summary, "held_out_accuracy": accuracies}


# ----------------------------------------------------------------------------- step 7: the mix


def write_mix(config: CoreConfig, settings: Settings, run_dir: RunDir, inputs: Inputs) -> dict[str, Any]:
    """Write `pm_train.jsonl` and `pm_eval.jsonl` (once; both appear together, atomically).

    Returns:
        Row counts: train/eval rows per source, identical pairs skipped.
    """
    train_path, eval_path = run_dir.path("pm_train"), run_dir.path("pm_eval")
    ai = [ai_row(label, "ai_harmlessness") for label in read_ai_labels(run_dir.path("ai_labels"))]
    if config.data.human_preferences == "none":
        helpful = [
            ai_row(label, "ai_helpfulness") for label in ai_helpfulness_labels(config, settings, run_dir, inputs)
        ]
    else:
        helpful = [human_row(pair, config.seed) for pair in inputs.human]
    rows = [row for row in ai + helpful if row["response_a"].strip() != row["response_b"].strip()]
    skipped = len(ai) + len(helpful) - len(rows)
    if skipped:
        log.info("pm: skipped %d comparisons whose two answers are identical", skipped)
    train_rows, eval_rows = split_by_conversation(rows, settings.eval_fraction, config.seed)
    train_rows = mix(train_rows, settings.helpful_fraction, config.seed)
    if not (train_path.exists() and eval_path.exists()):
        write_records_atomic(train_path, train_rows)
        write_records_atomic(eval_path, eval_rows)
    return {
        "train": count_by_source(read_records(train_path)),
        "eval": count_by_source(read_records(eval_path)),
        "skipped_identical": skipped,
    }


def ai_helpfulness_labels(
    config: CoreConfig, settings: Settings, run_dir: RunDir, inputs: Inputs
) -> list[dict[str, Any]]:
    """Without human helpfulness data: SL-CAI answers each helpfulness prompt twice, the feedback
    model labels each pair against the constitution's helpfulness principles. Both steps resume."""
    log.warning(
        "pm: data.human_preferences is none: labelling helpfulness with the feedback model and the "
        "constitution's helpfulness principles instead of human comparisons"
    )
    prompts = [record for record in read_critiques(run_dir.path("critiques")) if record["kind"] == "helpful"]
    sl_cai = ModelSpec(
        name=str(run_dir.path("sl_cai").resolve()), backend=config.models.base.backend, prompt_format="plain"
    )
    params = SamplingParams(max_new_tokens=settings.helpfulness_max_new_tokens, temperature=1.0, stop=STOP_STRINGS)

    def sample(backend: Backend, chunk: list[dict[str, Any]], advance: Callable[[int], Any]) -> list[dict[str, Any]]:
        return sample_pairs(backend, chunk, params, config.seed)

    pairs_path = run_dir.path("helpful_pairs")
    append_in_chunks(
        pairs_path, prompts, lambda record: record["id"], lambda: config.open_backend(sl_cai, run_dir.cache_path),
        sample, chunk_size=settings.chunk_size, desc="pm: helpful pairs", unit="prompt",
    )  # fmt: skip
    pairs = read_records(pairs_path)
    constitution = inputs.constitution
    options = LabelOptions()

    def label(backend: Backend, chunk: list[dict[str, Any]], advance: Callable[[int], Any]) -> list[dict[str, Any]]:
        helpfulness = constitution.helpfulness_principles
        return label_comparisons(backend, constitution, chunk, options, config.seed, principles=helpfulness)

    labels_path = run_dir.path("ai_helpfulness")
    append_in_chunks(
        labels_path, pairs, lambda pair: pair["id"],
        lambda: config.open_backend(config.models.feedback, run_dir.cache_path),
        label, chunk_size=settings.chunk_size, desc="pm: helpfulness labels", unit="pair",
    )  # fmt: skip
    return read_ai_labels(labels_path)


# ----------------------------------------------------------------------------- step 8: training


def train(training: TrainingSettings, settings: Settings, seed: int, init: ModelRef, run_dir: RunDir) -> dict[str, Any]:
    """Train the PM on `pm_train.jsonl`, resuming from the last complete checkpoint; save it atomically.

    Returns:
        What training measured: examples, dropped_too_long, steps, resumed_from_step, train_loss,
        train_tokens_per_s.
    """
    rows = read_records(run_dir.path("pm_train"))
    if not rows:
        raise UserError(f"{run_dir.path('pm_train')}: no training comparisons")
    from transformers import set_seed

    tokenizer = load_tokenizer(init, training.trust_remote_code)
    checkpoints = run_dir.checkpoints(NAME)
    # The RewardConfig before the model, as in stage sl: under ZeRO-3 it sets up the DeepSpeed
    # config that makes `from_pretrained` build the model partitioned (`deepspeed.zero.Init`).
    args = reward_config(training, settings, seed, checkpoints)
    set_seed(seed)  # the new score head's initial weights come from the seed: same config, same PM
    model = load_sequence_classifier(init, training.trust_remote_code)
    trainer = build_trainer(training, settings, seed, model, tokenizer, to_dataset(rows), checkpoints, args=args)
    if len(trainer.train_dataset) == 0:
        raise UserError(
            f"{run_dir.path('pm_train')}: all {len(rows)} comparisons are longer than pm.max_length "
            f"({settings.max_length} tokens); raise it"
        )
    resume = last_complete_checkpoint(checkpoints)
    tokens_before = tokens_seen(resume)
    if resume:
        log.info("pm: resuming from %s", resume)
    started = time.perf_counter()
    with refuse_unsafe_checkpoint("pm", resume):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "examples": len(rows),
        # TRL leaves out comparisons with a transcript longer than max_length.
        "dropped_too_long": len(rows) - len(trainer.train_dataset),
        "steps": trainer.state.global_step,
        "resumed_from_step": checkpoint_step(resume) if resume else 0,
        "train_loss": round(sum(losses) / len(losses) if losses else result.training_loss, 6),
        "train_tokens_per_s": round((trainer.state.num_input_tokens_seen - tokens_before) / seconds, 2),
    }
    save_trained_model(trainer, tokenizer, run_dir.path("pm"), summary, merge_lora=settings.lora.enabled)
    remove_checkpoints(checkpoints)
    return summary


def to_dataset(rows: list[dict[str, Any]]) -> Any:
    """TRL's preference columns: transcript A as `chosen`, B as `rejected`, and the soft label `p_a`."""
    from datasets import Dataset

    return Dataset.from_dict({
        "chosen": [pm_transcript(conversation(row), row["response_a"]) for row in rows],
        "rejected": [pm_transcript(conversation(row), row["response_b"]) for row in rows],
        "p_a": [float(row["p_a"]) for row in rows],
    })  # fmt: skip


def build_trainer(
    training: TrainingSettings, settings: Settings, seed: int, model: Any, tokenizer: Any, dataset: Any,
    output_dir: Path, callbacks: Sequence[Any] = (), soft_labels: bool = True, args: Any | None = None,
) -> Any:  # fmt: skip
    """A reward trainer with the stage's settings.

    Args:
        training: the `training` section.
        settings: the `pm` section.
        seed: the run seed.
        model: a one-output sequence classifier, fp32.
        tokenizer: its tokenizer.
        dataset: from `to_dataset`.
        output_dir: where checkpoints go.
        callbacks: extra `TrainerCallback`s (benchmarks, tests).
        soft_labels: False gives TRL's stock `RewardTrainer` (hard labels: A is always the chosen
            answer), for the benchmark that compares the two.
        args: from `reward_config` with the same settings and `output_dir`, made before the model
            was loaded (see `train`); None: made here.
    """
    from trl import RewardTrainer

    args = args if args is not None else reward_config(training, settings, seed, output_dir)
    trainer_class = soft_label_trainer_class() if soft_labels else RewardTrainer
    return trainer_class(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=settings.lora.peft_config("SEQ_CLS"), callbacks=list(callbacks),
    )  # fmt: skip


def reward_config(training: TrainingSettings, settings: Settings, seed: int, output_dir: Path) -> Any:
    """The stage's `RewardConfig` (TRL's TrainingArguments): build it before loading the model (see `train`)."""
    from trl import RewardConfig

    return RewardConfig(
        **settings.trainer_kwargs(training, seed, output_dir, settings.save_steps, settings.logging_steps)
    )


# ----------------------------------------------------------------------------- evaluation


HELD_OUT = "held out from the training mix's own sources (conversations the PM never trained on)"


def evaluate(
    settings: Settings, run_dir: RunDir, harmlessness: list[dict[str, Any]], seed: int,
    helpfulness: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:  # fmt: skip
    """Accuracy per evaluation set, calibration; written to eval/.

    Sets: the held-out rows of each source of the mix (`in_distribution: true`), then the human
    comparisons of `pm.harmlessness_eval` (`human_harmlessness`) and `pm.helpfulness_eval`
    (`helpfulness_eval`), from outside the mix (`in_distribution: false`; a comparison whose
    conversation is in the training mix is left out and counted; one with identical answers is left out).

    Returns:
        The report written to `eval/pm.json`: {"accuracy": {set: entry}, "calibration": {set: entry}}.
    """
    pm = PreferenceModel.load(run_dir.path("pm"), max_length=settings.max_length, batch_size=settings.score_batch_size)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in read_records(run_dir.path("pm_eval")):
        groups.setdefault(row["source"], []).append(row)
    about = {source: {"in_distribution": True, "data": HELD_OUT} for source in groups}
    trained = {conversation_key(row) for row in read_records(run_dir.path("pm_train"))}
    for name, key, pairs in (("human_harmlessness", "harmlessness_eval", harmlessness),
                             ("helpfulness_eval", "helpfulness_eval", helpfulness)):  # fmt: skip
        # As in the mix: identical answers have no winner to predict.
        rows = [{**human_row(pair, seed), "source": name} for pair in pairs if pair["chosen"] != pair["rejected"]]
        kept = [row for row in rows if conversation_key(row) not in trained]
        if len(kept) < len(rows):
            log.warning("pm: %s: left out %d of %d comparisons whose conversation is in the training mix",
                        f"pm.{key}", len(rows) - len(kept), len(rows))  # fmt: skip
        if kept:
            groups[name] = kept
            about[name] = {"in_distribution": False, "data": f"pm.{key}: {getattr(settings, key)} (human labels)",
                           "left_out_in_training_mix": len(rows) - len(kept)}  # fmt: skip
    report: dict[str, Any] = {"accuracy": {}, "calibration": {}}
    points: dict[str, tuple[list[float], list[float]]] = {}
    for name, rows in groups.items():
        accuracy, calibrated, points[name] = held_out_figures(pm, rows, settings.calibration_bins)
        report["accuracy"][name], report["calibration"][name] = {**accuracy, **about[name]}, calibrated
        log.info(
            "pm: %s (%s): accuracy %.3f [95%% CI %.3f-%.3f] (length baseline %.3f, chance 0.5) on %d comparisons, "
            "ECE %.3f", name, "held out" if about[name]["in_distribution"] else "outside the mix", accuracy["pm"],
            *accuracy["pm_ci95"], accuracy["length_baseline"], len(rows), calibrated["ece"],
        )  # fmt: skip
    write_json_atomic(run_dir.path("pm_report"), report)
    plot_calibration(points, settings.calibration_bins, run_dir.path("pm_calibration"))
    return report
