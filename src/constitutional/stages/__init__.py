"""The pipeline's stages, one module each, registered here in the paper's order.

The stage contract: a stage module has
- `NAME`: its name, also the name of its config section;
- `Settings`: the dataclass of that section, fields documented, with a `validate()` that names a bad
  key. Fields made with `sections.runtime(...)` change how it runs, not what it produces;
- `CONFIG_KEYS`: the keys outside its own section whose values shape its output ("seed",
  "models.helpful", ...). Together with its section they are the stage's settings: the manifest
  records them, and a later run that changes one makes the stage stale;
- `reads(config, settings) -> [artefact]`: the artefacts of the run directory it reads (names from
  `registry.ARTEFACTS`; which stage makes each is recorded there);
- optionally `active(config, settings) -> bool`: False when the stage makes nothing (stage `augment`
  while off); its settings are then its own section alone;
- optionally `optional_reads(config, settings) -> [artefact]`: artefacts it uses when they exist
  (stage `eval` evaluates whatever the run has); fingerprinted like `reads`, never required;
- `check(config, settings) -> inputs`: loads and validates everything it reads from outside the
  run directory, writing nothing (every stage is checked before the first one runs);
- `input_hashes(inputs) -> {name: fingerprint}` of those outside inputs;
- `run(config, settings, run_dir, inputs) -> counts`: does the work, resuming what was started.
Stages never import each other: they talk through the run directory. The facts about stages that
the rest of the package needs (order, outputs, sharding) are in `registry.py`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from constitutional.registry import STAGES

__all__ = ["STAGES", "stage_module", "stage_modules"]


def stage_module(name: str) -> ModuleType:
    """The module of stage `name` (one of STAGES)."""
    return importlib.import_module(f"constitutional.stages.{name}")


def stage_modules() -> dict[str, ModuleType]:
    """Every registered stage's module, in pipeline order."""
    return {name: stage_module(name) for name in STAGES}
