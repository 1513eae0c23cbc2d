"""Ablations on one run directory: stale stages are refused without --rerun, rerun with it, and the
replaced outputs are kept under previous/ while earlier stages' outputs stay byte-identical."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from constitutional.cli import main

from conftest import tiny_config_data

OUTPUTS = ("data/critiques.jsonl", "models/sl-cai/model.safetensors", "data/pairs.jsonl", "data/ai_labels.jsonl")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(run_dir: Path) -> dict[str, str]:
    return {name: digest(run_dir / name) for name in OUTPUTS if (run_dir / name).exists()}


def cai(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A config file and a run directory where every stage finished on the tiny model."""
    folder = tmp_path_factory.mktemp("finished")
    data = tiny_config_data(
        tiny_model_dir,
        folder,
        critique={"rounds": 1},
        data={"max_red_team": 4, "max_helpful": 1},
        sl={"batch_size": 4, "max_length": 64, "save_steps": 100},
        pairs={"max_new_tokens": 6},
        feedback={"num_fewshot": 1, "cot_max_new_tokens": 6},
        pm={"max_human": 24, "save_steps": 100},
    )
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    run_dir = folder / "run"
    assert main(["run", str(config), "--run-dir", str(run_dir)]) == 0
    return config, run_dir


@pytest.fixture
def run(finished, tmp_path):
    """A private copy of the finished run (times kept, so fingerprints carry over)."""
    config, run_dir = finished
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return str(config), copy


def test_a_changed_setting_is_refused_naming_keys_and_stages(run, capsys):
    config, run_dir = run
    before = snapshot(run_dir)
    code, err = cai(["run", config, "--run-dir", str(run_dir), "--set", "feedback.cot=true"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "feedback.cot: False -> True" in err and "stages that would run again: feedback, pm, rl, eval." in err
    assert "--rerun" in err
    assert snapshot(run_dir) == before and not (run_dir / "previous").exists()


def test_rerun_replaces_only_the_changed_stage_and_keeps_the_old_labels(run, capsys):
    config, run_dir = run
    before = snapshot(run_dir)
    old_labels = (run_dir / "data/ai_labels.jsonl").read_text()
    code, err = cai(["run", config, "--run-dir", str(run_dir), "--set", "feedback.cot=true", "--rerun"], capsys)
    assert code == 0, err
    after = snapshot(run_dir)
    for upstream in OUTPUTS[:3]:
        assert after[upstream] == before[upstream], upstream  # critiques, SL-CAI and pairs untouched
    labels = [json.loads(line) for line in (run_dir / "data/ai_labels.jsonl").read_text().splitlines()]
    assert labels and all("reasoning" in label and 0.4 <= label["p_a"] <= 0.6 for label in labels)
    (archive,) = (run_dir / "previous").iterdir()
    assert (archive / "data/ai_labels.jsonl").read_text() == old_labels
    assert (archive / "models/pm/model.safetensors").exists()  # the PM trained on the old labels goes too
    assert (run_dir / "models/pm/model.safetensors").exists()  # and a new one is trained
    assert yaml.safe_load((archive / "config.yaml").read_text())["feedback"]["cot"] is False
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert manifest["feedback"]["status"] == "done" and manifest["feedback"]["settings"]["feedback.cot"] is True
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["feedback"]["cot"] is True
    # The same command again: nothing is stale any more, nothing runs, nothing moves.
    code, err = cai(["run", config, "--run-dir", str(run_dir), "--set", "feedback.cot=true", "--rerun"], capsys)
    assert code == 0 and snapshot(run_dir) == after and len(list((run_dir / "previous").iterdir())) == 1


def test_a_runtime_setting_changes_nothing(run, capsys):
    config, run_dir = run
    before = snapshot(run_dir)
    code, err = cai(
        [
            "run",
            config,
            "--run-dir",
            str(run_dir),
            "--set",
            "feedback.chunk_size=7",
            "--set",
            "transformers.batch_size=2",
        ],
        capsys,
    )
    assert code == 0, err
    assert snapshot(run_dir) == before and not (run_dir / "previous").exists()


def test_an_early_change_makes_every_later_stage_stale(run, capsys):
    config, run_dir = run
    code, err = cai(["run", config, "--run-dir", str(run_dir), "--set", "critique.rounds=2"], capsys)
    assert code == 2 and "critique.rounds: 1 -> 2" in err
    assert "stages that would run again: critique, sl, pairs, feedback, pm, rl, eval." in err


def test_an_upstream_file_edited_by_hand_makes_its_readers_stale(run, capsys):
    config, run_dir = run
    pairs = run_dir / "data/pairs.jsonl"
    pairs.write_text("".join(pairs.read_text().splitlines(keepends=True)[:2]))
    code, err = cai(["run", config, "--run-dir", str(run_dir)], capsys)
    assert code == 2 and "data/pairs.jsonl changed" in err and "would run again: feedback, pm, rl, eval." in err
    code, err = cai(["run", config, "--run-dir", str(run_dir), "--rerun"], capsys)
    assert code == 0, err
    assert len((run_dir / "data/ai_labels.jsonl").read_text().splitlines()) == 2


def test_rerun_where_there_is_no_run_is_refused(finished, tmp_path, capsys):
    config, _ = finished
    empty = tmp_path / "nothing"
    code, err = cai(["run", str(config), "--run-dir", str(empty), "--rerun"], capsys)
    assert code == 2 and "no run here" in err and len(err.splitlines()) == 1
    assert not empty.exists()


def test_rerun_of_a_stage_whose_inputs_never_ran_or_would_be_replaced_moves_nothing(run, tmp_path, capsys):
    config, run_dir = run
    # The upstream stage of the selected one would be rerun but is not selected: refused up front.
    before = snapshot(run_dir)
    code, err = cai(
        ["run", config, "--run-dir", str(run_dir), "--stages", "feedback", "--set", "critique.rounds=2", "--rerun"],
        capsys,
    )
    assert code == 2 and "stage 'feedback' reads" in err and "would be rerun" in err
    assert snapshot(run_dir) == before and not (run_dir / "previous").exists()
    # A run directory where only critique ran: feedback's input was never made.
    partial = tmp_path / "partial"
    assert main(["run", config, "--run-dir", str(partial), "--stages", "critique"]) == 0
    capsys.readouterr()
    code, err = cai(["run", config, "--run-dir", str(partial), "--stages", "feedback", "--rerun"], capsys)
    assert code == 2 and "pairs.jsonl" in err and "has not run" in err
    assert not (partial / "previous").exists() and not (partial / "data/ai_labels.jsonl").exists()
