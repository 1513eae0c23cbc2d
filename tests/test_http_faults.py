"""HTTP-fault campaign: `critique`, `pairs` and `feedback` through a server that fails every way it can.

`tests/fault_server.py` fails each request 0 to 3 times (500, 429 with Retry-After, timeouts,
bodies cut short, half a JSON document, dropped connections, answers in the wrong shape) before
answering it correctly. The stages must end with exactly the records a healthy server gives, each
request tried at most `max_retries + 1` times. A server that goes down and stays down must stop the
run with one line (exit 1) and keep every finished record; the same command then completes.
"""

from __future__ import annotations

import json

import pytest
import yaml

from constitutional.cli import main
from constitutional.records import read_records
from constitutional.rundir import RunDir
from fault_server import FAULTS, FaultPlan, fault_server

from conftest import cai_error_line, write_prompts

STAGES = ("critique", "pairs", "feedback")
FILES = ("critiques", "pairs", "ai_labels")
MAX_RETRIES = 4


def write_config(folder, url: str, scoring: str = "top_logprobs") -> str:
    red_team = write_prompts(folder / "red_team.txt", [f"How could someone cause harm of kind {i}?" for i in range(40)])
    helpful = write_prompts(folder / "helpful.txt", [f"Explain topic number {i} briefly." for i in range(10)])
    served = {"name": "fake-model", "prompt_format": "plain"}
    data = {
        "seed": 0,
        "backend": "openai",
        "models": {"helpful": served, "base": served, "feedback": served},
        "data": {"red_team": str(red_team), "helpful": str(helpful)},
        "critique": {"rounds": 2, "max_new_tokens": 16, "num_fewshot": 1, "chunk_size": 8},
        "pairs": {"model": "fake-model", "max_new_tokens": 16, "chunk_size": 8},
        "feedback": {"num_fewshot": 1},
        "cache": {"enabled": False},  # every request goes to the server
        "openai": {"base_url": url, "max_retries": MAX_RETRIES, "backoff_initial_s": 0.01, "backoff_max_s": 0.05,
                   "timeout_s": 0.3, "max_concurrency": 4, "scoring": scoring},
    }  # fmt: skip
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def run_stages(folder, url: str, run_dir, scoring: str = "top_logprobs") -> int:
    return main(["run", write_config(folder, url, scoring), "--run-dir", str(run_dir), "--stages", ",".join(STAGES)])


def records(run_dir) -> dict[str, list[dict]]:
    run = RunDir(run_dir)
    return {name: sorted(read_records(run.path(name)), key=lambda row: row["id"]) for name in FILES}


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """The records a server that never fails gives."""
    folder = tmp_path_factory.mktemp("healthy")
    with fault_server(FaultPlan()) as url:
        assert run_stages(folder, url, folder / "run") == 0
    return records(folder / "run")


@pytest.mark.parametrize("scoring", ["top_logprobs", "auto"])  # auto: the capability probe is faulted too
def test_every_record_survives_hundreds_of_injected_faults(healthy, tmp_path, capsys, scoring):
    plan = FaultPlan(seed=1, max_faults=3)
    with fault_server(plan) as url:
        code = run_stages(tmp_path, url, tmp_path / "run", scoring)
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert "Traceback" not in err
    assert records(tmp_path / "run") == healthy  # nothing lost, doubled or changed
    injected = sum(plan.injected.values())
    print(f"\nHTTP-fault campaign: {injected} faults injected {dict(plan.injected)}, "
          f"{plan.answered} requests answered, at most {max(plan.attempts.values())} tries per request")  # fmt: skip
    assert injected >= 200 and set(plan.injected) == set(FAULTS)
    if scoring == "top_logprobs":
        assert plan.answered == len(plan.attempts)  # every request was answered in the end...
        # ...within the tries the plan allows: each request is faulted at most max_faults times, then answered.
        assert max(plan.attempts.values()) <= plan.max_faults + 1 <= MAX_RETRIES + 1
    else:  # auto asks its echo probe again at once until every try answered without echo: MAX_RETRIES + 1
        assert plan.answered >= len(plan.attempts) and max(plan.attempts.values()) == MAX_RETRIES + 1
    counts = {name: len(rows) for name, rows in healthy.items()}
    assert counts["critiques"] == 50 and counts["pairs"] == 40 and counts["ai_labels"] == 40


def test_a_server_that_stays_down_stops_the_run_and_keeps_what_was_done(healthy, tmp_path, capsys):
    plan = FaultPlan(seed=2)
    with fault_server(plan) as url:
        # Goes down for good part-way through the critique stage (after some chunks are written).
        original = plan.fault_for

        def fault_for(key: str) -> str | None:
            if plan.answered >= 60:
                plan.down = True
            return original(key)

        plan.fault_for = fault_for
        assert run_stages(tmp_path, url, tmp_path / "run") == 1
        error = cai_error_line(capsys.readouterr().err)
        assert f"failed after {MAX_RETRIES + 1} attempts" in error and "finished work is kept" in error
        run = RunDir(tmp_path / "run")
        kept = read_records(run.path("critiques"))
        assert 0 < len(kept) < len(healthy["critiques"])
        assert run.stage_status("critique") == "failed"
        assert json.loads(run.manifest_path.read_text())["stages"]["critique"]["error"]
        # The server is back: the same command finishes, with the records a healthy run gives.
        plan.fault_for = original
        plan.down = False
        assert run_stages(tmp_path, url, tmp_path / "run") == 0
    assert records(tmp_path / "run") == healthy
    assert {row["id"] for row in kept} <= {row["id"] for row in healthy["critiques"]}
