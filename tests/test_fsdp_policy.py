"""PPO's models (`PolicyModule`, `ValueModule`, both LoRA) shard with torch's FSDP2 on CPU (gloo).

accelerate never turns FSDP on for CPU processes, so this drives `fully_shard` directly, the way
accelerate's TRANSFORMER_BASED_WRAP applies it (each decoder layer, then the root): two sharded
processes, each on half of a fixed batch, must take exactly the steps one unsharded process takes
on the whole batch (tests/fsdp_policy_driver.py).
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

DRIVER = Path(__file__).with_name("fsdp_policy_driver.py")
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP")


def run_driver(model_dir: Path, out: Path, processes: int) -> None:
    out.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [sys.executable, *(launcher if processes > 1 else []), str(DRIVER), str(model_dir), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_fully_shard_lora_policy_and_value_match_one_process(tmp_path, tiny_model_dir):
    run_driver(tiny_model_dir, tmp_path / "fsdp", processes=2)
    run_driver(tiny_model_dir, tmp_path / "single", processes=1)
    ranks = [torch.load(tmp_path / "fsdp" / f"rank{rank}.pt") for rank in range(2)]
    single = torch.load(tmp_path / "single" / "rank0.pt")

    # Sharding really happened: on each rank a frozen decoder-layer weight holds half its rows, and
    # every trainable (LoRA, score head) parameter is a DTensor; each rank saw only its 2 rows.
    for rank in ranks:
        shard = rank["shard"]
        assert shard["type"] == "DTensor", shard
        assert shard["local_numel"] * 2 == shard["global_numel"] == 64 * 64, shard
        assert shard["sharded_trainable"] == shard["trainable"] > 0, shard
        assert rank["rows"] == 2
    assert single["shard"]["type"] != "DTensor" and single["rows"] == 4

    # The same forward values on each step: policy, reference (adapters off) and value model.
    for key in ("logprobs", "reference", "values"):
        for step, expected in enumerate(single[key]):
            sharded = torch.cat([rank[key][step] for rank in ranks])
            torch.testing.assert_close(
                sharded, expected, atol=1e-5, rtol=0, msg=lambda m, k=key, s=step: f"{k} at step {s}: {m}"
            )
    for step, expected in enumerate(single["loss"]):
        torch.testing.assert_close((ranks[0]["loss"][step] + ranks[1]["loss"][step]) / 2, expected, atol=1e-5, rtol=0)
    # The steps moved the models: the second step's policy is off the reference, its values off the first.
    assert (single["logprobs"][1] - single["reference"][1]).abs().max() > 1e-2
    assert (single["values"][1] - single["values"][0]).abs().max() > 1e-2

    # The trainable weights after the steps, gathered whole, are the unsharded run's.
    sharded_state = torch.load(tmp_path / "fsdp" / "state.pt")
    single_state = torch.load(tmp_path / "single" / "state.pt")
    assert sharded_state.keys() == single_state.keys()
    assert any(name.startswith("value.") for name in single_state)
    for name, expected in single_state.items():
        torch.testing.assert_close(sharded_state[name], expected, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
