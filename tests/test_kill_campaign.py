"""Kill campaign: every stage is SIGKILLed at planned or seeded-random moments and run again.

Each scenario copies a finished run of the tiny pipeline (the baseline, uninterrupted, same seed),
sends the stage's outputs to `previous/` as `--rerun` would, and runs `cai run --stages <stage>`
in a child process (`tests/kill_driver.py`) that is SIGKILLed: at a function's n-th call
(checkpoint writes, the model's rename, a record append cut in half, `--rerun` moving old
outputs) or after a seeded random time. Right after the kill it checks that every model folder is
complete or absent, the manifest parses and every record file reads (a torn last line is
tolerated); then it runs the same command again, and checks that the stage is done and its records
equal the baseline's (same ids, none lost, none doubled, same contents), that a model exists
whole, and that a training stage resumed from its last complete checkpoint where one was written.

`make test` runs the scenarios not marked slow; `pytest -m slow tests/test_kill_campaign.py` runs
the whole campaign (the figures in docs/reliability.md). Each run prints what it did.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from constitutional.config import config_from_dict
from constitutional.pipeline import run_pipeline
from constitutional.records import read_records
from constitutional.rundir import ARTEFACTS, RunDir, artefacts_made_by
from constitutional.sharding import Shard
from constitutional.stages import STAGES
from constitutional.training import is_complete_model

from conftest import tiny_config_data

DRIVER = Path(__file__).with_name("kill_driver.py")
MODELS = ("sl_cai", "pm", "rl_cai")
RECORDS = ("critiques", "pairs", "ai_labels", "pm_train", "pm_eval", "rl_prompts", "eval_prompts", "eval_answers",
           "eval_judgments")  # fmt: skip
TALLY: Counter = Counter()  # what the campaign did, printed at the end


@dataclass(frozen=True)
class Scenario:
    stage: str
    kill_at: str | None = None  # CAI_KILL_AT, or None for a seeded random time
    seed: int = 0
    rerun_set: str | None = None  # run with `--set <this> --rerun` (a kill while old outputs move)
    resumes_from_checkpoint: bool = False  # the kill leaves a complete checkpoint to resume from

    def __str__(self) -> str:
        return f"{self.stage}@{self.kill_at or f'random-{self.seed}'}{'+rerun' if self.rerun_set else ''}"


# A Trainer checkpoint writes the weights, then optimizer and scheduler, then RNG and trainer state:
# killed in the second checkpoint's optimizer write, checkpoint 1 is complete and 2 is not.
MID_CHECKPOINT = "transformers.trainer.Trainer._save_optimizer_and_scheduler@2"
SCENARIOS = [
    Scenario("critique", "constitutional.chunks.append_records@2"),
    Scenario("critique", "constitutional.chunks.append_records@2:torn"),
    Scenario("sl", MID_CHECKPOINT, resumes_from_checkpoint=True),
    Scenario("pm", "constitutional.training._finish_partial@1"),
    Scenario("rl", "accelerate.accelerator.save_accelerator_state@2", resumes_from_checkpoint=True),
    Scenario("eval", "os.replace@2", rerun_set="eval.max_new_tokens=5"),
    pytest.param(Scenario("critique", seed=1), marks=pytest.mark.slow),
    pytest.param(Scenario("critique", seed=2), marks=pytest.mark.slow),
    pytest.param(Scenario("sl", "torch.save@1"), marks=pytest.mark.slow),
    pytest.param(Scenario("sl", "constitutional.training._finish_partial@1"), marks=pytest.mark.slow),
    pytest.param(Scenario("sl", seed=3), marks=pytest.mark.slow),
    pytest.param(Scenario("pairs", "constitutional.chunks.append_records@1:torn"), marks=pytest.mark.slow),
    pytest.param(Scenario("pairs", seed=4), marks=pytest.mark.slow),
    pytest.param(Scenario("feedback", "constitutional.chunks.append_records@1"), marks=pytest.mark.slow),
    pytest.param(Scenario("feedback", "constitutional.chunks.append_records@1:torn"), marks=pytest.mark.slow),
    pytest.param(Scenario("feedback", seed=5), marks=pytest.mark.slow),
    pytest.param(Scenario("pm", MID_CHECKPOINT, resumes_from_checkpoint=True), marks=pytest.mark.slow),
    pytest.param(Scenario("pm", "constitutional.records.write_records_atomic@1"), marks=pytest.mark.slow),
    pytest.param(Scenario("pm", seed=6), marks=pytest.mark.slow),
    pytest.param(
        Scenario("rl", "constitutional.rl.trainer.save_checkpoint@2", resumes_from_checkpoint=True),
        marks=pytest.mark.slow,
    ),  # fmt: skip
    pytest.param(Scenario("rl", "constitutional.rl.trainer.plot_curves@1"), marks=pytest.mark.slow),
    pytest.param(Scenario("rl", seed=7), marks=pytest.mark.slow),
    pytest.param(Scenario("eval", "constitutional.chunks.append_records@3"), marks=pytest.mark.slow),
    pytest.param(Scenario("eval", "constitutional.chunks.append_records@2:torn"), marks=pytest.mark.slow),
    pytest.param(Scenario("eval", seed=8), marks=pytest.mark.slow),
    pytest.param(Scenario("pm", "os.replace@1", rerun_set="pm.learning_rate=2.0e-5"), marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir):
    """The whole tiny pipeline, uninterrupted: the records every killed run must end up with."""
    folder = tmp_path_factory.mktemp("kill-campaign")
    data = tiny_config_data(
        tiny_model_dir, folder,
        critique={"rounds": 1},
        sl={"batch_size": 2, "max_length": 64, "save_steps": 1, "logging_steps": 1},
        pm={"max_human": 16, "save_steps": 1},
        rl={"steps": 3, "save_steps": 1, "max_eval_prompts": 2},
        eval={"max_red_team": 2, "max_helpful": 2, "max_over_refusal": 2, "max_new_tokens": 6, "bootstrap": 20},
    )  # fmt: skip
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(data), encoding="utf-8")
    run = run_pipeline(config_from_dict(data, base_dir=str(folder)), folder / "baseline", list(STAGES))
    yield config_path, run
    print("\nkill campaign:", json.dumps(dict(TALLY)))


def prepare(baseline: RunDir, scenario: Scenario, target: Path) -> RunDir:
    """A copy of the baseline in which `scenario.stage` (and every later stage that ran) must run again."""
    shutil.copytree(baseline.root, target)
    run = RunDir(target)
    shutil.rmtree(run.cache_path.parent, ignore_errors=True)  # no cached generations: regenerate for real
    if scenario.rerun_set is None:
        index = STAGES.index(scenario.stage)
        run.archive([name for name in STAGES[index:] if run.stage_status(name) != "pending"])
        shutil.rmtree(run.root / "previous")
    return run


def cai(config: Path, run: RunDir, scenario: Scenario, kill: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(DRIVER), "run", str(config), "--run-dir", str(run.root), "--stages", scenario.stage]
    if scenario.rerun_set:
        command += ["--set", scenario.rerun_set, "--rerun"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("CAI_KILL")}
    env.update(kill, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def check_after_kill(run: RunDir) -> None:
    """What must hold at any moment a process dies: whole models or none, a readable manifest and records."""
    for artefact in MODELS:
        path = run.path(artefact)
        assert not path.exists() or is_complete_model(path), f"{path} exists but is not complete"
    if run.manifest_path.exists():
        json.loads(run.manifest_path.read_text(encoding="utf-8"))
    for artefact in RECORDS:
        if run.path(artefact).exists():
            read_records(run.path(artefact), repair=True)


def assert_same_records(run: RunDir, baseline: RunDir, artefact: str) -> int:
    """Same ids (none lost, none doubled) and the same contents (floats to 1e-4) as the baseline."""
    mine, theirs = read_records(run.path(artefact)), read_records(baseline.path(artefact))
    ids = [row["id"] for row in mine]
    assert len(ids) == len(set(ids)), f"{artefact}: doubled ids {[k for k, n in Counter(ids).items() if n > 1]}"
    assert set(ids) == {row["id"] for row in theirs}, f"{artefact}: lost or extra records"
    expected = {row["id"]: row for row in theirs}
    for row in mine:
        assert_close(row, expected[row["id"]], f"{artefact}:{row['id']}")
    return len(mine)


def assert_close(mine, theirs, where: str) -> None:
    if isinstance(theirs, float) or isinstance(mine, float):
        assert math.isclose(mine, theirs, abs_tol=1e-4), (where, mine, theirs)
    elif isinstance(theirs, dict):
        assert mine.keys() == theirs.keys(), where
        for key in theirs:
            assert_close(mine[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert len(mine) == len(theirs), where
        for index, (a, b) in enumerate(zip(mine, theirs)):
            assert_close(a, b, f"{where}[{index}]")
    else:
        assert mine == theirs, (where, mine, theirs)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_a_killed_stage_resumes_to_the_uninterrupted_result(scenario, baseline, tmp_path):
    config_path, base = baseline
    run = prepare(base, scenario, tmp_path / "run")
    if scenario.kill_at:
        kill = {"CAI_KILL_AT": scenario.kill_at}
    else:  # a seeded moment between the start of the process and the end of the stage
        budget = 3.0 + base.stage_entry(scenario.stage)["seconds"]
        kill = {"CAI_KILL_AFTER_S": f"{random.Random(scenario.seed).uniform(1.0, budget):.2f}"}
    killed = cai(config_path, run, scenario, kill)
    if scenario.kill_at:  # a planned point must be reached: otherwise the scenario tests nothing
        assert killed.returncode == -9, killed.stderr[-2000:]
    else:
        assert killed.returncode in (-9, 0), killed.stderr[-2000:]
    TALLY["kills"] += killed.returncode == -9
    TALLY[f"kills in {scenario.stage}"] += killed.returncode == -9
    check_after_kill(run)

    again = cai(config_path, run, scenario, {})
    assert again.returncode == 0, again.stderr[-3000:]
    entry = run.stage_entry(scenario.stage)
    assert entry["status"] == "done"
    for artefact in artefacts_made_by(scenario.stage):
        if artefact in RECORDS and base.path(artefact).exists() and not scenario.rerun_set:
            TALLY["records compared"] += assert_same_records(run, base, artefact)
        if artefact in MODELS:
            assert is_complete_model(run.path(artefact))
            assert not run.path(artefact).with_name(run.path(artefact).name + ".partial").exists()
    # Checkpoints only serve to resume: none is left once the model is in place.
    assert not [
        path for pattern in ("checkpoint-*", "step-*") for path in run.checkpoints(scenario.stage).glob(pattern)
    ]
    if scenario.resumes_from_checkpoint:
        assert entry["counts"]["resumed_from_step"] >= 1, entry["counts"]
    if scenario.stage == "rl":
        steps = [row["step"] for row in read_records(run.path("rl_metrics"))]
        assert steps == [1, 2, 3]  # one line per step: none lost or doubled by the resume
    if scenario.rerun_set:
        check_nothing_lost_by_the_rerun(run, base, scenario.stage)


def check_nothing_lost_by_the_rerun(run: RunDir, base: RunDir, stage: str) -> None:
    """Each of the baseline's outputs of `stage` is in exactly one archive folder under previous/."""
    for artefact in artefacts_made_by(stage):
        if not base.path(artefact).exists():
            continue
        copies = list((run.root / "previous").glob(f"*/{ARTEFACTS[artefact].path}"))
        assert len(copies) == 1, (artefact, copies)
        if base.path(artefact).is_file():
            assert copies[0].read_bytes() == base.path(artefact).read_bytes(), artefact
        TALLY["archived outputs kept"] += 1


@pytest.mark.parametrize("kill_at", ["constitutional.sharding.write_records_atomic@1",
                                     "constitutional.rundir.RunDir.update_stage@1"])  # fmt: skip
def test_a_killed_merge_is_run_again_to_the_same_result(baseline, tmp_path, kill_at):
    """`cai merge` killed before its files are written, or after them but before the manifest says so."""
    config_path, base = baseline
    data = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    config = config_from_dict(data, base_dir=str(config_path.parent))
    shards = []
    for index in range(2):
        shard = prepare(base, Scenario("critique"), tmp_path / f"shard{index}")
        run_pipeline(config, shard.root, ["critique"], shard=Shard(index, 2))
        shards.append(shard)
    target = prepare(base, Scenario("critique"), tmp_path / "merged")
    command = [sys.executable, str(DRIVER), "merge", str(target.root), *(str(s.root) for s in shards), "--stage",
               "critique"]  # fmt: skip
    env = {**os.environ, "CAI_KILL_AT": kill_at}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert target.stage_status("critique") != "done"  # the manifest never claims a merge that did not finish
    check_after_kill(target)
    env.pop("CAI_KILL_AT")
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert target.stage_status("critique") == "done"
    TALLY["kills in cai merge"] += 1
    TALLY["records compared"] += assert_same_records(target, base, "critiques")
