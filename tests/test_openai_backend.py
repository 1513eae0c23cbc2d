"""The `openai` back end against a small fake OpenAI-compatible server on 127.0.0.1.

The fake server runs in a background thread (stdlib ThreadingHTTPServer on port 0) and records
every request; tests script its answers (status, headers, body, delay) one request at a time.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from constitutional.backends.base import SamplingParams
from constitutional.backends.openai import OpenAIBackend, _sum_span_logprobs, load
from constitutional.backends.settings import OpenAISettings
from constitutional.errors import UserError

# Fake tokeniser: a word with its leading space, or one other character with its leading space.
TOKEN_PATTERN = re.compile(r"\s?[A-Za-z]+|\s?\S|\s")
# Log-probs of the option tokens; every other echoed token gets DEFAULT_LOGPROB.
TOKEN_LOGPROBS = {" (": -0.3, "A": -0.7, "B": -1.9, ")": -0.05}
DEFAULT_LOGPROB = -1.0
GENERATED_LOGPROB = -99.0  # the one generated token of a scoring request: must never be counted


@dataclass
class Scripted:
    """One scripted answer of the fake server."""

    status: int = 200
    body: Any = None  # None: the default completions answer
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class ServerState:
    """What the fake server answers and what it saw."""

    script: list[Scripted] = field(default_factory=list)  # consumed first, in order
    delay_s: Callable[[dict], float] = lambda body: 0.0  # extra delay of default answers
    text_for: Callable[[dict], str] = lambda body: f"<{body['prompt']}|{body.get('seed')}>"
    with_logprobs: bool = True
    bodies: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def echo_logprobs(text: str) -> dict[str, Any]:
    """Echo log-probs of `text` plus one generated token, in the OpenAI completions format."""
    tokens = TOKEN_PATTERN.findall(text)
    assert "".join(tokens) == text
    offsets, values, position = [], [], 0
    for index, token in enumerate(tokens):
        offsets.append(position)
        # The first token has no context, so servers give it no log-prob.
        values.append(None if index == 0 else TOKEN_LOGPROBS.get(token, DEFAULT_LOGPROB))
        position += len(token)
    return {
        "tokens": tokens + [" X"],
        "text_offset": offsets + [len(text)],
        "token_logprobs": values + [GENERATED_LOGPROB],
        "top_logprobs": None,
    }


def default_answer(state: ServerState, body: dict) -> dict[str, Any]:
    """A completions response: echo with log-probs for scoring requests, else generated text."""
    if body.get("echo"):
        logprobs = echo_logprobs(body["prompt"]) if state.with_logprobs else None
        return {"choices": [{"text": body["prompt"] + " X", "logprobs": logprobs, "index": 0}]}
    return {"choices": [{"text": state.text_for(body), "index": 0, "finish_reason": "length"}]}


def make_handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `state`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.bodies.append(body)
                state.headers.append(dict(self.headers))
                scripted = state.script.pop(0) if state.script else Scripted(delay_s=state.delay_s(body))
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                time.sleep(scripted.delay_s)
                answer = scripted.body if scripted.body is not None else default_answer(state, body)
                self._send(scripted.status, scripted.headers, answer)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and hung up: expected in the timeout test
            finally:
                with state.lock:
                    state.in_flight -= 1

        def _send(self, status: int, headers: dict[str, str], answer: Any) -> None:
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[str, ServerState]]:
    """A fake server on a free loopback port; yields (base_url, state)."""
    state = ServerState()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def make_backend(url: str, **overrides: Any) -> OpenAIBackend:
    """A backend with fast retries, for tests."""
    settings = dict(model="test-model", base_url=url, max_retries=3, backoff_initial_s=0.01, backoff_max_s=0.05)
    settings.update(overrides)
    return OpenAIBackend(**settings)


# ------------------------------------------------------------------------------------- generate


def test_generate_sends_request_and_returns_results_in_order(server):
    url, state = server
    # Later prompts answer first, so out-of-order completion would show.
    state.delay_s = lambda body: 0.05 * (5 - int(body["prompt"][1:]))
    prompts = [f"p{i}" for i in range(6)]
    backend = make_backend(url, max_concurrency=6)
    params = SamplingParams(max_new_tokens=17, temperature=0.7, top_p=0.9, stop=("a", "b", "c", "d", "e"))
    try:
        texts = backend.generate(prompts, params, seeds=[10, 11, 12, 13, 14, 15])
    finally:
        backend.close()
    assert texts == [f"<p{i}|{10 + i}>" for i in range(6)]
    body = next(b for b in state.bodies if b["prompt"] == "p2")
    assert body["model"] == "test-model"
    assert body["max_tokens"] == 17
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9
    assert body["seed"] == 12
    assert body["stop"] == ["a", "b", "c", "d"]  # the API accepts at most 4
    assert "min_tokens" not in body and "echo" not in body


def test_generate_cuts_every_stop_client_side_and_sends_min_tokens(server):
    url, state = server
    # A real server cuts at the 4 stops it was sent; the fake returns the 5th, which only we know.
    state.text_for = lambda body: "keep this STOP5 drop this"
    backend = make_backend(url)
    params = SamplingParams(stop=("S1", "S2", "S3", "S4", "STOP5"), min_new_tokens=3)
    try:
        texts = backend.generate(["x", "y"], params)
    finally:
        backend.close()
    assert texts == ["keep this ", "keep this "]
    assert [body["seed"] for body in state.bodies] == [0, 0]  # default seed
    assert all(body["min_tokens"] == 3 for body in state.bodies)


def test_generate_rejects_wrong_number_of_seeds(server):
    url, _ = server
    backend = make_backend(url)
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        backend.generate(["x"], SamplingParams(), seeds=[1, 2])
    backend.close()


# ------------------------------------------------------------------------------------- scoring


def test_score_options_sums_echoed_option_logprobs(server):
    url, state = server
    backend = make_backend(url)
    prompts = ["Which is better? Answer:", "Pick one:"]
    try:
        scores = backend.score_options(prompts, [" (A)", " (B)"])
    finally:
        backend.close()
    # " (A)" is tokenised " (", "A", ")"; the generated token (-99) is not counted.
    assert scores == [[pytest.approx(-1.05), pytest.approx(-2.25)]] * 2
    assert len(state.bodies) == 4
    body = state.bodies[0]
    assert body["echo"] is True and body["logprobs"] == 1 and body["max_tokens"] == 1
    assert body["temperature"] == 0.0
    assert sorted(b["prompt"] for b in state.bodies) == sorted(p + o for p in prompts for o in [" (A)", " (B)"])


def test_score_options_includes_a_token_that_straddles_the_boundary():
    # Echoed "Q: (A)" tokenised as "Q", ": (", "A", ")" with prompt "Q:" - ": (" straddles it.
    logprobs = {"text_offset": [0, 1, 4, 5, 6], "token_logprobs": [None, -0.5, -0.7, -0.1, -99.0]}
    assert _sum_span_logprobs(logprobs, start=2, end=6, base_url="u") == pytest.approx(-1.3)


def test_score_options_without_logprobs_says_what_the_server_must_support(server):
    url, state = server
    state.with_logprobs = False
    backend = make_backend(url)
    with pytest.raises(RuntimeError, match="echo.*logprobs.*vLLM"):
        backend.score_options(["Pick one:"], [" (A)", " (B)"])
    backend.close()


# ------------------------------------------------------------------------------------- retries


def test_retries_500_then_succeeds(server, caplog):
    url, state = server
    state.script = [Scripted(500, {"error": {"message": "overloaded"}})] * 2
    backend = make_backend(url)
    with caplog.at_level(logging.WARNING, logger="constitutional.backends.openai"):
        assert backend.generate(["x"], SamplingParams()) == ["<x|0>"]
    backend.close()
    assert len(state.bodies) == 3
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert "overloaded" in caplog.text


def test_retries_429_honouring_retry_after(server):
    url, state = server
    state.script = [Scripted(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})]
    # A backoff of 10 s would make this test slow: passing fast shows Retry-After: 0 was used.
    backend = make_backend(url, backoff_initial_s=10.0, backoff_max_s=10.0)
    started = time.monotonic()
    assert backend.generate(["x"], SamplingParams()) == ["<x|0>"]
    backend.close()
    assert time.monotonic() - started < 2.0
    assert len(state.bodies) == 2


def test_retries_after_a_timeout(server):
    url, state = server
    state.script = [Scripted(200, delay_s=0.5)]
    backend = make_backend(url, timeout_s=0.2)
    assert backend.generate(["x"], SamplingParams()) == ["<x|0>"]
    backend.close()
    assert len(state.bodies) == 2


def test_gives_up_after_max_retries(server):
    url, state = server
    state.script = [Scripted(503, {"error": {"message": "down for maintenance"}})] * 10
    backend = make_backend(url, max_retries=2)
    with pytest.raises(RuntimeError, match=r"/v1/completions failed after 3 attempts.*503.*maintenance"):
        backend.generate(["x"], SamplingParams())
    backend.close()
    assert len(state.bodies) == 3


def test_connection_errors_are_retried_then_reported():
    # Nothing listens on this loopback port once the socket is closed.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = make_backend(f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(RuntimeError, match="after 2 attempts.*ConnectError"):
        backend.generate(["x"], SamplingParams())
    backend.close()


def test_client_errors_are_not_retried(server):
    url, state = server
    state.script = [Scripted(400, {"error": {"message": "prompt is too long " + "x" * 1000}})]
    backend = make_backend(url)
    with pytest.raises(UserError, match="HTTP 400: prompt is too long") as error:
        backend.generate(["x"], SamplingParams())
    backend.close()
    assert len(state.bodies) == 1
    message = str(error.value)
    assert "\n" not in message and len(message) < 500  # one line, server text truncated


def test_a_failure_cancels_the_queued_requests(server):
    url, state = server
    state.script = [Scripted(404, {"error": {"message": "no such model"}})] + [Scripted(200, delay_s=0.05)] * 20
    backend = make_backend(url, max_concurrency=2)
    with pytest.raises(UserError, match="no such model"):
        backend.generate([f"p{i}" for i in range(20)], SamplingParams())
    backend.close()
    assert len(state.bodies) < 20


# ------------------------------------------------------------------------------------- concurrency


def test_concurrency_is_bounded(server):
    url, state = server
    state.delay_s = lambda body: 0.1
    backend = make_backend(url, max_concurrency=2)
    try:
        texts = backend.generate([f"p{i}" for i in range(6)], SamplingParams())
    finally:
        backend.close()
    assert texts == [f"<p{i}|0>" for i in range(6)]
    assert state.max_in_flight == 2  # concurrent, but never more than allowed


# ------------------------------------------------------------------------------------- key, load, imports


def test_api_key_is_sent_but_never_shown(server, monkeypatch, caplog):
    url, state = server
    key = "sk-test-secret-123"
    monkeypatch.setenv("CAI_TEST_KEY", key)
    settings = OpenAISettings(base_url=url, api_key_env="CAI_TEST_KEY", backoff_initial_s=0.01)
    backend = load("test-model", settings, ".", 0)
    # Servers sometimes quote the key they rejected: it must be masked in logs and errors.
    state.script = [
        Scripted(500, {"error": {"message": f"bad key {key}"}}),
        Scripted(200),
        Scripted(401, {"error": {"message": f"Incorrect API key provided: {key}"}}),
    ]
    with caplog.at_level(logging.WARNING, logger="constitutional.backends.openai"):
        backend.generate(["x"], SamplingParams())
        with pytest.raises(UserError) as error:
            backend.generate(["x"], SamplingParams())
    backend.close()
    assert state.headers[0]["Authorization"] == f"Bearer {key}"
    assert key not in repr(backend) and key not in str(error.value) and key not in caplog.text
    assert "***" in str(error.value)


def test_no_key_means_no_authorization_header(server, monkeypatch):
    url, state = server
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend = load("test-model", OpenAISettings(base_url=url), ".", 0)
    backend.generate(["x"], SamplingParams())
    backend.close()
    assert "Authorization" not in state.headers[0]


def test_load_builds_from_config(server, monkeypatch):
    url, _ = server
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    settings = OpenAISettings(base_url=url + "/", max_concurrency=3, max_retries=2)
    backend = load("my-model", settings, ".", 0)
    backend.close()
    assert isinstance(backend, OpenAIBackend)
    assert backend.model_id == f"openai:{url}:my-model"
    assert backend.max_concurrency == 3 and backend.max_retries == 2


def test_importing_the_package_does_not_import_httpx():
    code = "import constitutional, constitutional.backends, sys; print('httpx' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"
