"""The `openai` back end against a small fake OpenAI-compatible server on 127.0.0.1.

The fake server runs in a background thread (stdlib ThreadingHTTPServer on port 0) and records
every request; tests script its answers (status, headers, body, delay) one request at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
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

from constitutional.backends.answers import echoed_option_logprob, option_logprobs_from_top
from constitutional.backends.base import SamplingParams
from constitutional.backends.openai import OpenAIBackend, load
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
    when: Callable[[dict], bool] | None = None  # answers only a request this holds for (None: the next one)


@dataclass
class ServerState:
    """What the fake server answers and what it saw."""

    script: list[Scripted] = field(default_factory=list)  # consumed first, in order
    delay_s: Callable[[dict], float] = lambda body: 0.0  # extra delay of default answers
    text_for: Callable[[dict], str] = lambda body: f"<{body['prompt']}|{body.get('seed')}>"
    with_logprobs: bool = True  # echoed prompt log-probs
    failing: bool = False  # answer every request with HTTP 500
    # Top-k log-probs of the answer tokens, per position: (greedy token, {token: log-prob}); None: not offered.
    top: list[tuple[str, dict[str, float]]] | Callable[[dict], list] | None = None
    bodies: list[dict] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
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


def default_answer(state: ServerState, body: dict, path: str) -> dict[str, Any]:
    """A completions or chat response: echo or top-k log-probs for scoring requests, else generated text."""
    top = state.top(body) if callable(state.top) else state.top
    if path.endswith("/chat/completions"):
        content = None
        if body.get("logprobs") and top:
            content = [{"token": greedy, "logprob": tops.get(greedy, -9.0),
                        "top_logprobs": [{"token": t, "logprob": v} for t, v in tops.items()]}
                       for greedy, tops in top][: body["max_tokens"]]  # fmt: skip
        text = f"<chat:{json.dumps(body['messages'])}|{body.get('seed')}>"
        return {"choices": [{"message": {"role": "assistant", "content": text}, "logprobs": {"content": content},
                             "index": 0}]}  # fmt: skip
    if body.get("echo"):
        logprobs = echo_logprobs(body["prompt"]) if state.with_logprobs else None
        return {"choices": [{"text": body["prompt"] + " X", "logprobs": logprobs, "index": 0}]}
    if body.get("logprobs") and top:
        positions = top[: body["max_tokens"]]
        logprobs = {"tokens": [g for g, _ in positions], "top_logprobs": [tops for _, tops in positions]}
        return {"choices": [{"text": "".join(g for g, _ in positions), "logprobs": logprobs, "index": 0}]}
    return {"choices": [{"text": state.text_for(body), "index": 0, "finish_reason": "length"}]}


def make_handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `state`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.bodies.append(body)
                state.paths.append(self.path)
                state.headers.append(dict(self.headers))
                if state.script and (state.script[0].when is None or state.script[0].when(body)):
                    scripted = state.script.pop(0)
                else:
                    scripted = Scripted(delay_s=state.delay_s(body))
                if state.failing:
                    scripted = Scripted(status=500, body={"error": {"message": "down"}})
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                time.sleep(scripted.delay_s)
                answer = scripted.body if scripted.body is not None else default_answer(state, body, self.path)
            finally:
                # Done before the answer leaves: once the client has it, it may send the next
                # request on the freed slot while this thread is still finishing the write.
                with state.lock:
                    state.in_flight -= 1
            # The client may have timed out and hung up: expected in the timeout test.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._send(scripted.status, scripted.headers, answer)

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
    with running_server() as served:
        yield served


@pytest.fixture
def second_server() -> Iterator[tuple[str, ServerState]]:
    """Another one, for fleets."""
    with running_server() as served:
        yield served


@contextlib.contextmanager
def running_server() -> Iterator[tuple[str, ServerState]]:
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
    backend = make_backend(url, scoring="echo")
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
    # Echoed "Q: (A)" tokenised as "Q", ": (", "A", ")", then the generated " X": ": (" straddles the prompt's end.
    logprobs = {"tokens": ["Q", ": (", "A", ")", " X"], "token_logprobs": [None, -0.5, -0.7, -0.1, -99.0]}
    assert echoed_option_logprob(logprobs, " (A)", base_url="u") == pytest.approx(-1.3)


def vllm_echo(prompt: str, option: str, bos: str = "<bos>") -> dict[str, Any]:
    """Echo log-probs as vLLM lays them out: a BOS token first (log-prob None), whose string is not in the
    echoed text, and offsets that add up decoded token lengths from it, so every offset is len(bos) too far."""
    tokens = [bos] + TOKEN_PATTERN.findall(prompt + option) + [" X"]
    offsets = [sum(len(token) for token in tokens[:index]) for index in range(len(tokens))]
    values = [None] + [TOKEN_LOGPROBS.get(token, DEFAULT_LOGPROB) for token in tokens[1:-1]] + [GENERATED_LOGPROB]
    return {"tokens": tokens, "text_offset": offsets, "token_logprobs": values, "top_logprobs": None}


@pytest.mark.parametrize("bos", ["<s>", "<bos>", "<|begin_of_text|>"])
def test_echo_scoring_reads_the_option_despite_the_bos_shift_of_vllm_offsets(server, bos):
    """The option's tokens are found from the end, by their text: the offsets, shifted by the BOS string,
    would put the window on the prompt's last tokens (a tie for every comparison) or past a short prompt."""
    url, state = server
    state.script = [Scripted(body={"choices": [{"text": "Pick one:" + option + " X", "index": 0,
                                                "logprobs": vllm_echo("Pick one:", option, bos)}]})
                    for option in (" (A)", " (B)")]  # fmt: skip
    backend = make_backend(url, scoring="echo", max_concurrency=1)
    try:
        scores = backend.score_options(["Pick one:"], [" (A)", " (B)"])
    finally:
        backend.close()
    assert scores == [[pytest.approx(-1.05), pytest.approx(-2.25)]]
    # A prompt shorter than the BOS string: the shifted window would start past the text.
    assert echoed_option_logprob(vllm_echo("Q", " (A)", bos), " (A)", "u") == pytest.approx(-1.05)


def test_a_server_that_echoes_only_the_generated_token_is_not_taken_for_echo(server):
    """200 OK with the log-prob of the generated token alone: every option would score 0, a tie."""
    url, state = server
    only_generated = {"tokens": [" X"], "text_offset": [13], "token_logprobs": [-0.2], "top_logprobs": None}
    state.script = [Scripted(body={"choices": [{"text": " X", "logprobs": only_generated, "index": 0}]})]
    state.top = TOP
    backend = make_backend(url)  # auto: falls back to top_logprobs at once, without retrying echo
    backend.score_options(["Pick one:"], [" (A)", " (B)"])
    backend.close()
    assert backend.scoring_method == "top_logprobs"
    assert sum(bool(body.get("echo")) for body in state.bodies) == 1
    state.script = [Scripted(body={"choices": [{"text": " X", "logprobs": only_generated, "index": 0}]})]
    state.bodies = []
    backend = make_backend(url, scoring="echo", max_concurrency=1)
    with pytest.raises(UserError, match=rf"{re.escape(url)} does not echo .*openai\.scoring: top_logprobs"):
        backend.score_options(["Pick one:"], [" (A)", " (B)"])
    backend.close()
    assert len(state.bodies) == 1  # not retried (the same answer would come back), the queue dropped


def test_echoed_tokens_that_do_not_spell_the_option_are_refused_by_name():
    raw = {
        "tokens": ["<s>", "\u2581Pick", "\u2581(", "A", ")", "\u2581X"],
        "token_logprobs": [None, -1, -0.3, -0.7, -0.1, -9],
    }
    with pytest.raises(UserError, match=r"server at http://s/v1 echoed tokens that do not end with the option"):
        echoed_option_logprob(raw, " (A)", "http://s/v1")
    with pytest.raises(UserError, match="without their token strings"):
        echoed_option_logprob({"token_logprobs": [None, -1.0]}, " (A)", "http://s/v1")


def test_score_options_without_logprobs_says_what_the_server_must_support(server):
    url, state = server
    state.with_logprobs = False
    backend = make_backend(url, scoring="echo")
    with pytest.raises(RuntimeError, match="echo.*logprobs.*vLLM"):
        backend.score_options(["Pick one:"], [" (A)", " (B)"])
    backend.close()


# ------------------------------------------------------------------------------------- top_logprobs and chat

# The greedy answer " (", "A", ")" with the top-k alternatives the fake server reports at each position.
TOP = [(" (", {" (": -0.05, " The": -3.0}), ("A", {"A": -0.4, "B": -1.3, "C": -2.5}), (")", {")": -0.01})]


def test_auto_scoring_uses_echo_when_the_server_answers_it(server):
    url, state = server
    backend = make_backend(url)
    scores = backend.score_options(["Pick one:"], [" (A)", " (B)"])
    backend.close()
    assert backend.scoring_method == "echo" and scores == [[pytest.approx(-1.05), pytest.approx(-2.25)]]


def test_auto_scoring_is_not_misled_by_an_unreadable_answer(server):
    """A body that is not a JSON object while echo is probed is a transport accident: retried, and
    echo is still chosen. An answer without log-probs is a missing capability: not retried."""
    url, state = server
    state.script = [Scripted(body="half a docu")]  # JSON, but not an object
    backend = make_backend(url)
    backend.score_options(["Pick one:"], [" (A)", " (B)"])
    backend.close()
    assert backend.scoring_method == "echo"
    state.script, state.with_logprobs, state.top, state.bodies = [], False, TOP, []
    backend = make_backend(url)
    backend.score_options(["Pick one:"], [" (A)", " (B)"])
    backend.close()
    assert backend.scoring_method == "top_logprobs"
    # A missing capability: echo asked again at once (no backoff) until every try answered without it.
    assert sum(bool(body.get("echo")) for body in state.bodies) == backend.max_retries + 1


def test_top_logprobs_scoring_reads_where_the_options_part_ways(server):
    url, state = server
    state.with_logprobs, state.top = False, TOP  # like llama.cpp's server: no echoed prompt log-probs
    backend = make_backend(url)
    scores = backend.score_options(["Pick one:", "Which?"], [" (A)", " (B)"])
    backend.close()
    assert backend.scoring_method == "top_logprobs"
    # Read after "(": A -0.4, B -1.3 (the shared " (" is the same for both options and left out).
    assert scores == [[-0.4, -1.3], [-0.4, -1.3]]
    top_requests = [body for body in state.bodies if not body.get("echo")]
    assert len(top_requests) == 1 + 2  # the probe, then one request per prompt (not per option)
    assert top_requests[-1]["logprobs"] == 20 and top_requests[-1]["max_tokens"] == 4
    assert top_requests[-1]["temperature"] == 0.0
    assert sorted(body["prompt"] for body in top_requests[1:]) == ["Pick one:", "Which?"]  # sent concurrently


def test_an_option_missing_from_the_top_k_gets_the_lowest_listed_logprob(server):
    url, state = server
    state.top = [(" (", {" (": -0.05}), ("A", {"A": -0.4, "C": -2.5})]
    backend = make_backend(url, scoring="top_logprobs")
    assert backend.score_options(["Pick one:"], [" (A)", " (B)"]) == [[-0.4, -2.5]]
    backend.close()


def test_top_logprob_reading_of_other_answer_shapes():
    both = [" (A)", " (B)"]
    assert option_logprobs_from_top([("(A", {"(A": -0.3, "(B": -1.6})], both) == [-0.3, -1.6]
    assert option_logprobs_from_top([("A", {"A": -0.3, " B": -1.6})], both) == [-0.3, -1.6]  # "A" for "(A)"
    harm = [f" ({level})" for level in range(5)]
    assert option_logprobs_from_top([(" (", {" (": 0.0}), ("2", {"2": -0.2, "0": -1.0})], harm) == [
        -1.0, -1.0, -0.2, -1.0, -1.0,
    ]  # fmt: skip
    assert option_logprobs_from_top([("The", {"The": -0.1})], both) == [-0.1, -0.1]  # off-format: no match, a tie
    assert option_logprobs_from_top([("(", {"(": -0.1})], both) == [0.0, 0.0]  # never got there: a tie
    with pytest.raises(ValueError, match="differ"):
        option_logprobs_from_top(TOP, [" (A)", " (A) and more"])


def test_a_server_with_neither_echo_nor_top_logprobs_is_named(server):
    url, state = server
    state.with_logprobs = False
    backend = make_backend(url)
    with pytest.raises(UserError, match=f"the server at {re.escape(url)} answers neither.*echo.*top_logprobs"):
        backend.score_options(["Pick one:"], [" (A)", " (B)"])
    backend.close()


def run_with_judge_server(url, tiny_model_dir, tmp_path, capsys, **openai):
    """`cai run --stages critique,pairs,feedback` with the feedback model on the fake server.

    Returns:
        (exit code, stderr stripped, the run directory).
    """
    import yaml

    from constitutional.cli import main

    from conftest import tiny_config_data

    data = tiny_config_data(tiny_model_dir, tmp_path)
    data["models"]["feedback"] = {"name": "judge", "backend": "openai"}
    data["openai"] = {"base_url": url, "backoff_initial_s": 0.01, **openai}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    code = main(["run", str(config_path), "--run-dir", str(run_dir), "--stages", "critique,pairs,feedback"])
    return code, capsys.readouterr().err.strip(), run_dir


def test_a_judge_server_that_cannot_score_stops_the_run_before_any_work(server, tiny_model_dir, tmp_path, capsys):
    """`cai run` with critique first and a judge server that scores neither way: exit 2, one line, nothing written."""
    url, state = server
    state.with_logprobs = False  # no echo, and no top log-probs either (state.top is None)
    code, error, run_dir = run_with_judge_server(url, tiny_model_dir, tmp_path, capsys, max_retries=3)
    assert code == 2
    assert len(error.splitlines()) == 1, error
    assert f"models.feedback: the server at {url} answers neither" in error
    assert "echo" in error and "top_logprobs" in error
    assert not run_dir.exists()  # critique, which comes first, never started
    assert len(state.bodies) <= 2 * (3 + 1)  # one question, echo then top_logprobs, each asked max_retries + 1 times


def test_chat_endpoint_sends_messages_and_scores_from_chat_logprobs(server):
    url, state = server
    state.top = TOP
    backend = make_backend(url, endpoint="chat")
    prompt = backend.apply_chat_template([{"role": "user", "content": "Hi there"}])
    texts = backend.generate([prompt, "plain prompt"], SamplingParams(max_new_tokens=5), seeds=[3, 4])
    assert texts[0] == '<chat:[{"role": "user", "content": "Hi there"}]|3>'
    assert texts[1] == '<chat:[{"role": "user", "content": "plain prompt"}]|4>'  # a plain prompt: one user turn
    assert all(path == "/v1/chat/completions" for path in state.paths)
    assert backend.score_options([prompt], [" (A)", " (B)"]) == [[-0.4, -1.3]]
    assert backend.scoring_method == "top_logprobs"  # chat endpoints are never asked to echo
    assert state.bodies[-1]["logprobs"] is True and state.bodies[-1]["top_logprobs"] == 20
    backend.close()


def test_chat_and_echo_do_not_mix():
    with pytest.raises(UserError, match="openai.scoring: 'echo' needs openai.endpoint 'completions'"):
        OpenAISettings(endpoint="chat", scoring="echo").validate()


# ------------------------------------------------------------------------------------- retries


def test_retries_500_then_succeeds(server, caplog):
    url, state = server
    state.script = [Scripted(500, {"error": {"message": "overloaded"}})] * 2
    backend = make_backend(url)
    with caplog.at_level(logging.WARNING, logger="constitutional.backends.transport"):
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
    with caplog.at_level(logging.WARNING, logger="constitutional.backends.transport"):
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


def test_feedback_stage_labels_through_a_top_logprobs_server_and_records_the_method(server, tmp_path):
    from constitutional.config import config_from_dict
    from constitutional.pipeline import run_pipeline
    from constitutional.records import append_records, read_records
    from constitutional.rundir import RunDir

    url, state = server

    def prefers_yes(body: dict) -> list:
        """A judge that prefers the answer "Yes.", wherever it is listed."""
        yes_first = body["prompt"].rstrip().endswith("(A) Yes.\n(B) No.\nThe answer is:")
        a, b = (-0.4, -1.3) if yes_first else (-1.3, -0.4)
        return [(" (", {" (": -0.05}), ("A" if yes_first else "B", {"A": a, "B": b}), (")", {")": -0.01})]

    state.with_logprobs, state.top = False, prefers_yes  # a server without echo, as llama.cpp's
    run = RunDir(tmp_path / "run")
    pairs = [{"id": f"p{i}", "prompt": f"Question {i}?", "response_a": "Yes.", "response_b": "No."} for i in range(3)]
    append_records(run.path("pairs"), pairs)
    config = config_from_dict(
        {"models": {"feedback": {"name": "judge", "backend": "openai"}}, "openai": {"base_url": url, "max_retries": 0}}
    )
    run_pipeline(config, run.root, ["feedback"])
    labels = read_records(run.path("ai_labels"))
    # Both orders read "Yes." better by 0.9 nats: p_a = sigma(0.9) = 0.711 for A ("Yes.").
    assert [label["scoring_method"] for label in labels] == ["top_logprobs"] * 3
    assert all(label["p_a"] == pytest.approx(1 / (1 + math.exp(-0.9))) for label in labels)
    assert run.stage_entry("feedback")["counts"]["scoring_methods"] == ["top_logprobs"]


# ------------------------------------------------------------------------------------- fleets


def test_a_fleet_spreads_requests_with_per_server_concurrency(server, second_server):
    (url_a, state_a), (url_b, state_b) = server, second_server
    for state in (state_a, state_b):
        state.delay_s = lambda body: 0.05
    backend = make_backend([url_a, url_b], max_concurrency=2)
    prompts = [f"p{i}" for i in range(16)]
    texts = backend.generate(prompts, SamplingParams(max_new_tokens=4), seeds=list(range(16)))
    backend.close()
    assert texts == [f"<p{i}|{i}>" for i in range(16)]
    assert len(state_a.bodies) + len(state_b.bodies) == 16 and min(len(state_a.bodies), len(state_b.bodies)) >= 4
    assert max(state_a.max_in_flight, state_b.max_in_flight) <= 2  # per server
    assert backend.model_id == f"openai:{'|'.join(sorted([url_a, url_b]))}:test-model"


def test_a_failing_server_leaves_the_rotation_and_is_tried_again_later(server, second_server):
    (url_a, state_a), (url_b, state_b) = server, second_server
    state_a.failing = True
    backend = make_backend([url_a, url_b], max_concurrency=1, server_cooldown_s=0.5)
    params = SamplingParams(max_new_tokens=4)
    first = backend.generate([f"p{i}" for i in range(10)], params, seeds=[0] * 10)
    assert first == [f"<p{i}|0>" for i in range(10)]  # every request answered, by the healthy server
    assert len(state_a.bodies) <= 2 and len(state_b.bodies) == 10  # the failing one was taken out at once
    state_a.failing = False
    time.sleep(0.6)  # its cool-down is over: back in rotation
    backend.generate([f"q{i}" for i in range(6)], params, seeds=[0] * 6)
    backend.close()
    assert len(state_a.bodies) >= 3  # it answered again


def test_a_fleet_that_stays_down_fails_with_the_last_error(server, second_server):
    (url_a, state_a), (url_b, state_b) = server, second_server
    state_a.failing = state_b.failing = True
    backend = make_backend([url_a, url_b], max_retries=3, server_cooldown_s=0.01)
    with pytest.raises(RuntimeError, match="failed after 4 attempts; last error: .*HTTP 500: down"):
        backend.generate(["p"], SamplingParams(max_new_tokens=4))
    backend.close()
    assert len(state_a.bodies) + len(state_b.bodies) == 4 and state_a.bodies and state_b.bodies


# ------------------------------------------------------------------------------------- hosted limits


def openai_400(message: str, param: str | None = None) -> Scripted:
    """A 400 in OpenAI's error shape."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": "unsupported_parameter"}
    return Scripted(status=400, body={"error": error})


def test_a_chat_api_that_takes_max_completion_tokens_gets_it_from_then_on(server):
    url, state = server
    state.script = [openai_400("Unsupported parameter: 'max_tokens' is not supported with this model. "
                               "Use 'max_completion_tokens' instead.", "max_tokens")]  # fmt: skip
    backend = make_backend(url, endpoint="chat", max_concurrency=1)
    try:
        texts = backend.generate(["Hi", "Bye"], SamplingParams(max_new_tokens=7))
    finally:
        backend.close()
    assert len(texts) == 2 and all(text.startswith("<chat:") for text in texts)
    assert "max_tokens" in state.bodies[0] and "max_completion_tokens" not in state.bodies[0]
    assert all(body["max_completion_tokens"] == 7 and "max_tokens" not in body for body in state.bodies[1:])
    assert len(state.bodies) == 3  # the refused one once more, then the second prompt: no further tries


def test_legacy_completions_logprobs_limit_is_learnt_from_the_400(server):
    url, state = server
    state.script = [openai_400("Invalid value for 'logprobs': must be less than or equal to 5.", "logprobs")]
    state.top = TOP
    backend = make_backend(url, scoring="top_logprobs", top_logprobs=20, max_concurrency=1)
    try:
        scores = backend.score_options(["Pick one:", "Choose:"], [" (A)", " (B)"])
    finally:
        backend.close()
    assert [body["logprobs"] for body in state.bodies] == [20, 5, 5]
    assert scores[0][0] > scores[0][1]


@pytest.mark.parametrize(
    "message, advice",
    [
        ("Unsupported value: 'temperature' does not support 0.7 with this model. Only the default (1) value is "
         "supported.", "takes only its default sampling"),
        ("Unsupported parameter: 'logprobs' is not supported with this model.", "cannot score options"),
        ("The model `nope` does not exist", None),
    ],
)  # fmt: skip
def test_what_a_hosted_model_refuses_is_one_line_naming_the_server_not_a_retry(server, message, advice):
    url, state = server
    state.script = [openai_400(message)]
    backend = make_backend(url, endpoint="chat")
    with pytest.raises(UserError) as raised:
        backend.generate(["Hi"], SamplingParams(max_new_tokens=4, temperature=0.7))
    backend.close()
    text = str(raised.value)
    assert "\n" not in text and url in text and "HTTP 400" in text and message[:30] in text
    assert (advice in text) if advice else "(" not in text.split(message[:30])[-1]
    assert len(state.bodies) == 1


@pytest.mark.parametrize(
    "message, finish, expected",
    [
        ({"role": "assistant", "content": None, "refusal": "I can't help."}, "stop", "I can't help."),
        ({"role": "assistant", "content": None}, "length", ""),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}, "tool_calls", UserError),
    ],
)  # fmt: skip
def test_a_chat_answer_without_content_is_read_not_retried(server, message, finish, expected):
    url, state = server
    state.script = [Scripted(body={"choices": [{"index": 0, "message": message, "finish_reason": finish}]})]
    backend = make_backend(url, endpoint="chat")
    try:
        if expected is UserError:
            with pytest.raises(UserError, match="has no text .*tool_calls"):
                backend.generate(["Hi"], SamplingParams(max_new_tokens=4))
        else:
            assert backend.generate(["Hi"], SamplingParams(max_new_tokens=4)) == [expected]
    finally:
        backend.close()
    assert len(state.bodies) == 1


def test_a_500_saying_echo_is_not_supported_ends_the_probe_at_once(server):
    """llama.cpp's server answers echo with HTTP 500 "Only no echo is supported": a missing feature, not an
    outage. While probing it is not retried with backoff; `auto` moves on to top_logprobs."""
    url, state = server
    state.script = [Scripted(status=500, body={"error": {"code": 500, "message": "Only no echo is supported",
                                                         "type": "server_error"}})]  # fmt: skip
    state.top = TOP
    backend = make_backend(url, backoff_initial_s=5.0, backoff_max_s=5.0)  # a retry would take seconds
    started = time.monotonic()
    backend.score_options(["Pick one:"], [" (A)", " (B)"])
    backend.close()
    assert backend.scoring_method == "top_logprobs" and time.monotonic() - started < 2.0
    assert sum(bool(body.get("echo")) for body in state.bodies) == 1


def test_a_judge_server_whose_echo_cannot_be_read_stops_the_run_naming_url_and_setting(
    server, tiny_model_dir, tmp_path, capsys
):
    """`openai.scoring: echo` against a server that echoes no prompt log-probs: exit 2 before any stage writes."""
    url, state = server
    only_generated = {"tokens": [" X"], "text_offset": [13], "token_logprobs": [-0.2], "top_logprobs": None}
    state.script = [Scripted(body={"choices": [{"text": " X", "logprobs": only_generated, "index": 0}]})] * 3
    code, error, run_dir = run_with_judge_server(url, tiny_model_dir, tmp_path, capsys, scoring="echo", max_retries=3)
    assert code == 2
    assert len(error.splitlines()) == 1, error
    assert f"models.feedback: the server at {url} does not echo" in error and "openai.scoring: top_logprobs" in error
    assert not run_dir.exists()


def test_a_bug_in_our_reading_code_is_raised_as_itself_not_retried_as_a_flaky_server(server, monkeypatch):
    url, state = server

    def broken(*args, **kwargs):
        raise KeyError("a bug of ours")

    monkeypatch.setattr("constitutional.backends.openai.echoed_option_logprob", broken)
    backend = make_backend(url, scoring="echo", max_concurrency=1)
    with pytest.raises(KeyError, match="a bug of ours"):
        backend.score_options(["Pick one:"], [" (A)", " (B)"])
    backend.close()
    assert len(state.bodies) == 1


def test_top_logprobs_in_a_malformed_shape_are_a_malformed_answer_naming_the_server():
    from constitutional.backends.answers import MalformedAnswer, top_logprob_positions

    choice = {"logprobs": {"content": [{"token": "A", "top_logprobs": [{"token": "A", "logprob": "high"}]}]}}
    with pytest.raises(MalformedAnswer, match=r"http://s/v1 returned top log-probabilities in an unexpected shape"):
        top_logprob_positions(choice, "http://s/v1")


def test_a_judge_server_that_stays_down_is_a_service_failure_not_bad_input(server, tiny_model_dir, tmp_path, capsys):
    url, state = server
    state.failing = True  # every request: HTTP 500
    code, error, run_dir = run_with_judge_server(url, tiny_model_dir, tmp_path, capsys, max_retries=1,
                                                 backoff_max_s=0.01)  # fmt: skip
    assert code == 1
    assert len(error.splitlines()) == 1 and "failed after 2 attempts" in error and "HTTP 500" in error, error
    assert not run_dir.exists()


def test_a_batch_refused_at_once_for_max_tokens_learns_the_limit_in_every_thread(server):
    """Four requests in flight together all get the 400: each is sent again with max_completion_tokens."""
    url, state = server
    refusal = "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens'."
    state.script = [openai_400(refusal, "max_tokens") for _ in range(4)]
    for scripted in state.script:
        scripted.when = lambda body: "max_tokens" in body  # as the real API: only the old parameter is refused
    state.delay_s = lambda body: 0.05
    backend = make_backend(url, endpoint="chat", max_concurrency=4)
    try:
        texts = backend.generate([f"Hi {n}" for n in range(6)], SamplingParams(max_new_tokens=7))
    finally:
        backend.close()
    assert len(texts) == 6 and all(text.startswith("<chat:") for text in texts)
    assert all("max_completion_tokens" in body for body in state.bodies if "max_tokens" not in body)


def test_a_content_filtered_chat_answer_is_an_empty_answer_not_a_failed_stage(server):
    url, state = server
    message = {"role": "assistant", "content": None}
    state.script = [Scripted(body={"choices": [{"index": 0, "message": message, "finish_reason": "content_filter"}]})]
    backend = make_backend(url, endpoint="chat")
    try:
        assert backend.generate(["How do I pick a lock?"], SamplingParams(max_new_tokens=4)) == [""]
    finally:
        backend.close()


def test_a_fixed_echo_against_a_server_that_refuses_echo_is_one_line_at_once(server):
    """llama.cpp's 500 "Only no echo is supported" with `openai.scoring: echo`: not retried as an outage."""
    url, state = server
    state.script = [Scripted(status=500, body={"error": {"code": 500, "message": "Only no echo is supported",
                                                         "type": "server_error"}})]  # fmt: skip
    backend = make_backend(url, scoring="echo", max_concurrency=1, backoff_initial_s=5.0)
    with pytest.raises(UserError, match=r"Only no echo is supported \(set openai\.scoring: top_logprobs\)"):
        backend.score_options(["Pick one:"], [" (A)", " (B)"])
    backend.close()
    assert len(state.bodies) == 1
