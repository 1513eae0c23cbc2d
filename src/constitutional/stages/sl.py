"""Stage `sl` (paper step 4): supervised fine-tuning of the pretrained model -> SL-CAI.

The *pretrained* model (`models.base`, as in the paper) is fine-tuned with TRL's `SFTTrainer` on
prompt/completion examples built from `data/critiques.jsonl`: (conversation -> final revision) for
red-team records, (conversation -> answer) for helpfulness records, mixed by
`sl.helpful_fraction`. The prompt is the paper's plain transcript ("Human: ...\\n\\nAssistant:"),
the completion " <response><eos>", and the loss covers the completion tokens only; the output
layer is applied only where there is a loss, on CPU too (`loss_positions_only`).

Training checkpoints every `sl.save_steps` optimizer steps into `checkpoints/sl/`; an interrupted
run resumes from the last complete checkpoint. The model (LoRA merged into the weights by default)
is written to `models/sl-cai/` in `save_pretrained` layout, safetensors, through a temporary
directory that is renamed into place, so it is either absent or whole.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from constitutional.config import Config
from constitutional.errors import UserError
from constitutional.models import ModelRef, fingerprint, load_causal_lm, load_tokenizer, resolve_model_name
from constitutional.prompts import PLAIN_LABELS, render_plain
from constitutional.records import RunDir, read_records

log = logging.getLogger(__name__)

NAME = "sl"
INPUT = "critiques.jsonl"
OUTPUT = "sl-cai"
REPORT_TO = ("none", "tensorboard", "wandb")
SUMMARY = "training_summary.json"  # written next to the weights: what the finished training measured
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


@dataclass
class Inputs:
    """What `check` validated: the base model and the LoRA target modules."""

    base_model: ModelRef
    target_modules: str | list[str]  # "all-linear" or module names


@dataclass
class Example:
    """One SFT example in the paper's plain transcript format."""

    prompt: str  # "...Human: ...\n\nAssistant:"
    completion: str  # " <response><eos>"
    kind: str  # red_team | helpful


# --- validation -------------------------------------------------------------------------------


def check(config: Config) -> Inputs:
    """Validate the stage's settings and the base model name; writes nothing.

    The critiques file is not read here: the pipeline validates every stage before `critique` runs.

    Returns:
        The resolved base model and LoRA target modules.

    Raises:
        UserError: a bad `sl.*` value or model name, naming the key.
    """
    settings = config.sl
    try:
        base_model = resolve_model_name(config.models.base.name, config.base_dir)
    except UserError as error:
        raise UserError(f"models.base: {error}") from None
    if settings.helpful_fraction is not None and not 0 <= settings.helpful_fraction < 1:
        raise UserError(f"sl.helpful_fraction: expected a number in [0, 1) or nothing, got {settings.helpful_fraction}")
    for key in ("epochs", "learning_rate", "batch_size", "gradient_accumulation_steps", "max_length", "save_steps",
                "logging_steps"):
        _require(getattr(settings, key) > 0, f"sl.{key}: expected a positive number, got {getattr(settings, key)}")
    _require(settings.warmup_steps >= 0, f"sl.warmup_steps: expected 0 or more, got {settings.warmup_steps}")
    _check_scheduler(settings.lr_scheduler)
    _check_report_to(settings.report_to)
    lora = settings.lora
    _require(lora.r > 0, f"sl.lora.r: expected a positive integer, got {lora.r}")
    _require(lora.alpha > 0, f"sl.lora.alpha: expected a positive integer, got {lora.alpha}")
    _require(0 <= lora.dropout < 1, f"sl.lora.dropout: expected a number in [0, 1), got {lora.dropout}")
    modules = [name.strip() for name in lora.target_modules.split(",") if name.strip()]
    _require(bool(modules), "sl.lora.target_modules: expected 'all-linear' or a comma-separated list of module names")
    return Inputs(base_model, "all-linear" if modules == ["all-linear"] else modules)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _check_scheduler(name: str) -> None:
    """The scheduler must be one that transformers knows (constant, linear, cosine, ...)."""
    from transformers import SchedulerType

    known = [member.value for member in SchedulerType]
    _require(name in known, f"sl.lr_scheduler: expected one of {', '.join(known)}, got {name!r}")


def _check_report_to(value: str) -> None:
    """`none`, or a tracker whose package is installed (found now, not after an hour of training)."""
    _require(value in REPORT_TO, f"sl.report_to: expected one of {', '.join(REPORT_TO)}, got {value!r}")
    needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(value, ())
    if needs and not any(importlib.util.find_spec(package) for package in needs):
        raise UserError(f"sl.report_to: {value!r} needs the {needs[0]} package (pip install {needs[0]})")


def input_hashes(inputs: Inputs) -> dict[str, str]:
    """Fingerprint of the base model's weights, for the manifest."""
    return {"base_model": fingerprint(inputs.base_model)}


# --- data -------------------------------------------------------------------------------------


def load_examples(path: Path, config: Config, eos_token: str = "") -> tuple[list[Example], dict[str, int]]:
    """Read critiques and build the shuffled SFT mix.

    Args:
        path: `data/critiques.jsonl`.
        config: the run's config (`sl.helpful_fraction`, `seed`).
        eos_token: appended to every completion, so the model learns to stop.

    Returns:
        The examples, shuffled with `config.seed`, and counts: examples, red_team, helpful,
        skipped_degenerate (records without a usable final_response).

    Raises:
        UserError: a missing file, a malformed line, or a record without a needed field.
    """
    records = read_critiques(path)
    usable = [(record, kind) for record, kind in records if record["final_response"].strip()]
    red_team = [_example(record, eos_token) for record, kind in usable if kind == "red_team"]
    helpful = [_example(record, eos_token) for record, kind in usable if kind == "helpful"]
    rng = random.Random(config.seed)
    helpful = _subsample(helpful, len(red_team), config.sl.helpful_fraction, rng)
    examples = red_team + helpful
    rng.shuffle(examples)
    counts = {"examples": len(examples), "red_team": len(red_team), "helpful": len(helpful),
              "skipped_degenerate": len(records) - len(usable)}
    return examples, counts


def read_critiques(path: Path) -> list[tuple[dict[str, Any], str]]:
    """Records of `critiques.jsonl` with their kind, each checked for the fields training reads.

    Raises:
        UserError: naming file and line, e.g. "critiques.jsonl:3: missing field 'final_response'".
    """
    if not path.exists():
        raise UserError(f"{path}: not found; run the 'critique' stage first")
    records = read_records(path)
    # read_records skips blank lines; map each record back to its line number for messages.
    numbers = [number for number, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    checked = []
    for number, record in zip(numbers, records):
        where = f"{path}:{number}"
        for field in ("id", "kind", "prompt", "final_response"):
            if field not in record:
                raise UserError(f"{where}: missing field {field!r}")
            if not isinstance(record[field], str):
                raise UserError(f"{where}: field {field!r}: expected a string")
        if record["kind"] not in ("red_team", "helpful"):
            raise UserError(f"{where}: field 'kind': expected red_team or helpful, got {record['kind']!r}")
        _check_history(record.get("history", []), where)
        checked.append((record, record["kind"]))
    return checked


def _check_history(history: Any, where: str) -> None:
    """`history` is optional: a list of {role, text} turns before the prompt."""
    if not isinstance(history, list):
        raise UserError(f"{where}: field 'history': expected a list of turns")
    for turn in history:
        if not (isinstance(turn, dict) and turn.get("role") in PLAIN_LABELS and isinstance(turn.get("text"), str)):
            raise UserError(f"{where}: field 'history': expected turns like {{\"role\": \"human\", \"text\": \"...\"}}")


def _example(record: dict[str, Any], eos_token: str) -> Example:
    """The paper's plain transcript up to "Assistant:" and the response the model should write."""
    turns = [(turn["role"], turn["text"]) for turn in record.get("history", [])] + [("human", record["prompt"])]
    # The leading space belongs to the completion: at inference the model writes it after the colon.
    return Example(render_plain(turns, "assistant"), " " + record["final_response"].strip() + eos_token, record["kind"])


def _subsample(helpful: list[Example], red_team: int, fraction: float | None, rng: random.Random) -> list[Example]:
    """Helpfulness examples so they make up `fraction` of the mix (None: all of them).

    With r red-team examples, h helpful ones give a share h / (r + h) = f when h = f r / (1 - f);
    capped by how many there are.
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


def run(config: Config, run_dir: RunDir, inputs: Inputs) -> dict[str, Any]:
    """Fine-tune the base model on the critiques, resuming from the last checkpoint if any.

    Returns:
        Counts for the manifest: examples, red_team, helpful, skipped_degenerate, dropped_too_long,
        steps, train_loss, train_tokens_per_s.
    """
    output = run_dir.model(OUTPUT)
    if is_complete_model(output):
        # Finished before (the manifest may not say so if the process died right after the rename).
        log.info("sl: %s already exists, not training again", output)
        _, counts = load_examples(run_dir.data(INPUT), config)
        return {**counts, **json.loads((output / SUMMARY).read_text(encoding="utf-8"))}
    tokenizer = load_tokenizer(inputs.base_model, config.transformers.trust_remote_code)
    examples, counts = load_examples(run_dir.data(INPUT), config, tokenizer.eos_token)
    if not examples:
        raise UserError(f"{run_dir.data(INPUT)}: no usable records (every final_response is empty)")
    log.info("sl: %d examples (%d red-team, %d helpful), %d degenerate records skipped",
             counts["examples"], counts["red_team"], counts["helpful"], counts["skipped_degenerate"])
    checkpoints = run_dir.root / "checkpoints" / NAME
    trainer, summary = train(config, inputs, tokenizer, examples, checkpoints)
    save_model(trainer, tokenizer, output, config.sl.lora.enabled and config.sl.lora.merge, summary)
    # Checkpoints only serve to resume this stage; with full fine-tuning each holds weights and
    # optimizer state (about 3x the model), so they go once the model is safely in place. TensorBoard
    # logs (`checkpoints/sl/runs/`) stay.
    for path in checkpoints.glob("checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)
    return {**counts, **summary}


def train(
    config: Config, inputs: Inputs, tokenizer: Any, examples: list[Example], checkpoints: Path,
    callbacks: Sequence[Any] = (),
) -> tuple[Any, dict[str, Any]]:
    """Train the base model on `examples`, resuming from the last complete checkpoint.

    Args:
        config, inputs: the run's config and what `check` returned.
        tokenizer: the base model's tokenizer.
        examples: from `load_examples`.
        checkpoints: the checkpoint directory (`checkpoints/sl`).
        callbacks: extra `TrainerCallback`s (benchmarks, tests).

    Returns:
        The trainer (its model trained) and what training measured: dropped_too_long, steps,
        resumed_from_step, train_loss, train_tokens_per_s.
    """
    model = load_base_model(config, inputs)
    trainer = build_trainer(config, inputs, model, tokenizer, to_dataset(examples), checkpoints, callbacks)
    resume = last_complete_checkpoint(checkpoints)
    tokens_before = _tokens_seen(resume)
    if resume:
        log.info("sl: resuming from %s", resume)
    started = time.perf_counter()
    with loss_positions_only():
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, {
        # TRL drops examples whose prompt alone fills max_length: nothing of the answer is left to learn.
        "dropped_too_long": len(examples) - len(trainer.train_dataset),
        "steps": trainer.state.global_step,
        "resumed_from_step": _step(resume) if resume else 0,
        # Mean of the logged losses over the whole training, resumed parts included.
        "train_loss": round(sum(losses) / len(losses) if losses else result.training_loss, 6),
        # Non-padding tokens of this call (a resumed run counts only what it trained itself).
        "train_tokens_per_s": round((trainer.state.num_input_tokens_seen - tokens_before) / seconds, 2),
    }


@contextlib.contextmanager
def loss_positions_only() -> Iterator[None]:
    """Project to the vocabulary only at positions that carry a loss, on CPU as on CUDA.

    TRL's fused LM head scores only the labelled positions where Triton runs (CUDA, XPU) but every
    position elsewhere, to keep tile shapes fixed for compilers such as Neuron's. On CPU that spends
    the most expensive layer on prompt tokens whose result is thrown away: the embedded model's
    262k-token output layer is about 60% of its compute per token. The log-probabilities of the
    labelled positions are the same either way. A no-op if TRL's internals change.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def load_base_model(config: Config, inputs: Inputs) -> Any:
    """The pretrained model in fp32: master weights stay fp32 (bf16 on CUDA runs under autocast)."""
    import torch

    return load_causal_lm(inputs.base_model, torch.float32, "cpu", config.transformers.trust_remote_code)


def device_and_precision(config: Config) -> tuple[bool, bool]:
    """Where to train and in what precision.

    Returns:
        (use_cpu, bf16): CPU when there is no CUDA or `transformers.device` says cpu; bf16 mixed
        precision only on CUDA with bf16 support, unless `transformers.dtype` asks for float32.
    """
    import torch

    use_cpu = not torch.cuda.is_available() or config.transformers.device == "cpu"
    bf16 = not use_cpu and torch.cuda.is_bf16_supported() and config.transformers.dtype in ("auto", "bfloat16")
    return use_cpu, bf16


def build_trainer(
    config: Config, inputs: Inputs, model: Any, tokenizer: Any, dataset: Any, output_dir: Path,
    callbacks: Sequence[Any] = (),
) -> Any:
    """An `SFTTrainer` for prompt/completion data with the stage's settings.

    Args:
        config: the run's config (`sl.*`, `seed`).
        inputs: what `check` returned (LoRA target modules).
        model: the base model, fp32.
        tokenizer: its tokenizer (with a pad token).
        dataset: from `to_dataset`.
        output_dir: where checkpoints go.
        callbacks: extra `TrainerCallback`s.

    Returns:
        The trainer; its `train_dataset` is tokenized, with labels -100 on prompt tokens.
    """
    from trl import SFTConfig, SFTTrainer

    settings = config.sl
    use_cpu, bf16 = device_and_precision(config)
    args = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps,
        max_length=settings.max_length,
        completion_only_loss=True,
        packing=False,  # one example per row: the paper's setup, and no cross-example attention
        shuffle_dataset=False,  # the examples are shuffled with config.seed already; the sampler reshuffles
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=use_cpu,
        bf16=bf16,  # SFTConfig defaults to bf16; on CPU it would run autocast, not the fp32 we want
        fp16=False,
        # TRL turns activation checkpointing on by default; recomputing activations costs ~20-30%
        # more compute, and a model trained on one device (the embedded one) fits without it.
        activation_checkpointing=False,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=settings.logging_steps,
        report_to=[] if settings.report_to == "none" else [settings.report_to],
        include_num_input_tokens_seen="non_padding",  # for tokens/s
        disable_tqdm=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=not use_cpu,
        push_to_hub=False,
        eval_strategy="no",
    )
    return SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora_config(config, inputs), callbacks=list(callbacks),
    )


def lora_config(config: Config, inputs: Inputs) -> Any:
    """PEFT LoRA settings from `sl.lora`, or None for full fine-tuning."""
    lora = config.sl.lora
    if not lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=inputs.target_modules,
        task_type="CAUSAL_LM",
    )


# --- checkpoints and the saved model ----------------------------------------------------------


def last_complete_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint that was written completely; incomplete ones are removed.

    The Trainer writes the weights, optimizer, scheduler and RNG state first and `trainer_state.json`
    last, so a checkpoint with readable state and weights is whole; a kill during a save leaves a
    directory without them, which would make the Trainer crash or rotate away a good checkpoint.
    """
    if not directory.is_dir():
        return None
    found = sorted((path for path in directory.iterdir() if path.is_dir() and _CHECKPOINT.match(path.name)), key=_step)
    complete = []
    for path in found:
        if _is_complete_checkpoint(path):
            complete.append(path)
        else:
            log.warning("sl: ignoring and removing incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)
    return complete[-1] if complete else None


def _step(path: Path) -> int:
    return int(_CHECKPOINT.match(path.name).group(1))


def _tokens_seen(checkpoint: Path | None) -> int:
    """Tokens trained on up to `checkpoint` (0 for a fresh start)."""
    if checkpoint is None:
        return 0
    return json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")).get("num_input_tokens_seen", 0)


def _is_complete_checkpoint(path: Path) -> bool:
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any((path / name).exists() for name in _WEIGHT_FILES)


def is_complete_model(path: Path) -> bool:
    """A finished `models/sl-cai`: it only ever appears by renaming a fully written directory."""
    return (path / SUMMARY).exists() and any((path / name).exists() for name in _WEIGHT_FILES)


def save_model(trainer: Any, tokenizer: Any, output: Path, merge: bool, summary: dict[str, Any]) -> None:
    """Save weights (safetensors), tokenizer and summary atomically to `output`.

    Args:
        trainer: the trained SFTTrainer.
        tokenizer: saved alongside, so the directory loads on its own.
        output: `models/sl-cai`.
        merge: merge the LoRA adapter into the weights (a plain model every back end loads);
            otherwise a LoRA model is saved as an adapter.
        summary: what training measured, kept as `training_summary.json`.
    """
    model = trainer.model
    if merge:
        model = model.merge_and_unload()
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)  # safetensors is the only format transformers 5 writes
    tokenizer.save_pretrained(partial)
    trainer.state.save_to_json(str(partial / "trainer_state.json"))  # the loss curve, steps, resumes
    (partial / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(output, ignore_errors=True)  # a leftover without a summary, never a finished model
    os.replace(partial, output)
