"""Stages sl and pm load their model where the sharding config is in force (issue 19).

Under DeepSpeed ZeRO-3 the TrainingArguments come first, so `from_pretrained` builds the model
inside `deepspeed.zero.Init` and each process keeps its partition; under FSDP's CPU-RAM-efficient
loading only local rank 0 reads the weights, the others hold meta tensors until accelerate's FSDP2
preparation gives each its shard. Measured on 2 CPU processes (gloo) of a 41M-parameter Llama
(157 MB in fp32, stored in bf16 like a hub checkpoint) by tests/sharded_loading_driver.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharded_loading_driver import stage_model, write_pm_rows

from tiny_model import build_tiny_model

DRIVER = Path(__file__).with_name("sharded_loading_driver.py")
LAUNCH_PREFIXES = ("ACCELERATE_", "FSDP_", "DS_", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_", "LOCAL_WORLD_SIZE")
LAUNCHES = {
    # What `accelerate launch` sets for configs/accelerate/fsdp.yaml and deepspeed-zero3.yaml.
    "fsdp": {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"},
    "zero3": {
        "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true", "DS_ACCELERATOR": "cpu",
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's tokenizer with a Llama of 12 layers of width 512 (41M parameters), saved in bf16;
    its output layer is its input embedding, as in the embedded Gemma."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory = build_tiny_model(tmp_path_factory.mktemp("sharded-model"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


def launch(mode: str, model_dir: Path, out: Path) -> list[dict]:
    """The driver on 2 processes under `mode`'s launch environment; each rank's report."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(LAUNCH_PREFIXES)}
    # A fixed mmap threshold: glibc then gives freed tensors back at once, so resident memory is
    # what is alive (its adaptive threshold would keep a freed model's pages for the next one).
    env.update(LAUNCHES[mode], OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(DRIVER), mode, str(model_dir), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    errors = [line for line in result.stderr.splitlines() if "Error:" in line and "ChildFailedError" not in line]
    assert result.returncode == 0, "\n".join(errors[:6]) + "\n...\n" + result.stderr[-2000:]
    return [json.loads((out / f"rank{rank}.json").read_text(encoding="utf-8")) for rank in range(2)]


def test_under_fsdp_only_rank_0_reads_the_weights_and_each_rank_keeps_half(model_dir, tmp_path):
    ranks = launch("fsdp", model_dir, tmp_path)
    for stage in ("sl", "pm"):
        first, second = ranks[0][stage], ranks[1][stage]
        full = first["full_mb"]
        assert full > 150, first  # the weights dominate the noise: 157 MB in fp32
        # Loading: rank 0 holds the whole model, rank 1 nothing (meta tensors), not even for a moment.
        assert first["held_mb"] == pytest.approx(full) and first["meta_parameters"] == 0, first
        assert second["held_mb"] == 0 and second["meta_parameters"] > 100, second
        assert second["full_mb"] == first["full_mb"], second  # the same parameters, tied as on rank 0
        assert second["peak_growth_mb"] < 0.1 * full, second
        # accelerate's FSDP2 preparation: each rank holds half, and rank 1 got rank 0's weights
        # (the score head pm starts fresh too).
        for rank in (first, second):
            assert rank["sharded_types"] == ["DTensor"], rank
            assert rank["sharded_held_mb"] == pytest.approx(full / 2, rel=0.02), rank
            assert rank["sharded_anon_growth_mb"] < 0.7 * full, rank
        assert second["sharded_peak_growth_mb"] < 0.7 * full, second
        assert second["probes"] == first["probes"] and len(first["probes"]) == (2 if stage == "sl" else 3)
    print(
        "fsdp (MB)",
        {f"rank{n}": {stage: _figures(rank[stage]) for stage in ("plain_from_pretrained", "sl", "pm")}
         for n, rank in enumerate(ranks)},
    )  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed (pip install deepspeed)")
def test_under_zero3_each_rank_loads_only_its_partition_because_the_arguments_come_first(model_dir, tmp_path):
    ranks = launch("zero3", model_dir, tmp_path)
    for rank in ranks:
        # Loaded before the TrainingArguments exist (the stages' old order): the whole model in each process.
        old = rank["old_order"]
        assert not old["zero3_config_when_loading"] and old["held_mb"] == pytest.approx(old["full_mb"]), old
        for stage in ("sl", "pm"):
            record = rank[stage]
            assert record["zero3_config_when_loading"], f"{stage}: the model was loaded before its TrainingArguments"
            assert record["full_mb"] > 150, record
            assert record["held_mb"] == pytest.approx(record["full_mb"] / 2, rel=0.02), record
            assert record["anon_growth_mb"] < 0.7 * record["full_mb"], record
    for stage in ("sl", "pm"):  # rank 0 reads the whole (bf16) checkpoint to fill the partitions; rank 1 never
        assert ranks[1][stage]["peak_growth_mb"] < 0.7 * ranks[1][stage]["full_mb"], ranks[1][stage]
    print(
        "zero3 (MB)",
        {f"rank{n}": {stage: _figures(rank[stage]) for stage in ("old_order", "sl", "pm")}
         for n, rank in enumerate(ranks)},
    )  # fmt: skip


def _figures(record: dict) -> dict:
    keys = ("held_mb", "anon_growth_mb", "peak_growth_mb", "sharded_held_mb", "sharded_anon_growth_mb",
            "sharded_peak_growth_mb")  # fmt: skip
    return {key: round(record[key]) for key in keys if key in record}


@pytest.mark.parametrize("stage", ["sl", "pm"])
def test_the_training_arguments_are_made_before_the_model_is_loaded(stage, tiny_model_dir, tmp_path, monkeypatch):
    """The order itself, without DeepSpeed: when the stage calls `from_pretrained`, its
    TrainingArguments (SFTConfig, RewardConfig) exist already, as ZeRO-3 needs."""
    from transformers import PreTrainedModel, TrainingArguments

    events: list[str] = []
    make_args, load = TrainingArguments.__post_init__, PreTrainedModel.from_pretrained.__func__

    def made(self):
        events.append("arguments")
        make_args(self)

    def loaded(cls, *args, **kwargs):
        events.append("from_pretrained")
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(TrainingArguments, "__post_init__", made)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(loaded))
    model = stage_model(stage, tiny_model_dir, write_pm_rows(tmp_path), {})
    assert isinstance(model, PreTrainedModel)
    assert events[:2] == ["arguments", "from_pretrained"], events
