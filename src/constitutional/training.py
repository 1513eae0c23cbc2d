"""What the training stages share: device and precision, checkpoints, the saved model, the LM head.

Stages `sl` (TRL's `SFTTrainer`), `pm` (a `RewardTrainer` subclass, a sequence classifier) and `rl`
(PPO) train differently but alike in how: the config section `training` (`TrainingSettings`) says
where and in what precision, `trainer_arguments` turns it into keyword arguments for any
`TrainingArguments` subclass, an interrupted run resumes from `last_complete_checkpoint`, and the
result is written by `save_model_atomic`, so a model directory is either absent or whole. `sl` and
`pm` also share their optimisation keys (`TrainerOptions`, the base of both sections) and the rest
of their Trainer arguments (`TrainerOptions.trainer_kwargs`).

torch, transformers and trl are imported inside the functions: importing this module stays cheap
(config validation and `--help` need it, not the weights).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from constitutional.devices import mixed_precision, use_cpu
from constitutional.distributed import is_main_process, sharding_strategy, wait_for_everyone, world_size
from constitutional.errors import UserError, require, require_positive
from constitutional.prompts import plain_chat_template
from constitutional.trackers import check_report_to

log = logging.getLogger(__name__)

SUMMARY = "training_summary.json"  # written next to the weights: what the finished training measured
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# A full model (one file or sharded) or a PEFT adapter.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


# --- settings ---------------------------------------------------------------------------------


_RUNTIME = {"runtime": True}


@dataclass
class TrainingSettings:
    """Config section `training`: how sl, pm and rl train (not what they learn)."""

    # Where and how it trains, not what it learns: like `sections.runtime(...)` fields (defined there,
    # which imports this module), they are left out of stage settings, so changing them never makes a
    # stage stale. `precision` does change the numbers; stages that train declare it in CONFIG_KEYS.
    device: str = field(default="auto", metadata=_RUNTIME)  # auto | cpu | cuda | cuda:N | mps (auto: cuda if any)
    # auto: bf16 where the hardware computes in it (a CUDA GPU with bf16 support; a CPU with
    # AVX512-BF16 or AMX, where bf16 matmuls run 3-4x faster than fp32), else fp32 (emulated bf16
    # is slower than fp32). bf16/fp16 are mixed precision: the master weights stay fp32, the
    # forward runs under autocast. The stage's manifest entry records what it used (`precision`).
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # none | tensorboard | wandb (package installed): every stage logs there (`trackers.py`). W&B's
    # project (else $WANDB_PROJECT, else "constitutional"), entity (else W&B's default) and the
    # group of this run's stages (else the run directory's name).
    report_to: str = field(default="none", metadata=_RUNTIME)
    project: str = field(default="", metadata=_RUNTIME)
    entity: str = field(default="", metadata=_RUNTIME)
    run_name: str = field(default="", metadata=_RUNTIME)
    # Recompute activations in the backward pass instead of keeping them: about 20-30% more compute
    # for far less activation memory. Off by default: the embedded model fits without it; a 7B model
    # on one GPU needs it.
    gradient_checkpointing: bool = field(default=False, metadata=_RUNTIME)
    # Recorded per stage in the manifest when on (`trust_remote_code`), as a warning, not a setting.
    trust_remote_code: bool = field(default=False, metadata=_RUNTIME)

    def validate(self) -> None:
        """Check the values without importing torch; a tracker's package must be installed.

        Raises:
            UserError: naming the key, e.g. "training.report_to: 'wandb' needs the wandb package ...".
        """
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise UserError(f"training.device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"training.precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for key in ("gradient_checkpointing", "trust_remote_code"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"training.{key}: expected true or false, got {getattr(self, key)!r}")
        if world_size() > 1 and self.device not in ("auto", "cpu"):
            raise UserError(
                f"training.device: {self.device!r} under a launch of {world_size()} processes; use auto "
                "(each process takes the GPU the launcher gives it) or cpu"
            )
        check_report_to(self.report_to)


@dataclass
class LoraSettings:
    """LoRA (PEFT) instead of full fine-tuning."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = "all-linear"  # or a comma-separated list of module names
    merge: bool = True  # merge the adapter into the weights when saving, so every back end loads it

    def check(self, section: str) -> None:
        """Validate, naming keys under `section` (e.g. "sl.lora")."""
        require_positive(f"{section}.r", self.r)
        require_positive(f"{section}.alpha", self.alpha)
        require(0 <= self.dropout < 1, f"{section}.dropout: expected a number in [0, 1), got {self.dropout}")
        require(
            bool(self.modules()),
            f"{section}.target_modules: expected 'all-linear' or a comma-separated list of module names",
        )

    def peft_config(self, task_type: str) -> Any:
        """PEFT's LoraConfig for `task_type` ("CAUSAL_LM", "SEQ_CLS"), or None when LoRA is off."""
        if not self.enabled:
            return None
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.modules(),
            task_type=task_type,
        )

    def modules(self) -> str | list[str]:
        """ "all-linear" or the list of module names."""
        names = [name.strip() for name in self.target_modules.split(",") if name.strip()]
        return "all-linear" if names == ["all-linear"] else names


def check_scheduler(key: str, name: str) -> None:
    """A learning-rate scheduler transformers knows (constant, linear, cosine, ...), or a UserError naming `key`."""
    from transformers import SchedulerType

    known = [member.value for member in SchedulerType]
    require(name in known, f"{key}: expected one of {', '.join(known)}, got {name!r}")


def trainer_arguments(settings: TrainingSettings) -> dict[str, Any]:
    """Keyword arguments for any transformers `TrainingArguments` subclass (SFTConfig, RewardConfig, ...).

    Always sets bf16 and fp16 explicitly: SFTConfig defaults to bf16, which on CPU would run
    autocast instead of the fp32 asked for. `cuda:N` makes GPU N the current CUDA device, the one
    the Trainer (through accelerate) picks in a single process.

    Args:
        settings: the validated `training` section.

    Returns:
        use_cpu, bf16, fp16, activation_checkpointing (transformers' name for gradient
        checkpointing; TRL's configs would default it to on), dataloader_pin_memory, report_to (a
        list, empty for none) and dataloader_num_workers=0 (examples are tokenized in memory;
        worker processes only add start-up time and, on fork, copies of the model's address space).

    Raises:
        UserError: a device that is not there, or bf16 on a GPU without bf16 support.
    """
    on_cpu = use_cpu(settings.device)
    bf16, fp16 = mixed_precision(settings.precision, settings.device, on_cpu)
    return {
        "use_cpu": on_cpu,
        "bf16": bf16,
        "fp16": fp16,
        "activation_checkpointing": settings.gradient_checkpointing,
        "dataloader_pin_memory": not on_cpu,  # pinned host memory only speeds up copies to a GPU
        "dataloader_num_workers": 0,
        "report_to": [] if settings.report_to == "none" else [settings.report_to],
    }


def check_precision(settings: TrainingSettings) -> None:
    """Refuse `precision: bf16` where this machine would emulate it (the plan of a run that trains here).

    Not part of `validate`: a config written for GPUs still loads on a laptop (`cai report` of a
    copied run); only training it here is refused, before anything is written.

    Raises:
        UserError: naming the key and the hardware.
    """
    if settings.precision == "bf16":
        mixed_precision(settings.precision, settings.device, use_cpu(settings.device))


def resolved_precision(settings: TrainingSettings) -> str:
    """What `precision: auto` (or the value asked for) comes to on this machine: bf16, fp16 or fp32."""
    arguments = trainer_arguments(settings)
    return "bf16" if arguments["bf16"] else "fp16" if arguments["fp16"] else "fp32"


@dataclass
class TrainerOptions:
    """The optimisation keys of a section trained with a transformers Trainer: the base of `sl` and `pm`.

    `config.yaml` lists a section's keys in field order: the bases' fields (right to left), then the
    class's own. So a section's leading keys sit in a base listed after this one (`class
    Settings(TrainerOptions, _Leading)`); save_steps, logging_steps and lora stay in each stage, as
    sl and pm list them at different places.
    """

    epochs: float = 1.0  # the paper: 1 epoch
    learning_rate: float = 1e-5
    lr_scheduler: str = "constant"  # the paper: constant learning rate
    warmup_steps: int = 0
    batch_size: int = 4  # per device and step: sl examples, pm comparisons (two transcripts each)
    gradient_accumulation_steps: int = 1
    # Tokens per example: sl truncates a longer one (prompt + response), pm leaves it out of training.
    max_length: int = 512

    def validate_training(self, prefix: str, positive: Sequence[str] = ()) -> None:
        """Check these keys, then the stage's own `positive` ones, naming them under `prefix` ("sl").

        Raises:
            UserError: e.g. "sl.learning_rate: expected a positive number, got 0".
        """
        for key in ("epochs", "learning_rate", "batch_size", "gradient_accumulation_steps", "max_length", *positive):
            require_positive(f"{prefix}.{key}", getattr(self, key))
        require(self.warmup_steps >= 0, f"{prefix}.warmup_steps: expected 0 or more, got {self.warmup_steps}")
        check_scheduler(f"{prefix}.lr_scheduler", self.lr_scheduler)

    def trainer_kwargs(
        self, training: TrainingSettings, seed: int, output_dir: Path, save_steps: int, logging_steps: int
    ) -> dict[str, Any]:
        """Keyword arguments `SFTConfig` and `RewardConfig` share: these keys, seeds, checkpoints, logging, device.

        Args:
            training: the `training` section.
            seed: the run seed (also the data order's).
            output_dir: where checkpoints go.
            save_steps: checkpoint every N optimizer steps (the last two are kept).
            logging_steps: log every N optimizer steps.
        """
        return {
            "output_dir": str(output_dir),
            "num_train_epochs": self.epochs,
            "per_device_train_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "learning_rate": self.learning_rate,
            "lr_scheduler_type": self.lr_scheduler,
            "warmup_steps": self.warmup_steps,
            "max_length": self.max_length,
            "seed": seed,
            "data_seed": seed,
            "save_strategy": "steps",
            "save_steps": save_steps,
            "save_total_limit": 2,
            "logging_strategy": "steps",
            "logging_steps": logging_steps,
            "include_num_input_tokens_seen": "non_padding",  # for tokens/s
            "disable_tqdm": False,
            "push_to_hub": False,
            "eval_strategy": "no",
            # device, precision (SFTConfig would default to bf16), gradient checkpointing, trackers
            **trainer_arguments(training),
        }


# --- checkpoints ------------------------------------------------------------------------------


def last_complete_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint that was written completely; incomplete ones are removed.

    The Trainer writes the weights, optimizer, scheduler and RNG state first and `trainer_state.json`
    last, so a checkpoint with readable state and weights is whole; a kill during a save leaves a
    directory without them, which would make the Trainer crash or rotate away a good checkpoint.

    Args:
        directory: the Trainer's `output_dir` (e.g. `checkpoints/sl`); it may not exist.

    Returns:
        The `checkpoint-N` directory with the highest N that is complete, or None.
    """
    if not directory.is_dir():
        return None
    found = sorted(_checkpoints(directory), key=checkpoint_step)
    complete = []
    for path in found:
        if _is_complete_checkpoint(path):
            complete.append(path)
        else:
            log.warning("ignoring and removing incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)
    return complete[-1] if complete else None


def checkpoint_step(path: Path) -> int:
    """The optimizer step N of a `checkpoint-N` directory.

    Raises:
        ValueError: `path` is not named checkpoint-N.
    """
    match = _CHECKPOINT.match(path.name)
    if not match:
        raise ValueError(f"{path}: not a checkpoint directory (expected checkpoint-N)")
    return int(match.group(1))


def tokens_seen(checkpoint: Path | None) -> int:
    """Tokens trained on up to `checkpoint` (0 for a fresh start), from its `trainer_state.json`."""
    if checkpoint is None:
        return 0
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return state.get("num_input_tokens_seen", 0)


def remove_checkpoints(directory: Path) -> None:
    """Remove the `checkpoint-N` directories (main process only); anything else (TensorBoard's `runs/`) stays.

    Checkpoints only serve to resume a stage; with full fine-tuning each holds weights and
    optimizer state (about 3x the model), so they go once the model is safely in place.
    """
    if directory.is_dir() and is_main_process():
        for path in _checkpoints(directory):
            shutil.rmtree(path, ignore_errors=True)


def _checkpoints(directory: Path) -> list[Path]:
    return [path for path in directory.iterdir() if path.is_dir() and _CHECKPOINT.match(path.name)]


def _is_complete_checkpoint(path: Path) -> bool:
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return _has_weights(path)


def _has_weights(path: Path) -> bool:
    return any((path / name).exists() for name in _WEIGHT_FILES)


# --- the saved model --------------------------------------------------------------------------


def is_complete_model(path: Path) -> bool:
    """A finished model directory: it only ever appears by renaming a fully written one."""
    return (path / SUMMARY).exists() and _has_weights(path)


def save_trained_model(trainer: Any, tokenizer: Any, output: Path, summary: dict[str, Any], merge_lora: bool) -> None:
    """Save a Trainer's model to `output` (absent or whole) from every process of a launch.

    In one process or under DDP every process holds the whole model: the main process merges a
    LoRA adapter if asked and saves. Under DeepSpeed ZeRO-3 or FSDP the weights are spread over the
    processes: `Trainer.save_model` gathers them (all processes take part; the main one writes),
    then the main process adds the rest and renames the directory into place. All processes
    leave together.

    Args:
        trainer: the trained `Trainer` (SFT, reward, DPO, ...).
        tokenizer: saved alongside.
        output: the model directory.
        summary: what training measured (`training_summary.json`).
        merge_lora: merge a LoRA adapter into the weights (refused under sharding: `check_launch`).
    """
    if sharding_strategy():
        partial = output.with_name(output.name + ".partial")
        if is_main_process():
            shutil.rmtree(partial, ignore_errors=True)
        wait_for_everyone()
        trainer.save_model(str(partial))
        if is_main_process():
            _finish_partial(partial, tokenizer, output, summary, trainer.state)
    elif is_main_process():
        model = trainer.model.merge_and_unload() if merge_lora else trainer.model
        save_model_atomic(model, tokenizer, output, summary, trainer.state)
    wait_for_everyone()


def check_launch(stage: str, merge_lora: bool) -> None:
    """What a training stage cannot do under this launch, found before anything runs.

    Args:
        stage: the stage's name, for the message.
        merge_lora: whether the stage would merge a LoRA adapter into the weights when saving.

    Raises:
        UserError: LoRA merging while DeepSpeed ZeRO-3 or FSDP shards the weights; a sharded launch
            without GPUs (accelerate shards only on GPUs: it would train as DDP, on weights loaded
            for sharding).
    """
    strategy = sharding_strategy()
    if strategy and merge_lora:
        raise UserError(
            f"{stage}.lora: merging a LoRA adapter into weights that {strategy} shards over the processes is not "
            f"supported; turn {stage}.lora.enabled off (full fine-tuning) or launch with DDP"
        )
    if strategy:
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                f"{stage}: this launch asks {strategy} to shard the weights, but there is no GPU, and accelerate "
                "shards only on GPUs; on CPUs launch with DDP (configs/accelerate/ddp.yaml, or torchrun)"
            )


def save_model_atomic(
    model: Any, tokenizer: Any, output: Path, summary: dict[str, Any], trainer_state: Any | None = None
) -> None:
    """Save weights (safetensors), tokenizer and summary so that `output` is either absent or whole.

    Everything is written to `<output>.partial`, which is then renamed into place. An existing
    `output` is replaced: callers check `is_complete_model` first, so it is a leftover without a
    summary (a directory copied in by hand, an older layout), never a finished model.

    A causal LM's tokenizer is saved with the chat template of the plain transcript it was trained
    on (`prompts.plain_chat_template`), replacing any template of the base model's, so that
    `apply_chat_template` and `vllm serve` on `output` render that format; a sequence classifier's
    (the PM's) is saved as it is. The caller's tokenizer object is left unchanged.

    Args:
        model: what to save, with `save_pretrained`; a LoRA model merged by the caller if wanted
            (unmerged, PEFT saves the adapter alone).
        tokenizer: saved alongside, so the directory loads on its own.
        output: the model directory, e.g. `models/sl-cai`.
        summary: what training measured, kept as `training_summary.json`.
        trainer_state: the Trainer's `state`, kept as `trainer_state.json` (loss curve, steps,
            resumes); None to leave it out.
    """
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)  # safetensors is the only format transformers 5 writes
    _finish_partial(partial, tokenizer, output, summary, trainer_state)


def _finish_partial(partial: Path, tokenizer: Any, output: Path, summary: dict[str, Any], trainer_state: Any) -> None:
    """Add tokenizer, trainer state and summary to the weights in `partial`, then rename it to `output`."""
    _save_tokenizer(tokenizer, partial)
    if trainer_state is not None:
        trainer_state.save_to_json(str(partial / "trainer_state.json"))
    (partial / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(output, ignore_errors=True)
    os.replace(partial, output)


# What a tokenizer's chat template is saved as (transformers 5: the .jinja files; older: the .json).
_CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "additional_chat_templates")


def _save_tokenizer(tokenizer: Any, partial: Path) -> None:
    """Save `tokenizer` into `partial`; a causal LM's with the plain transcript's chat template.

    The template is set for the save only, so the caller's tokenizer renders as before. Template
    files already in `partial` (under ZeRO-3 or FSDP, `Trainer.save_model` saved the tokenizer with
    the base model's template) are removed first: a named template of the base model's left in
    `additional_chat_templates/` would load back next to ours.
    """
    if _is_sequence_classifier(partial):
        tokenizer.save_pretrained(partial)
        return
    for path in (partial / name for name in _CHAT_TEMPLATE_FILES):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    original = tokenizer.chat_template
    tokenizer.chat_template = plain_chat_template(bos_token=_adds_bos(tokenizer))
    try:
        tokenizer.save_pretrained(partial)
    finally:
        tokenizer.chat_template = original


def _is_sequence_classifier(partial: Path) -> bool:
    """Whether the model saved in `partial` is a sequence classifier (the PM), from its saved config.

    Anything else (`LlamaForCausalLM`, `Gemma3ForCausalLM`, a causal LoRA adapter) is taken for a
    causal LM: every other model this package saves is one.
    """
    adapter = partial / "adapter_config.json"
    if adapter.exists():
        return json.loads(adapter.read_text(encoding="utf-8")).get("task_type") == "SEQ_CLS"
    config = partial / "config.json"
    if not config.exists():
        return False
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def _adds_bos(tokenizer: Any) -> bool:
    """Whether `tokenizer` puts its BOS token in front when it tokenises text, as training prompts are."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("Human:")["input_ids"][:1] == [bos]
