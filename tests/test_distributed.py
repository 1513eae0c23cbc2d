"""Training under `accelerate launch`: a real two-process run of `sl` (gloo on CPU), what a launch
refuses, and the shipped accelerate configs as accelerate's own launcher reads them."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from constitutional import distributed
from constitutional.config import config_from_dict
from constitutional.errors import UserError
from constitutional.pipeline import run_pipeline
from constitutional.records import read_records
from constitutional.rundir import RunDir
from constitutional.training import is_complete_model
from test_sl_stage import assert_plain_safetensors_model, write_critiques

from conftest import tiny_config_data

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    """Each test starts outside any launch, whatever the environment pytest was started in."""
    for variable in LAUNCH_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def launch(arguments: list[str], **environment: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of 2 processes on CPU.

    On CPU accelerate starts several processes only through its multi-GPU (torchrun) launcher; the
    Trainer (or PPO's Accelerator) then joins them with gloo because training.device says cpu.
    """
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **environment)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        *arguments,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_two_process_launch_trains_sl_once(tmp_path, tiny_model_dir):
    """`accelerate launch` with 2 processes (gloo on CPU): one model, one manifest entry, half the steps."""
    config_path = tmp_path / "config.yaml"
    sl_settings = {"batch_size": 2, "max_length": 64, "learning_rate": 1e-3, "save_steps": 100, "logging_steps": 1}
    data = tiny_config_data(tiny_model_dir, tmp_path, sl=sl_settings, training={"device": "cpu"})
    config_path.write_text(yaml.safe_dump(data), encoding="utf-8")
    run = RunDir(tmp_path / "run")
    usable = sum(bool(record["final_response"]) for record in write_critiques(run))
    result = launch(["-m", "constitutional.cli", "run", str(config_path), "--run-dir", str(run.root), "--stages", "sl"])
    assert result.returncode == 0, result.stderr[-3000:]
    output = run.path("sl_cai")
    assert is_complete_model(output)
    assert_plain_safetensors_model(output, tiny_model_dir)
    assert not output.with_name("sl-cai.partial").exists()
    assert not list(run.checkpoints("sl").glob("checkpoint-*"))
    entry = run.stage_entry("sl")
    assert entry["status"] == "done"
    # Each optimizer step took one batch from each of the 2 processes.
    assert entry["counts"]["steps"] == math.ceil(usable / (2 * sl_settings["batch_size"]))
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["steps"] == entry["counts"]["steps"]


def test_generation_stages_are_refused_under_a_launch(tmp_path, tiny_model_dir, monkeypatch):
    config = config_from_dict(tiny_config_data(tiny_model_dir, tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"2 processes, and stage\(s\) critique would run once in each"):
        run_pipeline(config, tmp_path / "run", ["critique", "sl"])
    assert not (tmp_path / "run").exists()


def test_rl_that_cannot_split_is_refused_under_a_launch(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rl, message in (
        ({"rollout_batch_size": 5}, "rl.rollout_batch_size: 5 do not split into 2 equal shares"),
        ({"rollout_batch_size": 4, "minibatch_size": 4}, r"of at least 4 \(rl.minibatch_size\)"),
    ):
        config = config_from_dict(tiny_config_data(tiny_model_dir, tmp_path, rl=rl))
        with pytest.raises(UserError, match=message):
            run_pipeline(config, tmp_path / "run", ["rl"])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for algorithm in ("ppo", "grpo"):
        rl = {"algorithm": algorithm, "rollout_batch_size": 4, "group_size": 2, "lora": {"enabled": False}}
        config = config_from_dict(tiny_config_data(tiny_model_dir, tmp_path, rl=rl))
        with pytest.raises(UserError, match=f"{algorithm} keeps whole models in every process .* not FSDP"):
            run_pipeline(config, tmp_path / "run", ["rl"])
    assert not (tmp_path / "run").exists()


def test_two_process_launch_runs_grpo(tmp_path, tiny_model_dir):
    """GRPO (TRL's trainer) under `accelerate launch`: the rollout batch is split, process 0 saves."""
    from test_rl_stage import run_dir as make_rl_run

    run = make_rl_run.__wrapped__(tmp_path, tiny_model_dir)
    rl = {"algorithm": "grpo", "steps": 2, "rollout_batch_size": 4, "group_size": 2, "max_new_tokens": 6,
          "max_eval_prompts": 2, "save_steps": 1}  # fmt: skip
    data = tiny_config_data(tiny_model_dir, tmp_path, rl=rl, training={"device": "cpu"})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(data), encoding="utf-8")
    result = launch(["-m", "constitutional.cli", "run", str(config_path), "--run-dir", str(run.root), "--stages", "rl"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert is_complete_model(run.path("rl_cai"))
    assert [row["step"] for row in read_records(run.path("rl_metrics"))] == [1, 2]
    entry = run.stage_entry("rl")
    assert entry["status"] == "done" and entry["counts"]["algorithm"] == "grpo" and entry["counts"]["steps"] == 2
    assert not run.checkpoints("rl").exists() or not list(run.checkpoints("rl").glob("checkpoint-*"))


def test_two_process_launch_runs_ppo_with_shared_rollouts(tmp_path, tiny_model_dir):
    """PPO under `accelerate launch` (2 processes, gloo): each takes half of every rollout batch,
    gradients are averaged, checkpoints are written together, process 0 writes metrics and the model."""
    from test_rl_stage import run_dir as make_rl_run

    run = make_rl_run.__wrapped__(tmp_path, tiny_model_dir)
    rl = {"steps": 3, "rollout_batch_size": 4, "minibatch_size": 2, "max_new_tokens": 6, "save_steps": 1,
          "max_eval_prompts": 2}  # fmt: skip
    data = tiny_config_data(tiny_model_dir, tmp_path, rl=rl, training={"device": "cpu"})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(data), encoding="utf-8")
    logs = tmp_path / "ranks"
    logs.mkdir()
    driver = str(Path(__file__).with_name("ppo_rank_driver.py"))
    result = launch([driver, "run", str(config_path), "--run-dir", str(run.root), "--stages", "rl"],
                    CAI_RANK_LOG_DIR=str(logs))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # Each process rolled out half of every batch, and after every step both hold the same weights,
    # which change from step to step: the gradients were averaged, not trained apart.
    ranks = [(logs / f"rank{rank}.txt").read_text().split("\n")[:-1] for rank in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 3
    assert [line.split()[1] for line in ranks[0]] == ["2", "2", "2"]
    assert len({line.split()[2] for line in ranks[0]}) == 3
    assert is_complete_model(run.path("rl_cai"))
    metrics = read_records(run.path("rl_metrics"))
    assert [row["step"] for row in metrics] == [1, 2, 3]  # one line per step, from process 0 only
    assert all(row["response_length"] > 0 and math.isfinite(row["kl"]) for row in metrics)
    assert len(read_records(run.path("rl_prompts"))) == 20 + 2  # written once, whole: 20 to train, 2 held out
    entry = run.stage_entry("rl")
    assert entry["status"] == "done" and entry["counts"]["algorithm"] == "ppo"
    assert not list(run.checkpoints("rl").glob("step-*"))


def test_a_pinned_gpu_is_refused_under_a_launch(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="training.device: 'cuda:1' under a launch of 2 processes"):
        config_from_dict(tiny_config_data(tiny_model_dir, tmp_path, training={"device": "cuda:1"}))


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_lora_merge_is_refused_when_weights_are_sharded(tmp_path, tiny_model_dir, monkeypatch, variable):
    config = config_from_dict(tiny_config_data(tiny_model_dir, tmp_path, sl={"lora": {"enabled": True}}))
    monkeypatch.setenv(variable, "true")
    with pytest.raises(UserError, match=r"sl.lora: merging a LoRA adapter .* not supported"):
        run_pipeline(config, tmp_path / "run", ["sl"])
    assert not (tmp_path / "run").exists()


def launch_environment(name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file configs/accelerate/<name>.yaml` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE_CONFIGS / f"{name}.yaml"), "x.py"])
    args, defaults, _ = _validate_launch_command(args)
    if not args.use_deepspeed:
        return prepare_multi_gpu_env(args)
    # What `accelerate launch` does before it builds the DeepSpeed launcher's command.
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    return prepare_deepspeed_cmd_env(args)[1]


def test_shipped_accelerate_configs_launch_what_they_say(monkeypatch):
    names = sorted(path.stem for path in ACCELERATE_CONFIGS.glob("*.yaml"))
    assert names == ["ddp", "deepspeed-zero3", "fsdp"]
    expected = {
        "ddp": (None, {}),
        "deepspeed-zero3": (
            "DeepSpeed",
            {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"},
        ),
        "fsdp": ("FSDP", {"FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}),
    }
    for name in names:
        env = launch_environment(name)
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16", name
        strategy, variables = expected[name]
        for key, value in variables.items():
            assert env.get(key, "").lower() == value.lower(), (name, key, env.get(key))
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            assert distributed.sharding_strategy() == strategy, name
            if strategy == "FSDP":
                from accelerate.utils import FullyShardedDataParallelPlugin

                plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables, validates them
                assert plugin.fsdp_version == 2 and "FULL_STATE_DICT" in str(plugin.state_dict_type)


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_a_sharded_launch_without_gpus_is_refused(tmp_path, tiny_model_dir, monkeypatch, variable):
    """accelerate shards only on GPUs: on CPUs it would train as DDP on weights loaded for sharding (meta
    outside rank 0 under FSDP), so the plan refuses it in one line naming the launch, before anything is written."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(variable, "true")
    for stage in ("sl", "pm"):
        config = config_from_dict(tiny_config_data(tiny_model_dir, tmp_path))
        refusal = rf"^{stage}: this launch asks .* to shard the weights, but there is no GPU"
        with pytest.raises(UserError, match=refusal):
            run_pipeline(config, tmp_path / "run", [stage])
    assert not (tmp_path / "run").exists()
