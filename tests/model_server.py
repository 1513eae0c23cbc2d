"""A loopback OpenAI-compatible server backed by a real causal LM, answering in vLLM's or llama.cpp's layout.

The fake servers of `test_openai_backend.py` answer in a layout no real server has. This one runs a
real `transformers` model and its tokenizer (fp32, CPU) and writes its answers the way the two
servers the `openai` back end is used with write theirs, so that what the back end reads from them
is what it would read from the real thing:

- `vllm` (vllm/entrypoints/openai/completion/serving.py, `_create_completion_logprobs`): prompts are
  tokenised with the tokenizer's special tokens, so the echoed tokens start with the BOS where the
  tokenizer adds one; its log-prob and top log-probs are None (nothing to condition on) and its
  token string is the decoded BOS ("<s>", "<bos>"), which the echoed `text` (prompt + generated
  text) does not contain. Every token string is its id decoded alone (v1's prompt log-probs are
  detokenised one token at a time), and `text_offset` is the running sum of those strings' lengths
  from 0, so every offset after the BOS is shifted by len(BOS string) against the echoed text.
  `top_logprobs` is a {token string: log-prob} dict per position: the top k, then the position's own
  token when it is not among them (up to k + 1). Chat answers carry `logprobs.content`, a list of
  {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}. Errors are vLLM's ErrorResponse:
  {"error": {"message", "type": "BadRequestError", "param": null, "code": 400}}.
- `llamacpp` (llama.cpp's tools/server, `to_json_oaicompat`, `probs_vector_to_json`): log-probs of
  the generated tokens only, as `logprobs.content` = [{id, token, bytes, logprob, top_logprobs:
  [{id, token, bytes, logprob}]}] on both /v1/completions and /v1/chat/completions, `text` is the
  generated text only. Current builds refuse `echo: true` (`oaicompat_completion_params_parse`
  throws "Only no echo is supported", a std::runtime_error that its handler wrapper answers with
  HTTP 500 {"error": {"code": 500, "message": ..., "type": "server_error"}}); older builds, whose
  /v1/completions was plain /completion, ignored it: `llamacpp_echo="ignore"`. Errors are
  {"error": {"code", "message", "type": "invalid_request_error"}}.

Log-probs come from the forward passes that generate (BOS + prompt tokens, then each generated
token), a log_softmax over the whole vocabulary at every position a layout reports: every prompt
position for an echo, else the generated ones. Requests are answered one at a time (one model, one
lock), and every request body is recorded in `requests`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

LAYOUTS = ("vllm", "llamacpp")
# What a server answers a request with instead of a completion: a message (sent with HTTP 400), or
# (status, message).
Rejection = str | tuple[int, str] | None

VLLM_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
LLAMACPP_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                        500: "server_error", 501: "not_supported_error", 503: "unavailable_error"}  # fmt: skip
# vLLM clamps -inf to the most negative number JSON can carry the way OpenAI does.
VLLM_FLOOR = -9999.0
VLLM_MAX_LOGPROBS = 20  # vLLM's default --max-logprobs: a request for more is refused with a 400


class ServerError(Exception):
    """A request the server answers with an error status (in its layout's error body)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Completion:
    """One run of the model: the sequence, and the log-probabilities of the positions a layout reports."""

    prompt_ids: list[int]
    new_ids: list[int]
    text: str  # the generated text, cut before a stop string
    finish_reason: str
    # Row j is the log-softmax of the distribution that predicts token `first + j` of the sequence.
    logprobs: torch.Tensor
    first: int

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.new_ids

    def logprob(self, index: int) -> float:
        """The log-prob of token `index` of the sequence (index >= 1) given the tokens before it."""
        return float(self.logprobs[index - self.first, self.ids[index]])

    def top(self, index: int, k: int) -> list[tuple[int, float]]:
        """The k most likely (token id, log-prob) at position `index`, most likely first."""
        if k <= 0:
            return []
        values, token_ids = self.logprobs[index - self.first].topk(min(k, self.logprobs.shape[-1]))
        return list(zip(token_ids.tolist(), values.tolist()))


class ServedModel:
    """A causal LM and its tokenizer, run as an inference server runs them: fp32, CPU, no gradients."""

    def __init__(self, folder: str | Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.folder = Path(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.lock = threading.Lock()  # one request at a time on the one model
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos = set([eos] if isinstance(eos, int) else eos or [])

    def piece(self, token_id: int) -> str:
        """A token's string as both servers report it: the id decoded on its own, special tokens kept."""
        return self.tokenizer.decode([token_id])

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt tokens of a chat: the tokenizer's template (which holds any BOS), or a plain join."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.encode(text, special_tokens=False)
        # No template (the test models have none; a current vLLM would refuse such a chat with a 400).
        lines = [f"{message['role'].capitalize()}: {message['content']}" for message in messages]
        return self.encode("\n".join(lines) + "\nAssistant:")

    @torch.no_grad()
    def complete(self, prompt_ids: list[int], body: dict[str, Any], prompt_logprobs: bool = False) -> Completion:
        """Generate `max_tokens` tokens after `prompt_ids` (greedy at temperature 0, else seeded sampling).

        With `prompt_logprobs` (an echo), the log-probs of every prompt token too; else only those of
        the generated tokens (the full-vocabulary log_softmax at every prompt position is most of the
        work for a 262k vocabulary).
        """
        from transformers import DynamicCache

        if not prompt_ids:
            raise ServerError(400, "the prompt is empty")
        max_tokens = 16 if body.get("max_tokens") is None else int(body["max_tokens"])
        temperature = float(body.get("temperature", 1.0) or 0.0)
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        generator = torch.Generator().manual_seed(int(body.get("seed") or 0))
        cache = DynamicCache(config=self.model.config)
        # The KV cache keyword changed name across transformers versions (as in the transformers back end).
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        with self.lock:
            keep = len(prompt_ids) if prompt_logprobs else 1
            prefill = self.model(input_ids=torch.tensor([prompt_ids]), logits_to_keep=keep, **{name: cache})
            rows = [prefill.logits[0].float()]
            new_ids: list[int] = []
            text, finish = "", "length"
            for step in range(max_tokens):
                token = self._choose(rows[-1][-1], temperature, float(body.get("top_p", 1.0)), generator)
                new_ids.append(token)
                text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
                hit = min((text.index(stop) for stop in stops if stop and stop in text), default=None)
                if token in self.eos or hit is not None:
                    text, finish = (text if hit is None else text[:hit]), "stop"
                    break
                if step + 1 < max_tokens:  # the last token's successor distribution is never read
                    rows.append(self.model(input_ids=torch.tensor([[token]]), **{name: cache}).logits[0].float())
        logprobs = torch.cat(rows).log_softmax(dim=-1)[: keep - 1 + len(new_ids)]  # no row after the last token
        return Completion(prompt_ids, new_ids, text, finish, logprobs, first=len(prompt_ids) - keep + 1)

    @staticmethod
    def _choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
        if temperature <= 0:
            return int(logits.argmax())
        probabilities = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            ordered, order = probabilities.sort(descending=True)
            ordered[ordered.cumsum(0) - ordered > top_p] = 0.0
            probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
        return int(torch.multinomial(probabilities, 1, generator=generator))


# ----------------------------------------------------------------------------- vLLM's layout


def vllm_check_logprobs(requested: Any) -> None:
    if isinstance(requested, int) and requested > VLLM_MAX_LOGPROBS:
        raise ServerError(
            400, f"Requested sample logprobs of {requested}, which is greater than max allowed: {VLLM_MAX_LOGPROBS}"
        )


def vllm_completions(served: ServedModel, body: dict[str, Any]) -> dict[str, Any]:
    vllm_check_logprobs(body.get("logprobs"))
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ServerError(400, "this test server takes one string prompt")
    echo = bool(body.get("echo"))
    run = served.complete(served.encode(prompt), body, prompt_logprobs=echo)
    start = 0 if echo else len(run.prompt_ids)  # the first sequence position reported
    logprobs = None
    if body.get("logprobs") is not None:
        k = int(body["logprobs"])
        tokens, values, offsets, tops = [], [], [], []
        for index in range(start, len(run.ids)):
            piece = served.piece(run.ids[index])
            # The running sum of the decoded strings' lengths, BOS included: not positions in `text`.
            offsets.append(offsets[-1] + len(tokens[-1]) if tokens else 0)
            tokens.append(piece)
            if index == 0:  # the first token has nothing to condition on
                values.append(None)
                tops.append(None)
                continue
            values.append(max(run.logprob(index), VLLM_FLOOR))
            top = {served.piece(token): max(value, VLLM_FLOOR) for token, value in run.top(index, k)}
            top.setdefault(piece, values[-1])  # the position's own token, when not among the top k
            tops.append(top)
        logprobs = {"text_offset": offsets, "token_logprobs": values, "tokens": tokens, "top_logprobs": tops}
    choice = {"index": 0, "text": (prompt if echo else "") + run.text, "logprobs": logprobs,
              "finish_reason": run.finish_reason, "stop_reason": None, "prompt_logprobs": None}  # fmt: skip
    return {"id": "cmpl-test", "object": "text_completion", "created": 0, "model": body.get("model"),
            "choices": [choice], "usage": usage(run)}  # fmt: skip


def vllm_chat(served: ServedModel, body: dict[str, Any]) -> dict[str, Any]:
    vllm_check_logprobs(body.get("top_logprobs"))
    run = served.complete(served.render_chat(body["messages"]), body)
    logprobs = None
    if body.get("logprobs"):
        k = int(body.get("top_logprobs") or 0)
        content = []
        for index in range(len(run.prompt_ids), len(run.ids)):
            piece = served.piece(run.ids[index])
            top = [{"token": served.piece(token), "logprob": max(value, VLLM_FLOOR),
                    "bytes": list(served.piece(token).encode())} for token, value in run.top(index, k)]  # fmt: skip
            content.append({"token": piece, "logprob": max(run.logprob(index), VLLM_FLOOR),
                            "bytes": list(piece.encode()), "top_logprobs": top})  # fmt: skip
        logprobs = {"content": content}
    choice = {"index": 0, "message": {"role": "assistant", "content": run.text}, "logprobs": logprobs,
              "finish_reason": run.finish_reason, "stop_reason": None}  # fmt: skip
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body.get("model"),
            "choices": [choice], "usage": usage(run)}  # fmt: skip


def vllm_error(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": VLLM_ERROR_TYPES.get(status, "BadRequestError"),
                      "param": None, "code": status}}  # fmt: skip


# ----------------------------------------------------------------------------- llama.cpp's layout


def llamacpp_probs(served: ServedModel, run: Completion, n_probs: int) -> dict[str, Any] | None:
    """`logprobs` of a llama.cpp answer: the generated tokens only, each with its top `n_probs`."""
    if n_probs <= 0 or not run.new_ids:
        return None

    def entry(token: int, value: float) -> dict[str, Any]:
        piece = served.piece(token)
        return {"id": token, "token": piece, "bytes": list(piece.encode()), "logprob": value}

    content = [
        {**entry(run.ids[index], run.logprob(index)),
         "top_logprobs": [entry(token, value) for token, value in run.top(index, n_probs)]}
        for index in range(len(run.prompt_ids), len(run.ids))
    ]  # fmt: skip
    return {"content": content}


def llamacpp_completions(served: ServedModel, body: dict[str, Any], echo: str) -> dict[str, Any]:
    if body.get("echo") and echo == "reject":
        raise ServerError(500, "Only no echo is supported")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ServerError(400, "this test server takes one string prompt")
    run = served.complete(served.encode(prompt), body)
    choice = {"text": run.text, "index": 0, "logprobs": llamacpp_probs(served, run, int(body.get("logprobs") or 0)),
              "finish_reason": run.finish_reason}  # fmt: skip
    return {"choices": [choice], "created": 0, "model": body.get("model"), "object": "text_completion",
            "usage": usage(run), "id": "chatcmpl-test"}  # fmt: skip


def llamacpp_chat(served: ServedModel, body: dict[str, Any]) -> dict[str, Any]:
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise ServerError(400, "top_logprobs requires logprobs to be set to true")
    run = served.complete(served.render_chat(body["messages"]), body)
    choice: dict[str, Any] = {"finish_reason": run.finish_reason, "index": 0,
                              "message": {"role": "assistant", "content": run.text}}  # fmt: skip
    probs = llamacpp_probs(served, run, int(body.get("top_logprobs", 20)) if body.get("logprobs") else 0)
    if probs is not None:  # llama.cpp leaves the key out of a chat answer without log-probs
        choice["logprobs"] = probs
    return {"choices": [choice], "created": 0, "model": body.get("model"), "object": "chat.completion",
            "usage": usage(run), "id": "chatcmpl-test"}  # fmt: skip


def llamacpp_error(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "type": LLAMACPP_ERROR_TYPES.get(status, "server_error")}}


def usage(run: Completion) -> dict[str, int]:
    prompt, completion = len(run.prompt_ids), len(run.new_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ----------------------------------------------------------------------------- the server


@dataclass
class ModelServer:
    """A server on a free loopback port in a daemon thread; `with ModelServer(...) as url:` gives its base URL.

    Attributes:
        model: the served model (a folder is loaded on construction).
        layout: "vllm" or "llamacpp".
        reject: called with (path, body) before a request is answered; a message (HTTP 400) or a
            (status, message) makes the server answer with that error in its layout's error body.
        llamacpp_echo: what the llama.cpp layout does with `echo: true` on /v1/completions: "reject"
            (current builds: HTTP 500) or "ignore" (older builds).
        requests: (path, body) of every request, in arrival order.
    """

    model: ServedModel | str | Path
    layout: str = "vllm"
    reject: Callable[[str, dict[str, Any]], Rejection] | None = None
    llamacpp_echo: str = "reject"
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {self.layout!r}")
        if not isinstance(self.model, ServedModel):
            self.model = ServedModel(self.model)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(status, JSON answer) of one request."""
        served = self.model
        assert isinstance(served, ServedModel)
        error = llamacpp_error if self.layout == "llamacpp" else vllm_error
        try:
            rejection = self.reject(path, body) if self.reject else None
            if rejection is not None:
                status, message = rejection if isinstance(rejection, tuple) else (400, rejection)
                raise ServerError(status, message)
            if path == "/v1/completions":
                if self.layout == "llamacpp":
                    return 200, llamacpp_completions(served, body, self.llamacpp_echo)
                return 200, vllm_completions(served, body)
            if path == "/v1/chat/completions":
                return 200, (llamacpp_chat if self.layout == "llamacpp" else vllm_chat)(served, body)
            raise ServerError(404, f"no route {path}")
        except ServerError as failure:
            return failure.status, error(failure.status, str(failure))
        except Exception as failure:  # a request this server cannot read: a real server answers 500 too
            return 500, error(500, f"{type(failure).__name__}: {failure}")

    def __enter__(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append((self.path, body))
                status, answer = server.answer(self.path, body)
                payload = json.dumps(answer).encode()
                # The client may have given up on a slow answer and hung up.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        assert self._httpd is not None, "the server is not running"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __exit__(self, *exc: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
