"""A stage reads only the config keys it declares: its own section and its CONFIG_KEYS.

A key a stage reads but does not declare is missing from its manifest settings, so changing it
never makes the stage stale: the run silently reuses outputs made with the old value. Each stage
of the tiny pipeline runs here with a config object that records every key read through it (by the
stage and by whatever library code it hands the config or a section to), and any read outside
what the stage declares fails the test.

Not counted, by design: fields marked `runtime(...)` (how a stage runs, not what it makes), the
config's own folder (`base_dir`, how relative paths resolve), and the engine settings (`backend`,
`transformers`, `vllm`, `openai`, `cache`): which engine serves a model, and how, is recorded in the
generation cache's model ids, never in stage settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from constitutional import pipeline
from constitutional.config import config_from_dict
from constitutional.registry import STAGES

from conftest import tiny_config_data

ENGINE_SECTIONS = ("backend", "transformers", "vllm", "openai", "cache")


class Recording:
    """Stands in for a config section: every leaf read is recorded under its dotted key.

    Nested sections come back as Recordings too; a method is called with the Recording as `self`,
    so what the method reads is recorded as well.
    """

    def __init__(self, target: Any, prefix: str, reads: set[str]) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name: str) -> Any:
        target = object.__getattribute__(self, "_target")
        key = f"{self._prefix}.{name}" if self._prefix else name
        method = getattr(type(target), name, None)
        if callable(method) and not isinstance(method, type):
            return lambda *args, **kwargs: method(self, *args, **kwargs)
        value = getattr(target, name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return Recording(value, key, self._reads)
        self._reads.add(key)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AssertionError(f"a stage set config key {self._prefix}.{name}")


def declared(stage: Any, key: str, config: Any) -> bool:
    """Whether `stage` may read `key`: its own section, its CONFIG_KEYS, or a key that never shapes output."""
    covered = (stage.NAME, *stage.CONFIG_KEYS)
    if any(key == name or key.startswith(name + ".") for name in covered):
        return True
    if key.split(".")[0] in ENGINE_SECTIONS:
        return True
    *path, leaf = key.split(".")
    node = config
    for part in path:
        node = getattr(node, part)
    field = {item.name: item for item in dataclasses.fields(node)}.get(leaf) if dataclasses.is_dataclass(node) else None
    return field is not None and bool(field.metadata.get("runtime") or field.metadata.get("internal"))


class RecordingStage:
    """A stage module whose `check` and `run` see a Recording of the config."""

    def __init__(self, module: Any, reads: dict[str, set[str]]) -> None:
        self._module, self._reads = module, reads.setdefault(module.NAME, set())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def check(self, config: Any, settings: Any) -> Any:
        return self._module.check(Recording(config, "", self._reads), settings)

    def run(self, config: Any, settings: Any, run_dir: Any, inputs: Any) -> Any:
        return self._module.run(Recording(config, "", self._reads), settings, run_dir, inputs)


def run_recorded(monkeypatch, config: Any, run_dir: Any) -> dict[str, set[str]]:
    """Run every stage of `config` in `run_dir`; returns the config keys each stage read."""
    reads: dict[str, set[str]] = {}
    modules = pipeline.stage_modules()
    monkeypatch.setattr(pipeline, "stage_modules", lambda: {n: RecordingStage(m, reads) for n, m in modules.items()})
    pipeline.run_pipeline(config, run_dir, list(STAGES))
    return reads


# Stage augment off (its default: it reads nothing) and on (a few prompts of each kind).
@pytest.mark.parametrize(("judge", "augment"), [("pm", 0), ("model", 2)])
def test_every_stage_reads_only_the_config_keys_it_declares(tmp_path, tiny_model_dir, monkeypatch, judge, augment):
    data = tiny_config_data(
        tiny_model_dir,
        tmp_path,
        eval={"judge": judge, "max_red_team": 2, "max_helpful": 2},
        augment={"red_team": augment, "helpful": augment, "num_fewshot": 2, "max_new_tokens": 6, "max_attempts": 1},
    )
    config = config_from_dict(data)
    reads = run_recorded(monkeypatch, config, tmp_path / "run")
    assert set(reads) == set(STAGES)
    modules = pipeline.stage_modules()
    undeclared = {
        name: sorted(key for key in keys if not declared(modules[name], key, config)) for name, keys in reads.items()
    }
    assert not any(undeclared.values()), f"read but not declared in CONFIG_KEYS: {undeclared}"
    # The recorder sees what the stages read: each reads the seed (augment only when on: off, it reads
    # nothing), and eval the feedback few-shot count.
    assert all("seed" in keys for name, keys in reads.items() if name != "augment" or augment)
    assert augment or reads["augment"] == set()
    assert "feedback.num_fewshot" in reads["eval"]
