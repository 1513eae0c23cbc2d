"""Config sections shared by every stage, and the machinery that builds typed sections from YAML.

Each stage owns its own section (a dataclass named `Settings` in its module, with a `validate`
method next to its fields); `config.py` assembles the full config from those and the core sections
here. YAML only sets values: every field, its type and its default live in a dataclass, and
building validates as it goes, naming the offending key (`critique.rounds: expected an integer,
got 'four'`).

Fields marked with `runtime(...)` change how a stage runs (chunk sizes, logging), not what it
produces: changing them never makes a finished stage stale.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from constitutional.backends import BACKENDS, Backend, import_backend, load_backend
from constitutional.backends.settings import OpenAISettings, TransformersSettings, VLLMSettings
from constitutional.errors import UserError, require
from constitutional.training import TrainingSettings

PromptFormat = Literal["auto", "plain", "chat"]
MODEL_ROLES = ("helpful", "base", "feedback")


def runtime(default: Any) -> Any:
    """A field that shapes how a stage runs, not its results (left out of stage fingerprints)."""
    return field(default=default, metadata={"runtime": True})


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
    backend: str | None = runtime(None)  # which engine serves a model is how a stage runs, not what it makes
    prompt_format: PromptFormat = "auto"


@dataclass
class ModelsConfig:
    """The models of the pipeline (paper: helpful RLHF model, pretrained LM, feedback model)."""

    helpful: ModelSpec = field(default_factory=ModelSpec)  # answers, critiques and revises
    base: ModelSpec = field(default_factory=ModelSpec)  # the pretrained model SL-CAI starts from
    feedback: ModelSpec = field(default_factory=ModelSpec)  # answers the multiple-choice question


@dataclass
class DataConfig:
    """Prompt and preference sources: a path, `hf:<dataset id>[:split][?name=..&data_dir=..&split=..&revision=..]`,
    or `builtin`."""

    red_team: str = "builtin"
    helpful: str = "builtin"
    human_preferences: str = "builtin"
    max_red_team: int | None = None  # use the first N prompts (None: all)
    max_helpful: int | None = None

    def validate(self) -> None:
        for key in ("max_red_team", "max_helpful"):
            value = getattr(self, key)
            require(value is None or value > 0, f"data.{key}: expected a positive number, got {value}")


@dataclass
class CacheConfig:
    """Generation cache: a re-run pays nothing twice."""

    enabled: bool = runtime(True)
    path: str | None = runtime(None)  # default: <run dir>/cache/generations.sqlite


# A hub repository id: owner/name, each part letters, digits, '-', '_' and '.', not starting or ending with
# '-' or '.', no '--' or '..' (the hub's own rule); names up to 96 characters.
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}")
HUB_MODELS = ("sl_cai", "pm", "rl_cai")


@dataclass
class HubConfig:
    """Pushing the run's models to the Hugging Face Hub (`hub.py`): a repository id per model, or null.

    Every key is runtime: where a model is published never changes what a stage makes. The token is
    read from the environment variable named by `token_env`, never from the config.
    """

    sl_cai: str | None = runtime(None)  # models/sl-cai, pushed after stage sl (e.g. me/sl-cai)
    pm: str | None = runtime(None)  # models/pm, pushed after stage pm
    rl_cai: str | None = runtime(None)  # models/rl-cai, pushed after stage rl
    private: bool = runtime(True)  # visibility of a repository this run creates (an existing one keeps its own)
    token_env: str = runtime("HF_TOKEN")  # the environment variable holding a token with write access

    def validate(self) -> None:
        require(
            re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.token_env) is not None,
            f"hub.token_env: expected the name of an environment variable, got {self.token_env!r}",
        )
        seen: dict[str, str] = {}
        for key in HUB_MODELS:
            repo = getattr(self, key)
            if repo is None:
                continue
            require(
                HUB_ID.fullmatch(repo) is not None and "--" not in repo and ".." not in repo,
                f"hub.{key}: expected a repository id of the form owner/name (letters, digits, '-', '_', '.'), "
                f"got {repo!r}",
            )
            require(
                repo.lower() not in seen,
                f"hub.{key}: {repo} is also hub.{seen.get(repo.lower())}: each model needs its own repository",
            )
            seen[repo.lower()] = key


@dataclass
class CoreConfig:
    """What every stage may read: seed, models, data, constitution, back ends, training, cache.

    The full config (`config.Config`) adds one section per stage.
    """

    seed: int = 0
    backend: str = "transformers"  # transformers | vllm | openai (per model overridable)
    constitution: str = "default"  # default, a path to our YAML, or the paper's JSON folder
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    transformers: TransformersSettings = field(default_factory=TransformersSettings)
    openai: OpenAISettings = field(default_factory=OpenAISettings)
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    cache: CacheConfig = field(default_factory=CacheConfig)
    hub: HubConfig = field(default_factory=HubConfig)  # read by the pipeline, never by a stage
    # Directory the config file was read from: relative data and model paths resolve against it.
    base_dir: str = field(default=".", metadata={"internal": True})

    def validate(self) -> None:
        """Checks across sections: back-end names exist and every model has a name."""
        keys = [("backend", self.backend)] + [
            (f"models.{role}.backend", self.model(role).backend) for role in MODEL_ROLES
        ]
        for key, name in keys:
            require(
                name is None or name in BACKENDS,
                f"{key}: unknown back end {name!r}: expected one of {', '.join(sorted(BACKENDS))}",
            )
        for role in MODEL_ROLES:
            require(bool(self.model(role).name.strip()), f"models.{role}: expected a model name, got an empty string")

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config as plain data (what `config.yaml` in the run directory holds)."""
        data = dataclasses.asdict(self)
        data.pop("base_dir")
        return data

    def model(self, role: str) -> ModelSpec:
        """`models.<role>`."""
        return getattr(self.models, role)

    def backend_for(self, spec: ModelSpec) -> str:
        """The back end that serves `spec`."""
        return spec.backend or self.backend

    def resolve_path(self, value: str) -> Path:
        """A user path, relative to the config file's directory unless absolute."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path

    def remote_code_keys(self) -> list[str]:
        """The `trust_remote_code` settings that are on: code from a model's repository may run.

        The pipeline records them in each stage's manifest entry and warns, so a run that executed
        downloaded code says so.
        """
        sections = {"transformers": self.transformers, "vllm": self.vllm, "training": self.training}
        return [f"{name}.trust_remote_code" for name, section in sections.items() if section.trust_remote_code]

    def check_model(self, spec: ModelSpec, key: str, scores_options: bool = False) -> None:
        """Validate a model before anything runs: its back end imports and a local name resolves.

        Args:
            spec: the model.
            key: its config key, for messages.
            scores_options: the stage asks it multiple-choice questions: a server is asked once,
                now, whether it can score options (`backends.openai.check_option_scoring`).

        Raises:
            UserError: naming `key`, e.g. "models.base: no such model ...".
        """
        from constitutional.models import resolve_model_name

        backend = self.backend_for(spec)
        import_backend(backend)
        if backend == "openai":  # a server's model names are the server's business
            if scores_options:
                from constitutional.backends.openai import check_option_scoring

                check_option_scoring(spec.name, self.openai, key)
            return
        try:
            resolve_model_name(spec.name, self.base_dir)
        except UserError as error:
            raise UserError(f"{key}: {error}") from None

    def open_backend(self, spec: ModelSpec, cache_path: Path | None) -> Backend:
        """Load the model named by `spec` with its back end, behind the generation cache if enabled.

        Args:
            spec: the model (name, back-end override).
            cache_path: where the cache lives unless `cache.path` says otherwise.
        """
        from constitutional.backends.cache import CachingBackend

        name = self.backend_for(spec)
        backend = load_backend(name, spec.name, getattr(self, name, None), self.base_dir, self.seed)
        if not self.cache.enabled:
            return backend
        path = self.resolve_path(self.cache.path) if self.cache.path else cache_path
        if path is None:
            return backend
        try:
            return CachingBackend(backend, path)
        except BaseException:  # the cache could not open: free the engine just loaded (a GPU's memory)
            backend.close()
            raise


# ----------------------------------------------------------------------------- building sections


def build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from `data`, checking keys and types, then run its `validate()`.

    Args:
        cls: the section's dataclass.
        data: the raw YAML value.
        prefix: the section's key path with a trailing dot ("critique."), "" at the top.
    """
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
    data = {name: _over_default(fields[name], value) for name, value in data.items()}
    section = cls(**{name: _convert(hints[name], value, f"{prefix}{name}") for name, value in data.items()})
    if hasattr(section, "validate"):
        section.validate()
    return section


def _over_default(item: dataclasses.Field, value: Any) -> Any:
    """A mapping given for a nested section whose default is not its class's default, laid over that default.

    `rl.lora` defaults to `LoraSettings(enabled=True)`: YAML `lora: {r: 8}` means "rank 8", not
    "rank 8 and LoRA off" (which building `LoraSettings(r=8)` from scratch would give).
    """
    factory = item.default_factory
    if not isinstance(value, dict) or factory is dataclasses.MISSING:
        return value
    default = factory()
    if not dataclasses.is_dataclass(default) or default == type(default)():
        return value
    changed = {f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.init}
    changed = {name: v for name, v in changed.items() if v != getattr(type(default)(), name)}
    as_data = {name: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for name, v in changed.items()}
    return {**as_data, **value}


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
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {_show(value)}")
        (inner,) = typing.get_args(annotation)
        return [_convert(inner, item, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {_show(value)}")
        _, inner = typing.get_args(annotation)
        return {str(name): _convert(inner, item, f"{key}.{name}") for name, item in value.items()}
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


def flatten(section: Any, prefix: str, *, skip_runtime: bool = True) -> dict[str, Any]:
    """A section's values as {"critique.rounds": 2, ...}, nested sections flattened.

    Args:
        section: a dataclass instance.
        prefix: its key path ("critique").
        skip_runtime: leave out `runtime(...)` fields (for fingerprints).
    """
    if isinstance(section, dict):
        entries: dict[str, Any] = {}
        for name, item in section.items():
            entries.update(flatten(item, f"{prefix}.{name}", skip_runtime=skip_runtime))
        return entries or {prefix: {}}
    if isinstance(section, list):
        return {prefix: [dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item for item in section]}
    if not dataclasses.is_dataclass(section):
        return {prefix: section}
    values: dict[str, Any] = {}
    for item in dataclasses.fields(section):
        if item.metadata.get("internal") or (skip_runtime and item.metadata.get("runtime")):
            continue
        values.update(flatten(getattr(section, item.name), f"{prefix}.{item.name}", skip_runtime=skip_runtime))
    return values
