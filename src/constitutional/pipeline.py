"""Running stages in order: validate everything first, then write, skip what is done, resume the rest."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import yaml

from constitutional.config import Config
from constitutional.errors import UserError
from constitutional.records import RunDir
from constitutional.stages import BUILT, ORDER

log = logging.getLogger(__name__)


def parse_stages(text: str | None) -> list[str]:
    """`critique,sl` -> ["critique", "sl"] in pipeline order; None -> every stage built so far.

    Raises:
        UserError: an unknown stage, or one that is not built yet.
    """
    if text is None:
        return list(BUILT)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError("--stages: expected a comma-separated list of stages")
    for name in names:
        if name not in ORDER:
            raise UserError(f"--stages: unknown stage {name!r}: expected one of {', '.join(ORDER)}")
        if name not in BUILT:
            raise UserError(f"--stages: stage {name!r} is not implemented yet (available: {', '.join(BUILT)})")
    return [name for name in ORDER if name in names]


def run_pipeline(config: Config, run_dir: Path, stages: list[str]) -> RunDir:
    """Run `stages` of `config` in `run_dir`.

    Every stage's inputs are loaded and validated before the run directory is touched, so bad
    input leaves nothing half-written. Stages already `done` are skipped; an interrupted stage
    resumes from its records.
    """
    modules = {name: importlib.import_module(f"constitutional.stages.{name}") for name in stages}
    inputs = {name: module.check(config) for name, module in modules.items()}
    run = RunDir(run_dir)
    write_config(run, config)
    for name, module in modules.items():
        if run.stage_status(name) == "done":
            log.info("%s: already done, skipping", name)
            continue
        run.start_stage(name, module.input_hashes(inputs[name]))
        try:
            counts = module.run(config, run, inputs[name])
        except BaseException as error:
            run.fail_stage(name, _describe(error))
            raise
        run.finish_stage(name, counts)
        log.info("%s: done %s", name, counts)
    return run


def _describe(error: BaseException) -> str:
    """One line for the manifest about why a stage stopped."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def write_config(run: RunDir, config: Config) -> None:
    """Write the resolved config, or refuse if the run directory holds a different one.

    Resuming with another config would mix records made under two settings in one file.
    """
    path = run.root / "config.yaml"
    resolved = config.to_dict()
    if path.exists():
        previous = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        difference = first_difference(previous, resolved)
        if difference:
            raise UserError(
                f"{run.root}: holds a run with a different config ({difference}); "
                "use another --run-dir, or the same settings to resume"
            )
        return
    run.root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), encoding="utf-8")


def first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    """The first key path where two nested mappings differ, as 'key: old -> new'.

    Keys the old config lacks are not differences: they are settings a newer version added, at
    their defaults.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            found = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"
