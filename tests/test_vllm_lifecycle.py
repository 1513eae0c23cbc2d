"""vLLM's lifecycle (issue 19, item 2): one engine at a time, none left when the run ends.

Each stage opens its model and closes it when it ends, on an error too (`chunks.append_in_chunks`).
A vLLM engine claims `vllm.gpu_memory_utilization` of the GPU, so one left running would make the
next stage's engine fail to start. vLLM is not installed here: a stand-in `vllm` module is put in
`sys.modules` whose `LLM` counts the engines alive (up in `__init__`, down when its shutdown path
runs or it is deleted). Like vLLM's, it sits in a reference cycle and, as vLLM does once its engine
is up, it moves every live object out of the collector's reach (`gc.freeze()`), so the collections
between stages (`memory.release`) cannot free it: an engine nobody shuts down stays alive. Real
stages run back to back through `cai run` with `backend: vllm`; a real tokenizer (the tiny model's)
backs `get_tokenizer()`.
"""

from __future__ import annotations

import gc
import importlib
import logging
import shutil
import sys
import types
import weakref
import zlib
from types import SimpleNamespace

import pytest
import yaml
from transformers import AutoTokenizer

from constitutional.cli import main
from constitutional.rundir import RunDir

from conftest import tiny_config_data

STAGES = "critique,pairs,feedback"


class CountingLLM:
    """Stands in for `vllm.LLM`: counts live engines and answers the way vLLM's outputs are shaped.

    `generate` returns objects with `.outputs[0].text` (varied by seed, so seeded pairs differ) and
    `.prompt_logprobs[t][token_id].logprob`. The shutdown path is V1's
    `llm.llm_engine.engine_core.shutdown()`, which holds the engine: a reference cycle, as in vLLM.
    """

    alive = 0
    seen: list[int] = []  # the live count each new engine found, itself included
    fail_generate = False  # set by a test: generation raises, as a CUDA error would
    freezes = True  # moves every live object out of the collector's reach, as vLLM's engine start does

    def __init__(self, model: str, **kwargs):
        CountingLLM.alive += 1
        CountingLLM.seen.append(CountingLLM.alive)
        self.live = True
        self.shutdowns = 0
        self.kwargs = kwargs
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))
        if self.freezes:
            gc.freeze()  # as vLLM does once its engine is up: the collector never reaches the engine again

    def _shutdown(self, timeout: float | None = None) -> None:
        self.shutdowns += 1
        self._release()

    def _release(self) -> None:
        if self.live:
            self.live = False
            CountingLLM.alive -= 1

    def __del__(self):
        self._release()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, requests, params, use_tqdm=True):
        assert self.live, "a shut-down engine was asked to generate"
        if CountingLLM.fail_generate:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        per_request = params if isinstance(params, list) else [params] * len(requests)
        outputs = []
        for request, param in zip(requests, per_request):
            ids = request["prompt_token_ids"]
            text = f" Answer {zlib.crc32(repr((ids, getattr(param, 'seed', None))).encode()) % 1000}."
            # vLLM's prompt log-probs: None for the first token, then {token id: Logprob} per token read.
            logprobs = [None] + [{token: SimpleNamespace(logprob=-0.1 - token % 7 / 7)} for token in ids[1:]]
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(text=text)], prompt_logprobs=logprobs))
        return outputs


class NoShutdownLLM(CountingLLM):
    """An engine of a vLLM with neither `LLM.shutdown` nor `llm_engine.engine_core`: only deletion frees it."""

    freezes = False  # an engine that only a collection can free is not frozen (else nothing could)

    def __init__(self, model: str, **kwargs):
        super().__init__(model, **kwargs)
        del self.llm_engine
        self.cycle = self  # still in a cycle: only a collection frees it


class PublicShutdownLLM(CountingLLM):
    """An engine of a vLLM with a public `LLM.shutdown()` (preferred over the engine core's)."""

    def shutdown(self) -> None:
        self.public_shutdowns = getattr(self, "public_shutdowns", 0) + 1
        self._release()

    def _shutdown(self, timeout: float | None = None) -> None:
        raise AssertionError("the engine core was shut down although LLM.shutdown() exists")


class FailingShutdownLLM(CountingLLM):
    """An engine whose shutdown raises: close must still drop it and not raise."""

    freezes = False

    def _shutdown(self, timeout: float | None = None) -> None:
        raise RuntimeError("engine core already dead")


@pytest.fixture
def fake_vllm(monkeypatch):
    """`constitutional.backends.vllm` imported against a stand-in `vllm` package whose `LLM` counts engines."""
    fake = types.ModuleType("vllm")
    fake.LLM = CountingLLM
    fake.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)
    monkeypatch.setattr(CountingLLM, "alive", 0)
    monkeypatch.setattr(CountingLLM, "seen", [])
    monkeypatch.setattr(CountingLLM, "fail_generate", False)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.delitem(sys.modules, "constitutional.backends.vllm", raising=False)
    yield fake
    gc.unfreeze()  # what an engine froze goes back to the collector
    # Forget the module bound to the stand-in, so later tests see the real import (or its absence).
    sys.modules.pop("constitutional.backends.vllm", None)


@pytest.fixture
def gc_frozen():
    """No automatic garbage collection (vLLM freezes its engine's objects): only an explicit collect frees a cycle."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


@pytest.fixture
def vllm_run(tmp_path, tiny_model_dir):
    """A config serving every model with `vllm`, and a run directory holding a hand-placed SL-CAI model."""
    data = tiny_config_data(tiny_model_dir, tmp_path, critique={"rounds": 1}, pairs={"chunk_size": 1})
    data["backend"] = "vllm"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model_dir, RunDir(run_dir).path("sl_cai"))
    return config, run_dir


def run_stages(config, run_dir, capsys) -> tuple[int, str]:
    code = main(["run", str(config), "--run-dir", str(run_dir), "--stages", STAGES])
    return code, capsys.readouterr().err.strip()


def test_stages_back_to_back_hold_one_engine_at_a_time(fake_vllm, gc_frozen, vllm_run, capsys):
    config, run_dir = vllm_run
    code, err = run_stages(config, run_dir, capsys)
    assert code == 0, err
    for output in ("data/critiques.jsonl", "data/pairs.jsonl", "data/ai_labels.jsonl"):
        assert (run_dir / output).exists(), output
    # One engine per stage: critique (the helpful model), pairs (SL-CAI), feedback (the feedback model).
    assert len(CountingLLM.seen) == 3, CountingLLM.seen
    assert max(CountingLLM.seen) == 1, f"engines alive as each one started: {CountingLLM.seen}"
    assert CountingLLM.alive == 0, "an engine is still alive after the run"


def test_a_stage_that_fails_still_frees_its_engine(fake_vllm, gc_frozen, vllm_run, capsys):
    config, run_dir = vllm_run
    CountingLLM.fail_generate = True
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_stages(config, run_dir, capsys)
    assert CountingLLM.seen == [1]  # critique's engine, the one that failed
    assert CountingLLM.alive == 0, "the failed stage left its engine alive"


@pytest.fixture
def module(fake_vllm):
    return importlib.import_module("constitutional.backends.vllm")


def test_close_is_idempotent(module, tiny_model_dir):
    engine = CountingLLM(str(tiny_model_dir))
    backend = module.VLLMBackend(engine, "vllm:test")
    backend.close()
    assert engine.shutdowns == 1 and not engine.live and CountingLLM.alive == 0
    assert backend.engine is None  # the backend holds the engine no longer
    backend.close()  # nothing left to do
    assert engine.shutdowns == 1 and CountingLLM.alive == 0


def test_public_shutdown_is_preferred(module, tiny_model_dir):
    engine = PublicShutdownLLM(str(tiny_model_dir))
    backend = module.VLLMBackend(engine, "vllm:test")
    backend.close()
    assert engine.public_shutdowns == 1 and CountingLLM.alive == 0


def test_close_tolerates_an_engine_without_shutdown_methods(module, tiny_model_dir, gc_frozen):
    engine = NoShutdownLLM(str(tiny_model_dir))
    gone = weakref.ref(engine)
    backend = module.VLLMBackend(engine, "vllm:test")
    del engine
    backend.close()  # no AttributeError: the reference is dropped and the cycle collected
    assert gone() is None and CountingLLM.alive == 0
    backend.close()


def test_close_survives_a_failing_shutdown(module, tiny_model_dir, gc_frozen, caplog):
    engine = FailingShutdownLLM(str(tiny_model_dir))
    gone = weakref.ref(engine)
    backend = module.VLLMBackend(engine, "vllm:test")
    del engine
    with caplog.at_level(logging.WARNING, logger="constitutional.backends.vllm"):
        backend.close()
    assert "engine core already dead" in caplog.text
    assert gone() is None and CountingLLM.alive == 0


def test_an_engine_whose_backend_cannot_be_built_is_shut_down(module, fake_vllm, tiny_model_dir, monkeypatch):
    class NoTokenizerLLM(CountingLLM):
        def get_tokenizer(self):
            raise RuntimeError("skip_tokenizer_init is set")

    monkeypatch.setattr(fake_vllm, "LLM", NoTokenizerLLM)
    from constitutional.backends.settings import VLLMSettings

    with pytest.raises(RuntimeError, match="skip_tokenizer_init"):
        module.load(str(tiny_model_dir), VLLMSettings(), str(tiny_model_dir), seed=0)
    assert CountingLLM.seen == [1] and CountingLLM.alive == 0
