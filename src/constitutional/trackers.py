"""Experiment trackers (`training.report_to`): one W&B run or TensorBoard folder per stage attempt.

Every stage logs to the tracker: `sl` and `pm` through their Trainer's callbacks, `rl` one line of
metrics per PPO step, and every stage, generating ones included, its counts and the figures of its
report files (`eval/feedback.json`, `eval/pm.json`, `eval/metrics.json`) when it finishes.

A stage's tracker run has a stable id, kept in its manifest entry (`tracker_run`): a stage that
was interrupted and resumes logs to the same W&B run (`resume="allow"`) and the same TensorBoard
folder, `logs/tensorboard/<id>/` (the id begins with the stage's name); a stage run again
(`--rerun`, which resets its entry) gets a new one. The W&B runs of one run directory share a
group, `training.run_name` (by default the run directory's name), so its stages show together.

wandb and tensorboard are optional: `check_report_to` refuses a tracker whose package is missing,
and a W&B run that could not log in, before anything is written. Imported lazily.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from constitutional.errors import UserError
from constitutional.registry import stage_facts

REPORT_TO = ("none", "tensorboard", "wandb")
# Packages a tracker needs; either one will do.
_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
_OFFLINE_MODES = ("offline", "disabled", "dryrun")
_MAX_FIGURES = 500  # a report file's numbers logged at the end of its stage, at most


def check_report_to(value: str) -> None:
    """`none`, or a tracker whose package is installed and, for W&B online, a login (found now, not after an hour)."""
    if value not in REPORT_TO:
        raise UserError(f"training.report_to: expected one of {', '.join(REPORT_TO)}, got {value!r}")
    needs = _TRACKER_PACKAGES.get(value, ())
    if needs and not any(importlib.util.find_spec(package) for package in needs):
        raise UserError(f"training.report_to: {value!r} needs the {needs[0]} package (pip install {needs[0]})")
    if value == "wandb" and not _wandb_can_log():
        raise UserError(
            "training.report_to: 'wandb' has no W&B login here: run `wandb login`, set WANDB_API_KEY, "
            "or set WANDB_MODE=offline (sync later with `wandb sync`)"
        )


def _wandb_can_log() -> bool:
    """Offline, or a key in the environment or in ~/.netrc for the W&B host (where `wandb login` writes it)."""
    if os.environ.get("WANDB_MODE", "").lower() in _OFFLINE_MODES or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def new_run_id(stage: str) -> str:
    """A fresh tracker id for one attempt of `stage` (W&B ids: letters, digits, '-', unique per project)."""
    return f"{stage}-{secrets.token_hex(4)}"


def tensorboard_dir(root: Path, run_id: str) -> Path:
    """Where one stage attempt writes its TensorBoard events (the Trainer's and ours alike)."""
    return root / "logs" / "tensorboard" / run_id


class StageTracker:
    """The open tracker of the running stage: `log_step` while it runs, `finish` when it ends."""

    def __init__(self, training: Any, root: Path, stage: str, run_id: str, settings: dict[str, Any]) -> None:
        self.report_to, self.stage, self.last_step = training.report_to, stage, 0
        self._writer: Any = None
        self._restore_env: dict[str, str | None] = {}
        if self.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            folder = tensorboard_dir(root, run_id)
            self._writer = SummaryWriter(log_dir=str(folder))
            self._set_env("TENSORBOARD_LOGGING_DIR", str(folder))  # where the Trainer's callback writes
        elif self.report_to == "wandb":
            import wandb

            (root / "logs").mkdir(parents=True, exist_ok=True)
            group = training.run_name or root.resolve().name
            wandb.init(
                project=training.project or os.environ.get("WANDB_PROJECT") or "constitutional",
                entity=training.entity or None,
                group=group,
                name=f"{group}/{stage}",
                job_type=stage,
                id=run_id,
                resume="allow",
                dir=str(root / "logs"),
                config=settings,
            )

    def _set_env(self, name: str, value: str) -> None:
        self._restore_env[name] = os.environ.get(name)
        os.environ[name] = value

    def log_step(self, metrics: dict[str, Any], step: int) -> None:
        """One step's numbers, as `<stage>/<name>`."""
        numbers = {f"{self.stage}/{name}": value for name, value in _numbers(metrics).items()}
        self.last_step = max(self.last_step, step)
        if self._writer is not None:
            for name, value in numbers.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()
        elif self.report_to == "wandb":
            import wandb

            wandb.log(numbers, step=step)

    def finish(self, counts: dict[str, Any] | None, figures: dict[str, Any], failed: bool = False) -> None:
        """Log the stage's counts and report figures (as its summary), then close the tracker."""
        final = {f"{self.stage}/{name}": value for name, value in {**_numbers(counts or {}), **figures}.items()}
        if self._writer is not None:
            for name, value in final.items():
                self._writer.add_scalar(name, value, self.last_step)
            self._writer.close()
        elif self.report_to == "wandb":
            import wandb

            if wandb.run is not None:
                wandb.run.summary.update(final)
                wandb.finish(exit_code=1 if failed else 0)
        for name, value in self._restore_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_ACTIVE: StageTracker | None = None


def open_stage(training: Any, root: Path, stage: str, run_id: str | None, settings: dict[str, Any]) -> None:
    """Open the tracker of `stage` (process 0 only; nothing with `report_to: none`)."""
    global _ACTIVE
    if training.report_to != "none" and run_id:
        _ACTIVE = StageTracker(training, root, stage, run_id, settings)


def log_step(metrics: dict[str, Any], step: int) -> None:
    """Log one step's metrics to the running stage's tracker, if one is open (the other processes have none)."""
    if _ACTIVE is not None:
        _ACTIVE.log_step(metrics, step)


def close_stage(root: Path, counts: dict[str, Any] | None, failed: bool = False) -> None:
    """Log the finished stage's counts and the figures of its report files, and close its tracker."""
    global _ACTIVE
    if _ACTIVE is None:
        return
    tracker, _ACTIVE = _ACTIVE, None
    figures = {} if failed else report_figures(root, tracker.stage)
    tracker.finish(counts, figures, failed)


def report_figures(root: Path, stage: str) -> dict[str, float]:
    """The numbers of the stage's JSON report files, flattened (`pm/accuracy`, `elo/harmlessness/rl-cai`, ...)."""
    figures: dict[str, float] = {}
    for path in stage_facts(stage).outputs.values():
        file = root / path
        if file.suffix == ".json" and file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # a report is the stage's to check; a tracker never stops a run
            figures.update(_numbers(data, prefix=file.stem + "/"))
    return dict(list(figures.items())[:_MAX_FIGURES])


def _numbers(data: Any, prefix: str = "") -> dict[str, float]:
    """The int and float leaves of nested dicts, keyed by their path (booleans and lists left out)."""
    found: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, dict):
                found.update(_numbers(value, f"{prefix}{key}/"))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                found[f"{prefix}{key}"] = value
    return found
