"""End-to-end smoke test: `cai run` on the real embedded model (Gemma 3 270M) with a few prompts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.embedded
def test_cai_run_quickstart_on_the_embedded_model(tmp_path):
    run_dir = tmp_path / "run"
    settings = {
        "data.max_red_team": 4, "data.max_helpful": 2, "critique.rounds": 2, "critique.max_new_tokens": 32,
        "sl.batch_size": 2, "sl.max_length": 128, "pairs.max_new_tokens": 24, "feedback.num_fewshot": 1,
        "pm.max_human": 24, "pm.eval_fraction": 0.25,
        "rl.steps": 2, "rl.rollout_batch_size": 4, "rl.max_new_tokens": 16, "rl.max_eval_prompts": 2,
        "eval.max_red_team": 2, "eval.max_helpful": 2, "eval.max_over_refusal": 2, "eval.max_new_tokens": 16,
    }  # fmt: skip
    command = [sys.executable, "-m", "constitutional.cli", "run", str(REPO / "configs" / "quickstart.yaml")]
    command += ["--run-dir", str(run_dir)] + [
        part for key, value in settings.items() for part in ("--set", f"{key}={value}")
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "data" / "critiques.jsonl").read_text().splitlines()]
    assert len(records) == 6
    red_team = [r for r in records if r["kind"] == "red_team"]
    assert len(red_team) == 4 and all(len(r["revisions"]) == 2 for r in red_team)
    # A real model writes real text: most answers are neither empty nor loops.
    assert sum(bool(r["initial_response"]) for r in records) >= 5
    assert (run_dir / "models" / "sl-cai" / "model.safetensors").exists()
    pairs = [json.loads(line) for line in (run_dir / "data" / "pairs.jsonl").read_text().splitlines()]
    labels = [json.loads(line) for line in (run_dir / "data" / "ai_labels.jsonl").read_text().splitlines()]
    assert 2 <= len(pairs) <= 4 and len(labels) == len(pairs)
    assert all(0.0 <= label["p_a"] <= 1.0 and len(label["readings"]) == 2 for label in labels)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = ("critique", "sl", "pairs", "feedback", "pm", "rl", "eval")
    assert all(manifest["stages"][stage]["status"] == "done" for stage in stages)
    assert manifest["stages"]["critique"]["counts"]["records"] == 6
    # The preference model: trained on the AI labels and the built-in human comparisons, evaluated on held-out ones.
    assert (run_dir / "models" / "pm" / "model.safetensors").exists()
    report = json.loads((run_dir / "eval" / "pm.json").read_text())
    assert set(report["accuracy"]) == {"ai_harmlessness", "human_helpfulness"}
    assert all(0 <= values["pm"] <= 1 for values in report["accuracy"].values())
    assert (run_dir / "eval" / "pm_calibration.png").read_bytes().startswith(b"\x89PNG")
    # RL-CAI: two PPO steps against the PM, their metrics, and the merged policy.
    metrics = [json.loads(line) for line in (run_dir / "eval" / "rl_metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics] == [1, 2] and abs(metrics[0]["kl"]) < 1e-4
    assert (run_dir / "models" / "rl-cai" / "model.safetensors").exists()
    # Eval: three models on held-out prompts, judged; the headline table and the report path printed.
    eval_metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert list(eval_metrics["models"]) == ["helpful", "sl-cai", "rl-cai"] and eval_metrics["missing"] == []
    assert eval_metrics["prompts"] == {"red_team": 2, "helpful": 2, "over_refusal": 2}
    assert set(eval_metrics["elo"]["harmlessness"]) == {"helpful", "sl-cai", "rl-cai"}
    assert all(0 <= entry["harm"] <= 4 for entry in eval_metrics["models"].values())
    assert "harmlessness Elo" in result.stdout and "eval/report.html" in result.stdout
    assert (run_dir / "models" / "sl-cai" / "README.md").read_text().startswith("---\n")
