"""Against a real OpenAI-compatible server: llama.cpp's (llama-cpp-python) serving the embedded GGUF.

The server answers `echo` but computes the 262k-vocabulary logits at every prompt position (minutes
per feedback prompt on 2 cores), so option scoring is configured as `top_logprobs`.
`critique` generates through it; `feedback` labels real HH-RLHF comparisons through it, and the
labels are compared with the `transformers` back end's on the same weights.

Slow (marker `slow`, so not in `make test`: about 11 minutes on 2 busy cores, most of it the served
labels) and needs llama-cpp-python with its `server` extra; without it the test skips with one line.
`.ci/run` installs it after `make test` and runs this test. It builds from source, about 11 minutes
on 2 cores with .ci/run's flags (pip keeps the wheel, so only the first install pays):

    export CMAKE_ARGS='-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF -DGGML_BLAS=OFF -DGGML_CCACHE=OFF'
    .venv/bin/pip install 'llama-cpp-python[server]==0.3.36'
    .venv/bin/pytest -m slow tests/test_real_server.py
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from constitutional.config import config_from_dict
from constitutional.pipeline import run_pipeline
from constitutional.records import append_records, read_records
from constitutional.rundir import RunDir
from constitutional.sources import load_preference_pairs

from conftest import SHARED_DATA

pytestmark = pytest.mark.slow

COMPARISONS = 24
# The same weights, two computations: llama.cpp's quantised kernels (activations quantised for the
# matrix products) read the option letters' log-probs from the first answer tokens; transformers
# runs the dequantised weights in fp32 and sums the log-probs of each whole option. Measured here on
# 24 comparisons (2026-11-29): mean |difference| 0.018, max 0.051. Stated tolerances:
TOLERANCE = 0.10  # on each soft label
MEAN_TOLERANCE = 0.03  # on the mean over the comparisons


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] not installed (see module docstring)")
    from constitutional.models import embedded_gguf_path

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(embedded_gguf_path()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "4096",
        "--model_alias",
        "embedded-gguf",
    ]
    # The server logs a lot (100+ kB while loading): to a file, never to a pipe nobody drains.
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    log_file = log_path.open("w")
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"llama.cpp server exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        else:
            pytest.fail("llama.cpp server did not start within 180 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log_file.close()


def server_config(url: str, tmp_path: Path, **sections) -> object:
    served = {"name": "embedded-gguf", "backend": "openai", "prompt_format": "plain"}
    data = {
        "seed": 0,
        "models": {"helpful": served, "feedback": served},
        "data": {"max_red_team": 4, "max_helpful": 1},
        # Echo works on this server but computes full-vocabulary logits at every prompt position
        # (minutes per feedback prompt on 2 cores): score from the first answer tokens instead.
        "openai": {
            "base_url": url,
            "max_concurrency": 1,
            "timeout_s": 600,
            "max_retries": 1,
            "scoring": "top_logprobs",
        },
        "critique": {"rounds": 1, "max_new_tokens": 32, "num_fewshot": 1},
        "feedback": {"num_fewshot": 1},
        **sections,
    }
    return config_from_dict(data, base_dir=str(tmp_path))


def hh_pairs(count: int) -> list[dict]:
    pairs = load_preference_pairs(str(SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"), limit=count)
    return [
        {
            "id": pair["id"],
            "prompt": pair["prompt"],
            "response_a": pair["chosen"],
            "response_b": pair["rejected"],
            **({"history": [{"role": r, "text": t} for r, t in pair["history"]]} if pair["history"] else {}),
        }
        for pair in pairs
    ]


def test_critique_and_feedback_through_llama_cpp_agree_with_transformers(llama_server, tmp_path):
    # Generation: the critique stage, 4 red-team prompts, 1 round, through the server.
    config = server_config(llama_server, tmp_path)
    run = run_pipeline(config, tmp_path / "served", ["critique"])
    records = read_records(run.path("critiques"))
    assert len(records) == 5 and sum(bool(record["initial_response"]) for record in records) >= 4
    # Labels: the same HH-RLHF comparisons, through the server and in-process.
    pairs = hh_pairs(COMPARISONS)
    labels = {}
    for name, backend in (("served", "openai"), ("local", "transformers")):
        target = RunDir(tmp_path / f"labels-{name}")
        append_records(target.path("pairs"), pairs)
        models = {"feedback": {"name": "embedded-gguf" if backend == "openai" else "embedded", "backend": backend}}
        run_pipeline(server_config(llama_server, tmp_path, models=models), target.root, ["feedback"])
        labels[name] = {label["id"]: label for label in read_records(target.path("ai_labels"))}
        if backend == "openai":
            assert target.stage_entry("feedback")["counts"]["scoring_methods"] == ["top_logprobs"]
    differences = [abs(labels["served"][key]["p_a"] - labels["local"][key]["p_a"]) for key in labels["local"]]
    # Where the in-process label leans clearly one way, the served one leans the same way.
    clear = [key for key in labels["local"] if abs(labels["local"][key]["p_a"] - 0.5) > TOLERANCE]
    agree = sum((labels["served"][key]["p_a"] > 0.5) == (labels["local"][key]["p_a"] > 0.5) for key in clear)
    report = {
        "comparisons": len(differences),
        "max_abs_diff": round(max(differences), 4),
        "mean_abs_diff": round(sum(differences) / len(differences), 4),
        "clear_labels": len(clear),
        "clear_labels_same_side": agree,
    }
    (tmp_path / "agreement.json").write_text(json.dumps(report))
    print("llama.cpp vs transformers labels:", report)
    assert report["max_abs_diff"] <= TOLERANCE and report["mean_abs_diff"] <= MEAN_TOLERANCE, report
    assert agree == len(clear), report
