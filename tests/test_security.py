"""Security: no pickle and no shell in the source, checkpoints read back without running pickled code,
`trust_remote_code` recorded when on, and an API key never written anywhere.

(The report's escaping of hostile model text is tested in tests/test_eval_stage.py.)
"""

from __future__ import annotations

import ast
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from constitutional.cli import main
from constitutional.config import config_from_dict
from constitutional.pipeline import run_pipeline
from constitutional.rundir import RunDir
from fault_server import FaultPlan, fault_server

from conftest import tiny_config_data

SOURCE = Path(__file__).resolve().parents[1] / "src" / "constitutional"


def calls_and_imports(tree: ast.AST) -> list[str]:
    """Dotted names of everything imported or called, and `shell=` keywords, in a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call):
            found.append(ast.unparse(node.func))
            found += [f"shell={ast.unparse(k.value)}" for k in node.keywords if k.arg == "shell"]
    return found


def test_the_source_neither_unpickles_nor_runs_a_shell():
    forbidden = ("pickle", "dill", "torch.load", "subprocess", "os.system", "os.popen", "eval", "exec", "shell=")
    modules = sorted(SOURCE.rglob("*.py"))
    assert len(modules) > 30
    offending = [
        f"{path.relative_to(SOURCE)}: {name}"
        for path in modules
        for name in calls_and_imports(ast.parse(path.read_text(encoding="utf-8")))
        if any(name == word or name.startswith(word + ".") or name.startswith(word) and word.endswith("=")
               for word in forbidden)
    ]  # fmt: skip
    assert offending == []


def test_checkpoints_are_read_back_with_weights_only(tmp_path, tiny_model_dir, monkeypatch):
    """The one place state is pickled is a Trainer's checkpoint (optimizer, scheduler, RNG): resuming
    must load it with `weights_only=True` (tensors and plain containers, never arbitrary objects)."""
    from constitutional.models import load_tokenizer, resolve_model_name
    from constitutional.stages import sl
    from test_sl_stage import write_critiques

    data = tiny_config_data(tiny_model_dir, tmp_path, sl={"batch_size": 2, "max_length": 64, "save_steps": 1})
    config = config_from_dict(data)
    run = RunDir(tmp_path / "run")
    write_critiques(run)
    base = resolve_model_name(str(tiny_model_dir))
    tokenizer = load_tokenizer(base)
    examples, _ = sl.load_examples(run.path("critiques"), config.sl, config.seed, tokenizer.eos_token)
    sl.train(config.training, config.sl, config.seed, base, tokenizer, examples, run.checkpoints("sl"))
    loads = []
    original = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    # Training again resumes from the last checkpoint: its optimizer and RNG state are read.
    _, summary = sl.train(config.training, config.sl, config.seed, base, tokenizer, examples, run.checkpoints("sl"))
    assert summary["resumed_from_step"] > 0
    assert len(loads) >= 2 and all(flag is True for flag in loads), loads  # optimizer and RNG state at least


def test_trust_remote_code_is_recorded_when_on(tmp_path, tiny_model_dir, caplog):
    data = tiny_config_data(tiny_model_dir, tmp_path, critique={"rounds": 1})
    run_pipeline(config_from_dict(data), tmp_path / "off", ["critique"])
    assert "trust_remote_code" not in RunDir(tmp_path / "off").stage_entry("critique")
    data["transformers"]["trust_remote_code"] = True
    with caplog.at_level(logging.WARNING):
        run_pipeline(config_from_dict(data), tmp_path / "on", ["critique"])
    entry = RunDir(tmp_path / "on").stage_entry("critique")
    assert entry["trust_remote_code"] == ["transformers.trust_remote_code"]
    assert "code from model repositories may run" in caplog.text


def test_an_api_key_is_never_written(tmp_path, tiny_model_dir, monkeypatch, capsys, caplog):
    """A planted key, quoted back by a failing server, appears in no file of the run, the report or the logs."""
    secret = "sk-test-PLANTED-SECRET-0c9f7e2b"
    monkeypatch.setenv("CAI_TEST_API_KEY", secret)
    plan = FaultPlan(seed=3, max_faults=2, quote_key=True)
    with fault_server(plan) as url:
        served = {"name": "fake-model", "prompt_format": "plain"}
        data = tiny_config_data(tiny_model_dir, tmp_path, critique={"rounds": 1})
        data.update(backend="openai", models={"helpful": served, "base": served, "feedback": served})
        data["pairs"] = {"model": "fake-model"}
        data["openai"] = {"base_url": url, "api_key_env": "CAI_TEST_API_KEY", "max_retries": 3,
                          "backoff_initial_s": 0.01, "timeout_s": 0.3, "scoring": "top_logprobs"}  # fmt: skip
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(data), encoding="utf-8")
        run_dir = tmp_path / "run"
        with caplog.at_level(logging.DEBUG):
            assert main(["run", str(config), "--run-dir", str(run_dir), "--stages", "critique,pairs,feedback"]) == 0
            assert main(["report", str(run_dir)]) == 0
    assert plan.injected["500"] > 0  # the server did quote the key back in some errors
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any(path.name == "report.html" for path in files) and len(files) > 5
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    for text in (captured.out, captured.err, caplog.text):
        assert secret not in text
    assert "***" in caplog.text or "***" in captured.err  # masked where the server quoted it


@pytest.mark.parametrize("tamper", ["pickle", "truncated"])
def test_a_checkpoint_that_cannot_be_loaded_safely_is_one_line_never_a_traceback_or_the_unsafe_advice(
    tmp_path, tiny_model_dir, tamper
):
    """A resumed sl whose checkpoint's optimizer state is a code-running pickle, or cut short: exit 2, one line
    naming the checkpoint and what to do; the pickle's code never runs."""
    import subprocess
    import sys

    from test_sl_stage import write_critiques

    data = tiny_config_data(tiny_model_dir, tmp_path, sl={"batch_size": 2, "max_length": 64, "save_steps": 1,
                                                          "epochs": 2})  # fmt: skip
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    run = RunDir(tmp_path / "run")
    write_critiques(run)
    from constitutional.stages import sl

    config_data = config_from_dict(data)
    base = resolve(tiny_model_dir)
    from constitutional.models import load_tokenizer

    tokenizer = load_tokenizer(base)
    examples, _ = sl.load_examples(run.path("critiques"), config_data.sl, config_data.seed, tokenizer.eos_token)
    sl.train(config_data.training, config_data.sl, config_data.seed, base, tokenizer, examples, run.checkpoints("sl"))
    # Resume from the one before the last, so that steps remain and the optimizer state is read.
    *earlier, last = sorted(run.checkpoints("sl").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    shutil.rmtree(last)
    checkpoint = earlier[-1]
    optimizer = checkpoint / "optimizer.pt"
    marker = tmp_path / "pwned"
    if tamper == "pickle":
        optimizer.write_bytes(pickle.dumps(_RunsCode(str(marker))))
    else:
        optimizer.write_bytes(optimizer.read_bytes()[:100])
    result = subprocess.run([sys.executable, "-m", "constitutional.cli", "run", str(config), "--run-dir",
                             str(run.root), "--stages", "sl"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"cai: error: sl: the checkpoint {checkpoint} cannot be loaded safely"), line
    assert f"rm -r {checkpoint.parent}" in line and not marker.exists()


class _RunsCode:
    """A pickle that would create a file when unpickled (if anything ever unpickled it unsafely)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def resolve(path):
    from constitutional.models import resolve_model_name

    return resolve_model_name(str(path))


def test_an_rl_checkpoint_altered_to_run_code_is_refused_in_one_line_and_models_are_safetensors_only(
    tmp_path, tiny_model_dir, monkeypatch
):
    """PPO interrupted after its first checkpoint; each pickled part of that checkpoint in turn replaced by a
    pickle that would run code: the resume is one line naming the checkpoint (exit 2), the code never runs
    (accelerate alone would skip random states it cannot read and go on). Once the checkpoint is removed,
    the run finishes, and every model folder (sl-cai, pm, rl-cai) holds safetensors, never a pickle."""
    import subprocess
    import sys

    from constitutional.rl import trainer

    data = tiny_config_data(tiny_model_dir, tmp_path, rl={"save_steps": 1})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    config, run = config_from_dict(data, base_dir=tmp_path), RunDir(tmp_path / "run")
    step, calls = trainer.ppo_step, []

    def interrupted_at_the_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer, "ppo_step", interrupted_at_the_second_step)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, run.root, ["critique", "sl", "pairs", "feedback", "pm", "rl"])
    checkpoint, marker = run.checkpoints("rl") / "step-1", tmp_path / "pwned"
    command = [sys.executable, "-m", "constitutional.cli", "run", str(config_file), "--run-dir", str(run.root),
               "--stages", "rl"]  # fmt: skip
    for part in ("optimizer.bin", "random_states_0.pkl"):
        original = (checkpoint / part).read_bytes()
        (checkpoint / part).write_bytes(pickle.dumps(_RunsCode(str(marker))))
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 2, (part, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"cai: error: rl: the checkpoint {checkpoint} cannot be loaded safely"), line
        assert f"rm -r {checkpoint.parent}" in line and not marker.exists()
        (checkpoint / part).write_bytes(original)

    shutil.rmtree(checkpoint.parent)  # what the line says to do
    assert subprocess.run(command, capture_output=True, text=True, timeout=600).returncode == 0
    for folder in ("sl_cai", "pm", "rl_cai"):
        files = [path.name for path in run.path(folder).rglob("*") if path.is_file()]
        assert any(name.endswith(".safetensors") for name in files), (folder, files)
        assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], (folder, files)
