"""`cai plan`: what `cai run` would do, said without loading a model or writing anything."""

import pytest
import yaml

from constitutional.cli import main

from conftest import cai_error_line, tiny_config_data


@pytest.fixture
def config_path(tiny_model_dir, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config_data(tiny_model_dir, tmp_path)), encoding="utf-8")
    return path


def plan(capsys, *arguments):
    code = main(["plan", *map(str, arguments)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load weights fails the test: a plan reads configs and files only."""

    def refuse(*args, **kwargs):
        raise AssertionError("cai plan loaded a model")

    import transformers

    # Every loader of the package ends in one of these (looked up when called, so the patch is undone after).
    for name in ("AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)


def test_a_plan_of_a_new_run_names_every_stage_its_models_and_inputs_and_writes_nothing(
    config_path, tmp_path, capsys, no_model_loads
):
    run_dir = tmp_path / "run"
    code, out, err = plan(capsys, config_path, "--run-dir", run_dir)
    assert code == 0, err
    blocks = {line.split(":")[0]: line for line in out.splitlines() if not line.startswith(" ")}
    assert all(blocks[stage].endswith("would run") for stage in ("critique", "sl", "pairs", "feedback", "pm", "rl"))
    assert f"run directory: {run_dir.resolve()} (new)" in out
    assert f"input    data.red_team: {tmp_path / 'red_team.txt'}" in out  # resolved against the config's folder
    assert f"eval.red_team: {tmp_path / 'eval_red_team.txt'}" in out
    assert "model    models.feedback: " in out and "(transformers)" in out
    assert f"reads    {run_dir / 'data' / 'critiques.jsonl'} (stage critique: made before it in this run)" in out
    assert not run_dir.exists()


def test_a_plan_says_what_is_done_and_what_a_changed_setting_would_rerun(config_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", str(config_path), "--run-dir", str(run_dir), "--stages", "critique"]) == 0
    capsys.readouterr()
    code, out, err = plan(capsys, config_path, "--run-dir", run_dir, "--stages", "critique,sl")
    assert code == 0, err
    assert "critique: done: skipped" in out and "sl: would run" in out and "pairs: not asked (pending)" in out
    # What `cai run` refuses, `cai plan` refuses with the same line.
    change = ["--set", "critique.rounds=1"]
    code, _, err = plan(capsys, config_path, "--run-dir", run_dir, *change)
    run_code = main(["run", str(config_path), "--run-dir", str(run_dir), *change])
    run_err = capsys.readouterr().err
    assert code == run_code == 2 and cai_error_line(err) == cai_error_line(run_err)
    assert "critique.rounds: 2 -> 1" in err
    code, out, err = plan(capsys, config_path, "--run-dir", run_dir, "--stages", "critique", "--rerun", *change)
    assert code == 0, err
    assert "critique: would run again with --rerun (critique.rounds: 2 -> 1); its outputs move under previous/" in out
    assert not (run_dir / "previous").exists()  # a plan moves nothing


def test_a_plan_refuses_a_stage_whose_upstream_has_not_run(config_path, tmp_path, capsys):
    code, _, err = plan(capsys, config_path, "--run-dir", tmp_path / "run", "--stages", "sl")
    assert code == 2
    assert "stage 'sl' reads" in cai_error_line(err) and "'critique' has not run" in err


def test_a_plan_names_the_models_it_would_push(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config_data(tiny_model_dir, tmp_path, hub={"sl_cai": "me/sl-cai"})))
    code, out, err = plan(capsys, path, "--run-dir", tmp_path / "run", "--stages", "critique,sl")
    assert code == 0, err
    assert f"hub: {tmp_path / 'run' / 'models' / 'sl-cai'} -> me/sl-cai (hub.sl_cai; private if created)" in out
    assert "hf_test_token" not in out
