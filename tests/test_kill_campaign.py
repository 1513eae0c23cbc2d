"""Kill campaign: every stage is SIGKILLed at planned or seeded-random moments and run again.

The baseline is a finished run of the tiny pipeline, made by the same child process as every
killed run (`tests/kill_driver.py`, uninterrupted, same seed); the parent watches its manifest and
CPU time to time each stage. Each scenario copies it, sends the stage's outputs to `previous/` as
`--rerun` would, and runs `cai run --stages <stage>` in a child process that is SIGKILLed: by
itself at a function's n-th call (checkpoint writes, the model's rename, a record append cut in
half, `--rerun` moving old outputs), or by the parent, once the manifest says the stage is running
and the child has spent a seeded random share of the stage's baseline CPU time in it. Every kill is
shown to land: the process died of SIGKILL while the manifest still says the stage is running (or,
for `--rerun`, with the old outputs half moved); a child that exits on its own, or dies before its
stage starts, fails the scenario.

Right after the kill, the run directory is checked as the kill left it (nothing is repaired): every
model folder is complete or absent, the manifest parses, every record file's complete lines parse,
and a torn write really left half a line at the end of its file. Then the same command runs again
and must repair that line, finish the stage, and end with the uninterrupted run's results: the same
records (ids, none lost or doubled, contents), bit-identical model weights, the same PM report and
PPO metrics; a training stage resumes from its last complete checkpoint where one was written.
After a kill during `--rerun`'s move, every old output, of the stage and of every later one, is in
exactly one archive folder under `previous/`, byte for byte.

`make test` runs the scenarios not marked slow (a planned kill in each of the seven stages and one
random kill); `pytest -m "slow or not slow" tests/test_kill_campaign.py` runs the whole campaign
(the figures in docs/reliability.md). With `-s` it prints what it did.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from constitutional.config import config_from_dict
from constitutional.errors import UserError
from constitutional.pipeline import run_pipeline
from constitutional.records import read_records
from constitutional.rundir import ARTEFACTS, RunDir, artefacts_made_by
from constitutional.sharding import Shard
from constitutional.stages import STAGES
from constitutional.training import is_complete_model
from kill_driver import TORN_LINE

from conftest import tiny_config_data

DRIVER = Path(__file__).with_name("kill_driver.py")
MODELS = ("sl_cai", "pm", "rl_cai")
RECORDS = ("critiques", "pairs", "ai_labels", "pm_train", "pm_eval", "rl_prompts", "eval_prompts", "eval_answers",
           "eval_judgments")  # fmt: skip
TIMEOUT_S = 600  # one child process, at most
POLL_S = 0.005  # how often the parent looks at a running child
# A random kill comes once the child has spent a seeded share of the stage's baseline CPU time in
# the stage, at most this share. CPU time, not wall time: the killed run's stage does the baseline's
# work (no generation cache either), so it needs at least as much CPU whatever else the shared
# machine runs (more, if it imports in the stage what the baseline's earlier stages had imported);
# the last fifth leaves room for what noise remains, as a kill after the stage ended fails.
LATEST_KILL = 0.8
TALLY: Counter = Counter()  # what the campaign did, printed at the end
LANDED: dict[str, str] = {}  # where each random kill landed
WEIGHTS: dict[str, float] = {}  # the largest absolute weight difference to the baseline, per scenario


@dataclass(frozen=True)
class Scenario:
    stage: str
    kill_at: str | None = None  # CAI_KILL_AT, or None for a seeded random moment inside the stage
    seed: int = 0
    rerun_set: str | None = None  # run with `--set <this> --rerun` (a kill while old outputs move)
    resumes_from_checkpoint: bool = False  # the kill leaves a complete checkpoint to resume from

    @property
    def torn(self) -> bool:
        return bool(self.kill_at and self.kill_at.endswith(":torn"))

    def __str__(self) -> str:
        return f"{self.stage}@{self.kill_at or f'random-{self.seed}'}{'+rerun' if self.rerun_set else ''}"


# A Trainer checkpoint writes the weights, then optimizer and scheduler, then RNG and trainer state:
# killed in the second checkpoint's optimizer write, checkpoint 1 is complete and 2 is not.
MID_CHECKPOINT = "transformers.trainer.Trainer._save_optimizer_and_scheduler@2"
SCENARIOS = [
    # `make test`: a planned kill in each stage, and a random one.
    Scenario("critique", "constitutional.chunks.append_records@2:torn"),
    Scenario("sl", MID_CHECKPOINT, resumes_from_checkpoint=True),
    Scenario("pairs", "constitutional.chunks.append_records@1:torn"),
    Scenario("feedback", "constitutional.chunks.append_records@1"),
    Scenario("pm", MID_CHECKPOINT, resumes_from_checkpoint=True),
    Scenario("rl", "accelerate.accelerator.save_accelerator_state@2", resumes_from_checkpoint=True),
    Scenario("eval", "os.replace@2", rerun_set="eval.max_new_tokens=5"),  # the 1st of 5 old outputs moved
    Scenario("sl", seed=3),
    # The rest of the campaign.
    pytest.param(Scenario("critique", "constitutional.chunks.append_records@2"), marks=pytest.mark.slow),
    pytest.param(Scenario("critique", seed=1), marks=pytest.mark.slow),
    pytest.param(Scenario("critique", seed=2), marks=pytest.mark.slow),
    pytest.param(Scenario("sl", "torch.save@1"), marks=pytest.mark.slow),
    pytest.param(Scenario("sl", "constitutional.training._finish_partial@1"), marks=pytest.mark.slow),
    pytest.param(Scenario("pairs", seed=4), marks=pytest.mark.slow),
    pytest.param(Scenario("feedback", "constitutional.chunks.append_records@1:torn"), marks=pytest.mark.slow),
    pytest.param(Scenario("feedback", seed=5), marks=pytest.mark.slow),
    pytest.param(Scenario("pm", "constitutional.training._finish_partial@1"), marks=pytest.mark.slow),
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
    # pm, rl and eval have 5 old outputs each: the 8th move is rl's 3rd, so pm's are all archived,
    # rl's half, eval's not yet, and the rerun's archive must take over from the killed one's.
    pytest.param(Scenario("pm", "os.replace@8", rerun_set="pm.learning_rate=2.0e-5"), marks=pytest.mark.slow),
]


# ----------------------------------------------------------------------------- child processes


@dataclass
class Child:
    """A `cai run` in a child process (tests/kill_driver.py), its output in a log file."""

    process: subprocess.Popen
    log: Path

    def wait(self) -> int:
        return self.process.wait(timeout=TIMEOUT_S)

    def tail(self, size: int = 3000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-size:]


def start(
    config: Path, run: RunDir, log: Path, stages: str, rerun_set: str | None = None, kill_at: str | None = None
) -> Child:
    """Start `cai run CONFIG --run-dir RUN --stages STAGES` (`--set RERUN_SET --rerun`), CAI_KILL_AT=kill_at."""
    command = [sys.executable, str(DRIVER), "run", str(config), "--run-dir", str(run.root), "--stages", stages]
    if rerun_set:
        command += ["--set", rerun_set, "--rerun"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("CAI_KILL")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if kill_at:
        env["CAI_KILL_AT"] = kill_at
    with log.open("w", encoding="utf-8") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    return Child(process, log)


def statuses(run: RunDir) -> dict[str, str]:
    """Each stage's status in the manifest now ({} while there is none; it is replaced atomically)."""
    try:
        manifest = json.loads(run.manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {name: entry.get("status", "pending") for name, entry in manifest.get("stages", {}).items()}


def cpu_seconds(child: Child) -> float:
    """The CPU time (user + system, all threads) the child has used so far (Linux: /proc/PID/stat).

    Where there is no /proc, the wall clock instead (random kills then depend on the machine's load).
    """
    if not Path("/proc/self/stat").exists():
        return time.monotonic()
    fields = Path(f"/proc/{child.process.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def time_stages(child: Child, run: RunDir) -> dict[str, tuple[float, float]]:
    """Wait for the child; {stage: (wall, CPU seconds)} from when the manifest first said running to done."""
    seen: dict[str, dict[str, tuple[float, float]]] = {}
    deadline = time.monotonic() + TIMEOUT_S
    cpu = 0.0
    while child.process.poll() is None and time.monotonic() < deadline:
        now, cpu = time.monotonic(), cpu_seconds(child)
        for name, status in statuses(run).items():
            seen.setdefault(name, {}).setdefault(status, (now, cpu))
        time.sleep(POLL_S)
    assert child.wait() == 0, child.tail()
    for name, status in statuses(run).items():  # a stage done just before the exit
        seen.setdefault(name, {}).setdefault(status, (time.monotonic(), cpu))
    return {
        name: (times["done"][0] - times["running"][0], times["done"][1] - times["running"][1])
        for name, times in seen.items()
        if {"running", "done"} <= set(times)
    }


def kill_inside_stage(child: Child, run: RunDir, stage: str, cpu_delay: float) -> tuple[float, float]:
    """SIGKILL the child once it has spent `cpu_delay` CPU seconds in `stage` (from when the manifest says running).

    Fails the test if the child exits before that: before its stage started, or on its own during
    it. Returns (wall, CPU) seconds into the stage when the kill was sent.
    """
    deadline, started = time.monotonic() + TIMEOUT_S, None
    while started is None:
        if child.process.poll() is not None or time.monotonic() > deadline:
            code = child.process.returncode
            pytest.fail(f"the kill did not land: exit {code} before {stage} started\n{child.tail()}")
        if statuses(run).get(stage) == "running":
            started = (time.monotonic(), cpu_seconds(child))
        else:
            time.sleep(POLL_S)
    while cpu_seconds(child) - started[1] < cpu_delay:
        if child.process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(
                f"the kill did not land: exit {child.process.returncode} {time.monotonic() - started[0]:.2f} s into "
                f"{stage}, before the kill planned {cpu_delay:.2f} CPU seconds into it\n{child.tail()}"
            )
        time.sleep(POLL_S)
    sent = (time.monotonic() - started[0], cpu_seconds(child) - started[1])
    child.process.send_signal(signal.SIGKILL)
    child.wait()
    return sent


# ----------------------------------------------------------------------------- the baseline


@dataclass
class Baseline:
    config: Path
    run: RunDir
    seconds: dict[str, tuple[float, float]]  # each stage's (wall, CPU) seconds in the uninterrupted run


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir):
    """The whole tiny pipeline, uninterrupted, in the child process the scenarios run: what each must end with."""
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
    run = RunDir(folder / "baseline")
    seconds = time_stages(start(config_path, run, folder / "baseline.log", ",".join(STAGES)), run)
    assert all(run.stage_status(name) == "done" for name in STAGES), run.read_manifest()
    yield Baseline(config_path, run, seconds)
    print("\nkill campaign:", json.dumps(dict(TALLY)))
    print("baseline stages (wall s, CPU s):", json.dumps({k: [round(x, 2) for x in v] for k, v in seconds.items()}))
    print("random kills:", json.dumps(LANDED, indent=1))
    print("largest weight difference to the baseline:", json.dumps(WEIGHTS, indent=1))


def prepare(baseline: RunDir, scenario: Scenario, target: Path) -> RunDir:
    """A copy of the baseline in which `scenario.stage` (and every later stage that ran) must run again."""
    shutil.copytree(baseline.root, target)
    run = RunDir(target)
    shutil.rmtree(run.cache_path.parent, ignore_errors=True)  # no cached generations: regenerate for real
    if scenario.rerun_set is None:
        run.archive(later_stages(run, scenario.stage))
        shutil.rmtree(run.root / "previous")
    return run


def later_stages(run: RunDir, stage: str) -> list[str]:
    """`stage` and every later one that ran: what `--rerun` of `stage` archives."""
    return [name for name in STAGES[STAGES.index(stage) :] if run.stage_status(name) != "pending"]


# ----------------------------------------------------------------------------- the campaign


@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_a_killed_stage_resumes_to_the_uninterrupted_result(scenario, baseline, tmp_path):
    base = baseline.run
    run = prepare(base, scenario, tmp_path / "run")
    archived = later_stages(run, scenario.stage) if scenario.rerun_set else []
    killed = start(baseline.config, run, tmp_path / "killed.log", scenario.stage, scenario.rerun_set, scenario.kill_at)
    if scenario.kill_at:  # a planned point must be reached: otherwise the scenario tests nothing
        assert killed.wait() == -signal.SIGKILL, killed.tail()
    else:  # a seeded moment inside the stage, within its baseline duration
        wall, cpu = baseline.seconds[scenario.stage]
        delay = random.Random(scenario.seed).uniform(0.0, LATEST_KILL) * cpu
        sent = kill_inside_stage(killed, run, scenario.stage, delay)
        assert killed.process.returncode == -signal.SIGKILL, f"the kill did not land\n{killed.tail()}"
        LANDED[str(scenario)] = (
            f"{sent[1]:.2f} CPU s ({sent[1] / cpu:.0%} of the baseline's {cpu:.2f}), {sent[0]:.2f} s into the stage "
            f"(baseline {wall:.2f} s)"
        )
        TALLY["random kills landed"] += 1
    if scenario.rerun_set:  # killed while `--rerun` moved the old outputs, before the stage ran again
        assert run.stage_status(scenario.stage) == "done"  # the manifest is still the old run's
        check_killed_mid_move(run, base, archived, scenario.stage)
    else:  # the kill landed inside the stage: it had started and not finished
        assert run.stage_status(scenario.stage) == "running", run.stage_entry(scenario.stage)
    TALLY["kills"] += 1
    TALLY[f"kills in {scenario.stage}"] += 1
    torn = check_after_kill(run)
    if scenario.torn:  # the write cut short is there, as the kill left it, for the next run to repair
        assert list(torn.values()) == [TORN_LINE], torn
        torn_path = run.path(next(iter(torn)))
        with pytest.raises(UserError, match="invalid JSON"):
            read_records(torn_path)  # read as a reader that does not repair reads it
    elif scenario.kill_at:
        assert not torn, torn  # a kill at a function's entry cuts no write short

    again = start(baseline.config, run, tmp_path / "again.log", scenario.stage, scenario.rerun_set)
    assert again.wait() == 0, again.tail()
    entry = run.stage_entry(scenario.stage)
    assert entry["status"] == "done"
    if scenario.torn:  # the rerun repaired the half line: the file is whole (and, below, the baseline's)
        raw = torn_path.read_bytes()
        assert raw.endswith(b"\n") and TORN_LINE.encode() not in raw
        TALLY["torn lines repaired by the rerun"] += 1
    for artefact in artefacts_made_by(scenario.stage):
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
        check_nothing_lost_by_the_rerun(run, base, archived, scenario.stage)
    else:
        check_same_results(run, base, scenario)


# ----------------------------------------------------------------------------- right after the kill


def check_after_kill(run: RunDir) -> dict[str, str]:
    """What must hold at any moment a process dies, checked without repairing anything.

    Whole models or none, a readable manifest, record files whose complete lines all parse.

    Returns:
        {artefact: its partial last line} of each record file whose last write was cut short.
    """
    for artefact in MODELS:
        path = run.path(artefact)
        assert not path.exists() or is_complete_model(path), f"{path} exists but is not complete"
    if run.manifest_path.exists():
        json.loads(run.manifest_path.read_text(encoding="utf-8"))
    torn = {}
    for artefact in RECORDS:
        path = run.path(artefact)
        if not path.exists():
            continue
        raw = path.read_bytes()
        whole, _, tail = raw.rpartition(b"\n")
        for number, line in enumerate(whole.split(b"\n"), start=1):
            if line.strip():
                assert isinstance(json.loads(line), dict), f"{path}:{number}"
        if tail:
            torn[artefact] = tail.decode("utf-8")
    return torn


def archived_copies(run: RunDir, artefact: str) -> list[Path]:
    return list((run.root / "previous").glob(f"*/{ARTEFACTS[artefact].path}"))


def old_outputs(base: RunDir, stages: list[str]) -> list[str]:
    """The outputs of `stages` the baseline has."""
    return [artefact for stage in stages for artefact in artefacts_made_by(stage) if base.path(artefact).exists()]


def check_killed_mid_move(run: RunDir, base: RunDir, stages: list[str], stage: str) -> None:
    """Killed during `--rerun`'s move: each old output is in one place, some archived already, some not yet."""
    moved, in_place = [], []
    for artefact in old_outputs(base, stages):
        copies, here = archived_copies(run, artefact), run.path(artefact).exists()
        assert len(copies) + here == 1, (artefact, copies, here)  # neither lost nor doubled by the move
        (moved if copies else in_place).append(artefact)
    assert moved and in_place, f"the kill did not land mid-move: moved {moved}, still in place {in_place}"
    if len(stages) > 1:  # a later stage's outputs too were caught half moved
        later = [artefact for artefact in moved + in_place if ARTEFACTS[artefact].made_by != stage]
        assert set(later) & set(moved) and set(later) & set(in_place), (moved, in_place)
    TALLY["outputs moved before the kill"] += len(moved)
    TALLY["outputs still in place at the kill"] += len(in_place)


# ----------------------------------------------------------------------------- after the rerun


def check_nothing_lost_by_the_rerun(run: RunDir, base: RunDir, stages: list[str], stage: str) -> None:
    """Each old output of `stages` is in exactly one archive folder under previous/, as it was."""
    for artefact in old_outputs(base, stages):
        copies = archived_copies(run, artefact)
        assert len(copies) == 1, (artefact, copies)
        assert same_bytes(copies[0], base.path(artefact)), artefact
        if ARTEFACTS[artefact].made_by != stage:  # a later stage is not run again: its outputs are only archived
            assert not run.path(artefact).exists(), artefact
        TALLY["archived outputs kept"] += 1
    for name in stages[1:]:
        assert run.stage_status(name) == "pending", (name, run.stage_entry(name))


def same_bytes(mine: Path, theirs: Path) -> bool:
    """Two files with the same bytes, or two folders with the same files."""
    if theirs.is_file():
        return mine.is_file() and mine.read_bytes() == theirs.read_bytes()
    files = sorted(path.relative_to(theirs) for path in theirs.rglob("*") if path.is_file())
    if sorted(path.relative_to(mine) for path in mine.rglob("*") if path.is_file()) != files:
        return False
    return all((mine / name).read_bytes() == (theirs / name).read_bytes() for name in files)


def check_same_results(run: RunDir, base: RunDir, scenario: Scenario) -> None:
    """The stage's records, model weights, PM report and PPO metrics are the uninterrupted run's."""
    for artefact in artefacts_made_by(scenario.stage):
        if artefact in RECORDS and base.path(artefact).exists():
            TALLY["records compared"] += assert_same_records(run, base, artefact)
        if artefact in MODELS:
            # Bitwise: a resume reloads the checkpoint's exact weights, optimizer, scheduler and RNG
            # state and sees the same batches (CPU, one thread), so nothing is allowed to differ.
            difference, differing = weight_difference(run.path(artefact), base.path(artefact))
            WEIGHTS[str(scenario)] = difference
            assert not differing, f"{artefact}: {len(differing)} tensors differ, by up to {difference}: {differing[:5]}"
            TALLY["models compared bitwise"] += 1
    if scenario.stage == "pm":
        mine, theirs = (json.loads(path.path("pm_report").read_text(encoding="utf-8")) for path in (run, base))
        assert mine == theirs, "eval/pm.json differs from the baseline's"
    if scenario.stage == "rl":  # every figure of every step but the seconds each part took
        mine, theirs = ([untimed(row) for row in read_records(path.path("rl_metrics"))] for path in (run, base))
        assert mine == theirs, "eval/rl_metrics.jsonl differs from the baseline's"
        assert read_records(run.path("rl_samples")) == read_records(base.path("rl_samples"))


def untimed(row: dict) -> dict:
    return {key: value for key, value in row.items() if not key.endswith("_s")}


def weight_difference(mine: Path, theirs: Path) -> tuple[float, list[str]]:
    """(The largest absolute difference, the tensors not bit-identical) between two models' weights."""
    import torch
    from safetensors.torch import load_file

    files = sorted(path.name for path in theirs.glob("*.safetensors"))
    assert files and sorted(path.name for path in mine.glob("*.safetensors")) == files, (mine, files)
    worst, differing = 0.0, []
    for name in files:
        a, b = load_file(mine / name), load_file(theirs / name)
        assert a.keys() == b.keys(), name
        for key, tensor in b.items():
            assert a[key].shape == tensor.shape and a[key].dtype == tensor.dtype, key
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
            if not a[key].reshape(-1).view(bits).equal(tensor.reshape(-1).view(bits)):  # NaN and -0.0 included
                differing.append(key)
                worst = max(worst, (a[key].double() - tensor.double()).abs().max().item())
    return worst, differing


def assert_same_records(run: RunDir, baseline: RunDir, artefact: str) -> int:
    """Same ids (none lost, none doubled) and the same contents (floats to 1e-4) as the baseline.

    Read without repair: a half line left at the end fails here.
    """
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


# ----------------------------------------------------------------------------- cai merge


@pytest.mark.parametrize("kill_at", ["constitutional.sharding.write_records_atomic@1",
                                     "constitutional.rundir.RunDir.update_stage@1"])  # fmt: skip
def test_a_killed_merge_is_run_again_to_the_same_result(baseline, tmp_path, kill_at):
    """`cai merge` killed before its files are written, or after them but before the manifest says so."""
    config_path, base = baseline.config, baseline.run
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
