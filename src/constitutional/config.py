"""Typed run configuration: one section per stage, loaded from YAML, overridden with --set.

YAML only sets values; every field, its type and its default live here. Loading validates as it
goes and names the offending key (`critique.rounds: expected an integer, got 'four'`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from constitutional.errors import UserError

PromptFormat = Literal["auto", "plain", "chat"]


@dataclass
class ModelSpec:
    """A model and how to reach it. In YAML either a bare name or a mapping.

    Attributes:
        name: `embedded`, a Hugging Face id, a local directory or a `.gguf` file
            (for the `openai` back end: the server's model name).
        backend: overrides the run's `backend` for this model.
        prompt_format: `plain` renders the paper's `Human:`/`Assistant:` transcript with few-shot
            examples; `chat` uses the model's own chat template; `auto` picks `chat` when the model
            has a template, else `plain`.
    """

    name: str = "embedded"
    backend: str | None = None
    prompt_format: PromptFormat = "auto"


@dataclass
class ModelsConfig:
    """The models of the pipeline (paper: helpful RLHF model, pretrained LM, feedback model)."""

    helpful: ModelSpec = field(default_factory=ModelSpec)  # answers, critiques and revises
    base: ModelSpec = field(default_factory=ModelSpec)  # the pretrained model SL-CAI starts from
    feedback: ModelSpec = field(default_factory=ModelSpec)  # answers the multiple-choice question


@dataclass
class DataConfig:
    """Prompt and preference sources: a path, `hf:<dataset id>[:split]`, or `builtin`."""

    red_team: str = "builtin"
    helpful: str = "builtin"
    human_preferences: str = "builtin"
    max_red_team: int | None = None  # use the first N prompts (None: all)
    max_helpful: int | None = None


@dataclass
class CritiqueConfig:
    """Stage `critique` (paper steps 1-3)."""

    rounds: int = 4  # critique-revision rounds, a freshly sampled principle each (paper: 4)
    max_new_tokens: int = 128  # per answer, critique and revision
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    chunk_size: int = 32  # prompts carried through all rounds together, then written out
    num_fewshot: int | None = None  # critique/revision examples in the prompt (None: all)


@dataclass
class LoraSettings:
    """LoRA (PEFT) instead of full fine-tuning."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = "all-linear"  # or a comma-separated list of module names
    merge: bool = True  # merge the adapter into the weights when saving, so every back end loads it


@dataclass
class SLConfig:
    """Stage `sl` (paper step 4): supervised fine-tuning of the pretrained model -> SL-CAI."""

    helpful_fraction: float | None = None  # share of helpfulness examples in the mix (None: all there are)
    epochs: float = 1.0  # the paper: 1 epoch
    learning_rate: float = 1e-5
    lr_scheduler: str = "constant"  # the paper: constant learning rate
    warmup_steps: int = 0
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512  # tokens per example (prompt + response), longer ones are truncated
    save_steps: int = 50  # checkpoint every N optimizer steps; an interrupted run resumes from the last
    logging_steps: int = 5
    report_to: str = "none"  # none | tensorboard | wandb
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class PairsConfig:
    """Stage `pairs` (paper step 5): SL-CAI samples two answers per red-team prompt."""

    model: str | None = None  # default: the run's models/sl-cai
    temperature: float = 1.0  # the paper: T = 1
    top_p: float = 1.0
    max_new_tokens: int = 128
    chunk_size: int = 32


@dataclass
class FeedbackConfig:
    """Stage `feedback` (paper step 6): multiple-choice AI preference labels."""

    debias: bool = True  # score both option orders and average (position bias)
    principles_per_comparison: int = 1  # k > 1: ensemble over k sampled principles, averaged
    cot: bool = False  # chain-of-thought first, then read the option probabilities
    cot_max_new_tokens: int = 128
    clamp_low: float = 0.4  # with chain-of-thought, p_a is clamped to [clamp_low, clamp_high]
    clamp_high: float = 0.6
    hard_labels: bool = False  # ablation: p_a rounded to 0 or 1
    num_fewshot: int | None = None  # few-shot examples in the prompt (None: all)
    chunk_size: int = 32


@dataclass
class TransformersSettings:
    """The local `transformers` back end."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 where supported
    batch_size: int = 32  # sequences per forward pass
    # Prefill a batch's shared prompt prefix (few-shot examples) once. Exact for full-attention
    # models; for sliding-window models with prompts longer than the window, see
    # TransformersBackend._shareable_prefix_length.
    share_prefix: bool = True
    trust_remote_code: bool = False


@dataclass
class OpenAISettings:
    """Any OpenAI-compatible completions server (vLLM, llama.cpp, TGI, hosted)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from the config
    max_concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 6  # on 429, 5xx, timeouts and connection errors
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0


@dataclass
class VLLMSettings:
    """The in-process vLLM engine (optional extra `constitutional[vllm]`)."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    dtype: str = "auto"
    max_model_len: int | None = None
    trust_remote_code: bool = False


@dataclass
class CacheConfig:
    """Generation cache: a re-run pays nothing twice."""

    enabled: bool = True
    path: str | None = None  # default: <run dir>/cache/generations.sqlite


@dataclass
class Config:
    """One run of the pipeline."""

    seed: int = 0
    backend: str = "transformers"  # transformers | vllm | openai (per model overridable)
    constitution: str = "default"  # default, a path to our YAML, or the paper's JSON folder
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    critique: CritiqueConfig = field(default_factory=CritiqueConfig)
    sl: SLConfig = field(default_factory=SLConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    transformers: TransformersSettings = field(default_factory=TransformersSettings)
    openai: OpenAISettings = field(default_factory=OpenAISettings)
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # Directory the config file was read from: relative data and model paths resolve against it.
    base_dir: str = field(default=".", metadata={"internal": True})

    def backend_for(self, spec: ModelSpec) -> str:
        """The back end that serves `spec`."""
        return spec.backend or self.backend

    def resolve_path(self, value: str) -> Path:
        """A user path, relative to the config file's directory unless absolute."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config as plain data (what `config.yaml` in the run directory holds)."""
        data = dataclasses.asdict(self)
        data.pop("base_dir")
        return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `key.path=value` overrides, validate.

    Raises:
        UserError: unreadable file, invalid YAML, unknown key, wrong type, bad override.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    for override in overrides or []:
        apply_override(data, override)
    config = build(Config, data, "")
    config.base_dir = str(path.resolve().parent)
    validate(config)
    return config


def config_from_dict(data: dict[str, Any], base_dir: str = ".") -> Config:
    """Build and validate a Config from plain data (tests, `config.yaml` of a run directory)."""
    config = build(Config, data, "")
    config.base_dir = base_dir
    validate(config)
    return config


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override to raw config data; the value is parsed as YAML."""
    key, sep, raw_value = override.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {override!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    parts = key.strip().split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None or not isinstance(child, dict):
            # A model given by bare name gets promoted to a mapping so `models.x.backend=` works.
            child = {"name": child} if isinstance(child, str) else {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from `data`, checking keys and types; `prefix` names the position."""
    if cls is ModelSpec and isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise UserError(f"unknown config key {key!r}: expected one of {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, f"{prefix}{name}")
    return cls(**values)


def _convert(annotation: Any, value: Any, key: str) -> Any:
    """Check `value` against a type annotation, converting where lossless (int -> float)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _convert(inner, value, key)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise UserError(f"{key}: expected one of {', '.join(map(str, allowed))}, got {_show(value)}")
        return value
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, f"{key}.")
    if annotation is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {_show(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {_show(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {_show(value)}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _show(value: Any) -> str:
    return "nothing" if value is None else repr(value)


def validate(config: Config) -> None:
    """Checks across fields that types alone cannot express."""
    from constitutional.backends import BACKENDS

    def positive(key: str, value: int | float | None) -> None:
        if value is not None and value <= 0:
            raise UserError(f"{key}: expected a positive number, got {value}")

    for key, spec in [("backend", config.backend)] + [
        (f"models.{role}.backend", getattr(config.models, role).backend) for role in ("helpful", "base", "feedback")
    ]:
        if spec is not None and spec not in BACKENDS:
            raise UserError(f"{key}: unknown back end {spec!r}: expected one of {', '.join(sorted(BACKENDS))}")
    for role in ("helpful", "base", "feedback"):
        if not getattr(config.models, role).name.strip():
            raise UserError(f"models.{role}: expected a model name, got an empty string")
    if config.critique.rounds < 0:
        raise UserError(f"critique.rounds: expected 0 or more, got {config.critique.rounds}")
    positive("critique.max_new_tokens", config.critique.max_new_tokens)
    positive("critique.chunk_size", config.critique.chunk_size)
    positive("transformers.batch_size", config.transformers.batch_size)
    positive("openai.max_concurrency", config.openai.max_concurrency)
    positive("openai.timeout_s", config.openai.timeout_s)
    positive("data.max_red_team", config.data.max_red_team)
    positive("data.max_helpful", config.data.max_helpful)
    if config.critique.temperature < 0:
        raise UserError(f"critique.temperature: expected 0 or more, got {config.critique.temperature}")
    if not 0 < config.critique.top_p <= 1:
        raise UserError(f"critique.top_p: expected a number in (0, 1], got {config.critique.top_p}")
