"""The prepared GPU benchmark must run when a session gets the machine: its smoke mode, on CPU."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_every_section_in_smoke_mode():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])["smoke"]
    for section in ("generation", "training", "ppo"):
        assert "error" not in figures[section], figures[section]
    generation = figures["generation"]
    assert {"raw_generate_batch_1", "raw_generate_batch_8", "backend_batch_8", "critique_stage"} <= set(generation)
    assert all(value > 0 for value in generation.values())
    assert figures["training"]["sft_tokens_per_s"] > 0 and figures["training"]["pm_tokens_per_s"] > 0
    assert figures["ppo"]["step_s"] > 0
