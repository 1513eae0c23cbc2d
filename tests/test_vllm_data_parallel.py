"""vLLM over the GPUs of one machine (`vllm.data_parallel_size`): one engine per GPU group, one process each.

vLLM and GPUs are not here: `tests/stand_ins/vllm` is what `import vllm` finds, in this process and
in the spawned workers (it is put on PYTHONPATH). Its answers are a pure function of each request,
like a seeded vLLM's, and each engine logs the GPUs it saw and the requests it answered, so the
tests see that every engine got its own GPUs and a share of each batch, and that the records equal
one engine's.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import sys
from pathlib import Path

import pytest
import yaml

from constitutional.backends.base import SamplingParams
from constitutional.backends.settings import VLLMSettings
from constitutional.cli import main
from constitutional.errors import ServiceError, UserError
from constitutional.records import read_records
from constitutional.rundir import RunDir

from conftest import tiny_config_data

STAND_INS = Path(__file__).with_name("stand_ins")


@pytest.fixture
def stand_in_vllm(monkeypatch, tmp_path):
    """The stand-in `vllm` importable here and in spawned processes; returns the engines' log file."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(STAND_INS), os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(str(STAND_INS))
    for name in ("vllm", "constitutional.backends.vllm"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    log = tmp_path / "engines.jsonl"
    monkeypatch.setenv("STAND_IN_VLLM_LOG", str(log))
    yield log
    for name in ("vllm", "constitutional.backends.vllm"):
        sys.modules.pop(name, None)  # later tests see the real import (or its absence)


def fresh_vllm_backend():
    """`constitutional.backends.vllm` imported now, against the stand-in (sys.modules has neither: the fixture).

    Not `from constitutional.backends import vllm`: that returns the package's attribute, which may
    still be a module an earlier test imported against another stand-in.
    """
    return importlib.import_module("constitutional.backends.vllm")


def engine_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_engines_on_their_own_gpus_answer_as_one_engine(stand_in_vllm, tiny_model_dir, monkeypatch):
    vllm = fresh_vllm_backend()

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    prompts = [f"Human: question {index}?\n\nAssistant:" for index in range(5)]
    params, seeds = SamplingParams(max_new_tokens=8, temperature=1.0), [11, 12, 13, 14, 15]
    single = vllm.load(str(tiny_model_dir), VLLMSettings(), ".", seed=1)
    expected = single.generate(prompts, params, seeds), single.score_options(prompts, [" (A)", " (B)"])
    single.close()
    stand_in_vllm.unlink()

    backend = vllm.load(str(tiny_model_dir), VLLMSettings(data_parallel_size=2), ".", seed=1)
    try:
        assert backend.model_id == single.model_id  # the same weights: the same generation-cache keys
        assert backend.generate(prompts, params, seeds) == expected[0]
        assert backend.score_options(prompts, [" (A)", " (B)"]) == expected[1]
        assert backend.generate(prompts[:1], params, seeds[:1]) == expected[0][:1]  # one engine idle
        workers = [process for process, _, _ in backend.workers]
    finally:
        backend.close()
    assert all(process.exitcode == 0 for process in workers)  # each stopped its engine and exited

    lines = engine_log(stand_in_vllm)
    by_gpus = {gpus: [line for line in lines if line["gpus"] == gpus] for gpus in ("3", "5")}
    assert set(line["gpus"] for line in lines) == {"3", "5"}  # one engine per visible GPU, never both
    assert len({line["pid"] for line in lines}) == 2 and os.getpid() not in {line["pid"] for line in lines}
    # The batch of 5 split 2 + 3; the scoring batch (5 prompts x 2 options) 4 + 6; then one prompt.
    assert [line["n"] for line in by_gpus["3"] if line["call"] == "generate"] == [2, 4]
    assert [line["n"] for line in by_gpus["5"] if line["call"] == "generate"] == [3, 6, 1]
    assert all(entries[-1]["call"] == "shutdown" for entries in by_gpus.values())


def test_more_engines_than_gpus_is_refused_naming_the_keys(stand_in_vllm, tiny_model_dir, monkeypatch):
    vllm = fresh_vllm_backend()

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    with pytest.raises(UserError, match=r"^vllm.data_parallel_size: 2 engines x vllm.tensor_parallel_size 2 need 4"):
        vllm.load(str(tiny_model_dir), VLLMSettings(data_parallel_size=2, tensor_parallel_size=2), ".", seed=1)
    assert not multiprocessing.active_children() and not engine_log(stand_in_vllm)


def test_an_engine_that_fails_to_start_stops_the_others(stand_in_vllm, tiny_model_dir, monkeypatch):
    vllm = fresh_vllm_backend()

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("STAND_IN_VLLM_FAIL_ON", "1")
    with pytest.raises(ServiceError, match=r"GPUs \['1'\] failed: RuntimeError: CUDA out of memory \(stand-in\)"):
        vllm.load(str(tiny_model_dir), VLLMSettings(data_parallel_size=2), ".", seed=1)
    assert not multiprocessing.active_children()
    assert [line["call"] for line in engine_log(stand_in_vllm) if line["gpus"] == "0"] == ["start", "shutdown"]


def test_the_generating_stages_make_the_same_records_on_two_engines(
    stand_in_vllm, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    records = {}
    for engines in (1, 2):
        stand_in_vllm.unlink(missing_ok=True)
        data = tiny_config_data(tiny_model_dir, tmp_path, critique={"rounds": 1})
        data.update(backend="vllm", vllm={"data_parallel_size": engines})
        config, run_dir = tmp_path / f"config{engines}.yaml", tmp_path / f"run{engines}"
        config.write_text(yaml.safe_dump(data))
        assert main(["run", str(config), "--run-dir", str(run_dir), "--stages", "critique"]) == 0
        records[engines] = read_records(RunDir(run_dir).path("critiques"))
    assert records[2] == records[1] and len(records[1]) == 7  # 5 red-team critiques, 2 helpful samples
    assert {line["gpus"] for line in engine_log(stand_in_vllm) if line["call"] == "generate"} == {"0", "1"}
    assert not multiprocessing.active_children()
