"""The run configuration: the core sections plus one section per registered stage.

YAML only sets values; every field, its type and its default live in a dataclass: the core
sections in `sections.py`, each stage's `Settings` in its own module. `load_config` reads YAML,
applies `--set key.path=value` overrides and validates, naming the offending key.
"""

from __future__ import annotations

from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Any

import yaml

from constitutional.errors import UserError, invalid_yaml
from constitutional.sections import CoreConfig, ModelSpec, build, flatten
from constitutional.stages import stage_modules

__all__ = ["Config", "ModelSpec", "load_config", "config_from_dict", "apply_override", "stage_settings"]


def _assemble() -> type:
    """`Config`: CoreConfig plus a `<stage>: <stage>.Settings` field per registered stage, in order."""
    sections = [
        (name, module.Settings, field(default_factory=module.Settings)) for name, module in stage_modules().items()
    ]
    config = make_dataclass("Config", sections, bases=(CoreConfig,))
    config.__doc__ = "One run of the pipeline: the core sections and one section per stage."
    config.__module__ = __name__
    return config


Config = _assemble()


def stage_settings(config: Any, module: Any) -> dict[str, Any]:
    """Every config value a stage's output depends on, flattened: its section and its CONFIG_KEYS.

    Runtime-only fields (chunk sizes, logging) are left out: changing them never makes a stage stale.
    A stage whose optional `active(config, settings)` says it makes nothing (stage `augment` while
    off) depends on its own section alone.
    """
    section = getattr(config, module.NAME)
    values = flatten(section, module.NAME)
    active = getattr(module, "active", None)
    if active is not None and not active(config, section):
        return values
    for key in module.CONFIG_KEYS:
        node = config
        for part in key.split("."):
            node = getattr(node, part)
        values.update(flatten(node, key))
    return values


def load_config(path: str | Path, overrides: list[str] | None = None) -> Any:
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
        raise invalid_yaml(str(path), error) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    for override in overrides or []:
        apply_override(data, override)
    return config_from_dict(data, str(path.resolve().parent))


def config_from_dict(data: dict[str, Any], base_dir: str = ".") -> Any:
    """Build and validate a Config from plain data (tests, `config.yaml` of a run directory)."""
    config = build(Config, data, "")
    config.base_dir = base_dir
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
    for part in parts[:-1]:
        child = node.get(part)
        if child is None or not isinstance(child, dict):
            # A model given by bare name gets promoted to a mapping so `models.x.backend=` works.
            child = {"name": child} if isinstance(child, str) else {}
            node[part] = child
        node = child
    node[parts[-1]] = value
