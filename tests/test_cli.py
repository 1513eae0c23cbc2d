"""The `cai` command: help, bad input (one line, exit 2, nothing written), interruption."""

import json
import subprocess
import sys

import pytest
import yaml

from constitutional.cli import main

from conftest import cai_error_line, tiny_config_data


@pytest.fixture
def config_file(tmp_path, tiny_model_dir):
    def write(**sections):
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tiny_config_data(tiny_model_dir, tmp_path, **sections)))
        return path

    return write


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def test_help_reads_well():
    result = subprocess.run([sys.executable, "-m", "constitutional.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "Constitutional AI" in result.stdout and "critique" in result.stdout and "examples:" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "constitutional.cli", "run", "--help"], capture_output=True, text=True
    )
    assert "--stages" in result.stdout and "--set" in result.stdout


def test_cai_run_writes_the_run_directory(config_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, err = run_cli(["run", str(config_file()), "--run-dir", str(run_dir), "--set", "critique.rounds=1"], capsys)
    assert code == 0, err
    for output in ("data/critiques.jsonl", "models/sl-cai/config.json", "data/pairs.jsonl", "data/ai_labels.jsonl"):
        assert (run_dir / output).exists(), output
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["critique"]["rounds"] == 1 and resolved["seed"] == 3
    # Eval has prompts of its own (the run trained on every prompt of data.red_team): nothing is missing.
    missing = json.loads((run_dir / "eval" / "metrics.json").read_text())["missing"]
    assert not any("every prompt of" in item for item in missing), missing
    # A second run with another setting would mix records from two configs: refused.
    code, err = run_cli(["run", str(config_file()), "--run-dir", str(run_dir), "--set", "critique.rounds=2"], capsys)
    assert code == 2 and "critique.rounds: 1 -> 2" in err


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_config_whose_eval_would_hold_no_prompt_out_is_refused_before_anything_runs(
    config_file, tmp_path, capsys, command
):
    """eval.red_team unset falls back to data.red_team, which critique reads whole (data.max_red_team unset)."""
    run_dir = tmp_path / "run"
    code, err = run_cli([command, str(config_file()), "--run-dir", str(run_dir), "--set", "eval.red_team=null"], capsys)
    assert code == 2
    line = cai_error_line(err)
    assert line.startswith("cai: error: eval.red_team: no held-out prompts: it falls back to data.red_team"), line
    assert "data.max_red_team: null" in line and not run_dir.exists()
    # Capped, critique leaves prompts over for eval: accepted.
    code, err = run_cli(["plan", str(config_file()), "--run-dir", str(run_dir), "--set", "eval.red_team=null",
                         "--set", "data.max_red_team=3"], capsys)  # fmt: skip
    assert code == 0, err


def _bad_prompt_file(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["critique.roundz=1"], "unknown config key 'critique.roundz'"),
        (["backend=tensorrt"], "unknown back end 'tensorrt'"),
        (["models.helpful=./no-such-model"], "no such file or directory"),
        (["models.helpful=not a model!"], "not a known model"),
        (["constitution=./missing.yaml"], "missing.yaml"),
    ],
)
def test_bad_config_exits_2_with_one_line_and_writes_nothing(config_file, tmp_path, capsys, overrides, expected):
    run_dir = tmp_path / "run"
    args = ["run", str(config_file()), "--run-dir", str(run_dir)]
    for override in overrides:
        args += ["--set", override]
    code, err = run_cli(args, capsys)
    assert code == 2
    assert expected in err and len(err.splitlines()) == 1
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.jsonl", b'{"prompt": "fine"}\n{"prompt": "broken\n', "bad.jsonl:2"),
        ("empty.txt", b"\n\n", "no prompts"),
        ("latin1.txt", b"ok line\ncaf\xe9\n", "latin1.txt:2"),
    ],
)
def test_bad_prompt_files_exit_2_naming_file_and_line(config_file, tmp_path, capsys, name, content, expected):
    path = _bad_prompt_file(tmp_path, name, content)
    run_dir = tmp_path / "run"
    code, err = run_cli(
        ["run", str(config_file()), "--run-dir", str(run_dir), "--set", f"data.red_team={path}"], capsys
    )
    assert code == 2 and expected in err and len(err.splitlines()) == 1
    assert not run_dir.exists()


def test_empty_constitution_exits_2(config_file, tmp_path, capsys):
    constitution = tmp_path / "empty.yaml"
    constitution.write_text("name: empty\ncritique_principles: []\nfeedback_principles: []\n")
    run_dir = tmp_path / "run"
    code, err = run_cli(
        ["run", str(config_file()), "--run-dir", str(run_dir), "--set", f"constitution={constitution}"], capsys
    )
    assert code == 2 and "empty.yaml" in err and "critique_principles" in err
    assert not run_dir.exists()


def test_unknown_or_unbuilt_stage_exits_2(config_file, tmp_path, capsys):
    code, err = run_cli(["run", str(config_file()), "--run-dir", str(tmp_path / "r"), "--stages", "critque"], capsys)
    assert code == 2 and "unknown stage 'critque'" in err
    assert not (tmp_path / "r").exists()


def test_vllm_without_the_extra_is_a_clear_error(config_file, tmp_path, capsys):
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    code, err = run_cli(["run", str(config_file()), "--run-dir", str(tmp_path / "r"), "--set", "backend=vllm"], capsys)
    assert code == 2 and "pip install -e '.[vllm]'" in err
    assert not (tmp_path / "r").exists()


def test_interrupt_marks_the_stage_and_the_same_command_finishes_it(config_file, tmp_path, capsys, monkeypatch):
    from constitutional.stages import critique

    original = critique.CritiqueWriter.process
    calls = {"n": 0}

    def interrupted(self, chunk):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, chunk)

    monkeypatch.setattr(critique.CritiqueWriter, "process", interrupted)
    run_dir = tmp_path / "run"
    args = ["run", str(config_file()), "--run-dir", str(run_dir), "--stages", "critique"]
    code, err = run_cli(args, capsys)
    assert code == 130 and "run the same command again" in err
    manifest = yaml.safe_load((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["critique"] == {
        **manifest["stages"]["critique"],
        "status": "failed",
        "error": "interrupted",
    }
    monkeypatch.setattr(critique.CritiqueWriter, "process", original)
    code, err = run_cli(args, capsys)
    assert code == 0, err
    manifest = yaml.safe_load((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["critique"]["status"] == "done"
    assert manifest["stages"]["critique"]["counts"]["records"] == 7


def test_an_interrupted_critique_does_not_hide_that_eval_would_hold_no_prompt_out(config_file, tmp_path, capsys):
    """Critique wrote 1 record before it stopped: it will still train on every prompt of data.red_team."""
    from constitutional.records import append_records
    from constitutional.rundir import RunDir

    run = RunDir(tmp_path / "run")
    append_records(run.path("critiques"), [{"id": "rt-1", "kind": "red_team", "prompt": "How do I pick a lock?",
                                            "final_response": "No."}])  # fmt: skip
    run.manifest_path.write_text(json.dumps({"stages": {"critique": {"status": "running"}}}), encoding="utf-8")
    code, err = run_cli(["plan", str(config_file()), "--run-dir", str(run.root), "--set", "eval.red_team=null"], capsys)
    assert code == 2 and "eval.red_team: no held-out prompts: it falls back to data.red_team" in cai_error_line(err)
