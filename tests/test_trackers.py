"""Trackers (`training.report_to`): one W&B run / TensorBoard folder per stage attempt, kept on resume.

W&B runs offline (`WANDB_MODE=offline`): each `wandb.init` writes `logs/wandb/offline-run-<time>-<id>/`,
and `wandb sync` later uploads every such folder of one id into one W&B run, so "a resumed stage
logs to the same run" is: the resumed attempt's folder carries the interrupted attempt's id.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from transformers import TrainerCallback

from constitutional.config import config_from_dict
from constitutional.errors import UserError
from constitutional.pipeline import run_pipeline
from constitutional.registry import STAGES
from constitutional.rundir import RunDir
from constitutional.stages import sl
from constitutional.trackers import check_report_to

from conftest import tiny_config_data

pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")


class InterruptAfterSave(TrainerCallback):
    """Stops training like a kill would, right after the checkpoint of `step` is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt


def _config(tiny_model_dir: Path, tmp_path: Path, report_to: str):
    data = tiny_config_data(
        tiny_model_dir,
        tmp_path,
        training={"report_to": report_to, "run_name": "tracked"},
        sl={"save_steps": 1, "logging_steps": 1, "epochs": 2},
    )
    return config_from_dict(data, base_dir=tmp_path)


def _interrupt_sl_once(monkeypatch: pytest.MonkeyPatch) -> None:
    build, calls = sl.build_trainer, []

    def build_with_callback(*args, **kwargs):
        trainer = build(*args, **kwargs)
        if not calls:  # only the first attempt is interrupted
            trainer.add_callback(InterruptAfterSave(2))
        calls.append(1)
        return trainer

    monkeypatch.setattr(sl, "build_trainer", build_with_callback)


def _wandb_log(folder: Path) -> tuple[dict[str, object], list[dict[str, object]]]:
    """(summary, history rows) of one offline W&B run, read from its `.wandb` file.

    The file is LevelDB's log format (a 7-byte header, then 32 KiB blocks of records: CRC, length,
    type 1 full / 2 first / 3 middle / 4 last) holding `wandb_internal_pb2.Record` messages.
    """
    from wandb.proto import wandb_internal_pb2

    raw = next(folder.glob("*.wandb")).read_bytes()
    summary: dict[str, object] = {}
    history: list[dict[str, object]] = []
    position, pieces = 7, b""
    while position + 7 <= len(raw):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a record header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        pieces += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            break
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            item = lambda entry: (entry.key or "/".join(entry.nested_key), json.loads(entry.value_json))  # noqa: E731
            if record.WhichOneof("record_type") == "summary":
                summary.update(item(entry) for entry in record.summary.update)
            elif record.WhichOneof("record_type") == "history":
                history.append(dict(item(entry) for entry in record.history.item))
    return summary, history


def _offline_runs(root: Path) -> dict[str, list[Path]]:
    """{run id: its offline folders, oldest first} under the run directory's logs/wandb."""
    runs: dict[str, list[Path]] = {}
    for folder in sorted((root / "logs" / "wandb").glob("offline-run-*")):
        # offline-run-<date>_<time>-<id>, and "-1", "-2"... when two attempts start in the same second
        run_id = re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z]+-[0-9a-f]{8})(?:-\d+)?", folder.name).group(1)
        runs.setdefault(run_id, []).append(folder)
    return runs


def test_a_resumed_stage_logs_to_the_same_wandb_run_and_a_rerun_to_a_new_one(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config, root = _config(tiny_model_dir, tmp_path, "wandb"), tmp_path / "run"
    _interrupt_sl_once(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, root, ["critique", "sl"])
    run = RunDir(root)
    first = run.stage_entry("sl")["tracker_run"]
    assert run.stage_status("sl") == "failed" and first.startswith("sl-")

    run_pipeline(config, root, ["critique", "sl"])  # resumes sl from its checkpoint
    assert run.stage_status("sl") == "done" and run.stage_entry("sl")["tracker_run"] == first
    runs = _offline_runs(root)
    assert len(runs[first]) == 2, runs  # the interrupted attempt and the resumed one: one W&B run
    critique = run.stage_entry("critique")["tracker_run"]
    assert critique != first and len(runs[critique]) == 1  # critique finished the first time

    # The Trainer's loss: steps 1-2 in the interrupted attempt, the rest in the resumed one; the
    # stage's counts in the summary of the attempt that finished.
    (_, interrupted), (summary, resumed) = (_wandb_log(folder) for folder in runs[first])
    logged = lambda rows: [row["train/global_step"] for row in rows if "train/loss" in row]  # noqa: E731
    steps = run.stage_entry("sl")["counts"]["steps"]
    assert logged(interrupted) == [1, 2] and logged(resumed) == list(range(3, steps + 1))
    assert summary["sl/steps"] == steps and summary["sl/resumed_from_step"] == 2
    critique_summary, _ = _wandb_log(runs[critique][0])
    assert critique_summary["critique/records"] == run.stage_entry("critique")["counts"]["records"] > 0

    run_pipeline(config, root, ["sl"], rerun=False)  # done: skipped, no new attempt
    assert len(_offline_runs(root)[first]) == 2
    config.sl.learning_rate *= 2  # stale: a rerun is a new attempt with a new id
    run_pipeline(config, root, ["sl"], rerun=True)
    rerun = run.stage_entry("sl")["tracker_run"]
    assert rerun != first and len(_offline_runs(root)[rerun]) == 1


def test_tensorboard_keeps_one_folder_per_attempt(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, root = _config(tiny_model_dir, tmp_path, "tensorboard"), tmp_path / "run"
    _interrupt_sl_once(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, root, ["critique", "sl"])
    run_pipeline(config, root, list(STAGES))
    run = RunDir(root)
    folder = root / "logs" / "tensorboard" / run.stage_entry("sl")["tracker_run"]
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "sl/steps" in tags and "train/loss" in tags  # ours and the Trainer's, in one folder
    loss_steps = [event.step for event in events.Scalars("train/loss")]
    assert sorted(set(loss_steps)) == list(range(1, max(loss_steps) + 1))  # both attempts' steps
    ran = [stage for stage in STAGES if run.stage_status(stage) == "done"]
    assert sorted(path.name for path in (root / "logs" / "tensorboard").iterdir()) == sorted(
        run.stage_entry(stage)["tracker_run"] for stage in ran
    )

    def scalars(stage: str) -> dict[str, list[tuple[int, float]]]:
        events = EventAccumulator(str(root / "logs" / "tensorboard" / run.stage_entry(stage)["tracker_run"]))
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    rl_steps = config.rl.steps
    assert [step for step, _ in scalars("rl")["rl/mean_reward"]] == list(range(1, rl_steps + 1))
    pm_accuracy = json.loads(run.path("pm_report").read_text())["accuracy"]["human_helpfulness"]["pm"]
    assert scalars("pm")["pm/pm/accuracy/human_helpfulness/pm"][-1][1] == pytest.approx(pm_accuracy)
    eval_scalars = scalars("eval")  # its counts and the figures of eval/metrics.json
    assert "eval/prompts/red_team" in eval_scalars and any(tag.startswith("eval/metrics/") for tag in eval_scalars)


def test_wandb_online_without_a_login_is_refused(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"^training.report_to: 'wandb' has no W&B login here"):
        check_report_to("wandb")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    (tmp_path / ".netrc").chmod(0o600)  # where `wandb login` writes the key, as it writes it
    check_report_to("wandb")
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_report_to("wandb")
