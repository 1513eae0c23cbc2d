"""The `openai` back end: any OpenAI-compatible server, `/completions` or `/chat/completions`.

vLLM's, llama.cpp's and TGI's servers and hosted APIs all speak one or both. Generation sends one
request per prompt: to `/completions`, or (`endpoint: chat`) to `/chat/completions`, where a prompt
rendered for a chat model travels as its messages and the server applies the template.

Option scoring has two methods, chosen by `scoring` or, with `auto`, by what the server answers:
- `echo`: one `/completions` request per (prompt, option) with `echo` + `logprobs`, summing the
  echoed log-probabilities of the option's tokens (exact; vLLM);
- `top_logprobs`: one greedy request per prompt for a few answer tokens with their top-k
  log-probabilities, read at the first position where the options part ways (" (A)" and " (B)"
  share " (", so after "(" the next token is "A" or "B"). An option's log-prob there is that of its
  matching tokens; an option missing from the top k gets the lowest log-prob returned at that
  position (the most it could have had). The options' shared tokens are left out: they are the
  same for every option, so normalised option probabilities do not change (llama.cpp's server,
  hosted and chat-only APIs).

Requests run on a thread pool bounded by `max_concurrency` over one pooled `httpx.Client`, and
transient failures (429, 5xx, timeouts, dropped connections, and 200 answers that are cut short,
not JSON, or not in the shape asked for) are retried with jittered exponential backoff; still
failing after `max_retries` retries, a request raises `ServiceError` (one line, exit 1).

The API key is read from an environment variable, sent only in the Authorization header, and kept
out of reprs, logs and error messages.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from constitutional.backends.base import Backend, SamplingParams, cut_at_stop
from constitutional.backends.settings import OpenAISettings
from constitutional.errors import ServiceError, UserError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# The OpenAI API rejects more than 4 stop strings; the rest are honoured by cutting client-side.
MAX_SERVER_STOPS = 4
# Server error text quoted in our messages is cut to this many characters (one readable line).
MAX_ERROR_CHARS = 300
# A prompt rendered for a chat model: this marker, then its messages as JSON (see apply_chat_template).
CHAT_MESSAGES = "\x00chat-messages:"
# Answer tokens a top_logprobs scoring request asks for: enough to get past "(" to the option letter.
SCORING_TOKENS = 4


@dataclass
class Server:
    """One server of a fleet, and its state."""

    url: str
    in_flight: int = 0
    out_until: float = 0.0  # time.monotonic() before which it is out of rotation
    requests: int = 0  # sent so far (for logs and tests)


class Fleet:
    """OpenAI-compatible servers of one model: each request goes to the least busy one in rotation.

    A server that fails (connection error, timeout, 429, 5xx) leaves the rotation for a cool-down
    (a 429's Retry-After, else `cooldown_s`) and is tried again after it. When every server is out,
    the one due back first is used anyway (a lone server is simply retried with backoff), so work
    never stops while any server might answer. Each server has at most `per_server` requests in
    flight.
    """

    def __init__(self, urls: Sequence[str], per_server: int, cooldown_s: float):
        self.servers = [Server(url) for url in urls]
        self.per_server = per_server
        self.cooldown_s = cooldown_s
        self._changed = threading.Condition()

    def acquire(self) -> Server:
        """A server to send one request to (blocks while every usable server is at its limit)."""
        with self._changed:
            while True:
                now = time.monotonic()
                usable = [server for server in self.servers if server.out_until <= now]
                if not usable:
                    usable = [min(self.servers, key=lambda server: server.out_until)]
                free = [server for server in usable if server.in_flight < self.per_server]
                if free:
                    server = min(free, key=lambda server: (server.in_flight, server.requests))
                    server.in_flight += 1
                    server.requests += 1
                    return server
                self._changed.wait(timeout=0.05)

    def release(self, server: Server, ok: bool, out_for: float | None = None) -> None:
        """Return a server after a request: back in rotation if it answered, out for a while if not."""
        with self._changed:
            server.in_flight -= 1
            if ok:
                server.out_until = 0.0
            else:
                server.out_until = time.monotonic() + (self.cooldown_s if out_for is None else out_for)
                if len(self.servers) > 1:
                    log.warning("%s: out of rotation for %.1fs", server.url, server.out_until - time.monotonic())
            self._changed.notify_all()

    def others_up(self, server: Server) -> bool:
        """Whether a server other than `server` is in rotation now."""
        with self._changed:
            now = time.monotonic()
            return any(other is not server and other.out_until <= now for other in self.servers)


class OpenAIBackend(Backend):
    """A model served by an OpenAI-compatible completions endpoint.

    Attributes:
        model_id: "openai:{base_url}:{model}", the key the generation cache uses.
    """

    def __init__(
        self,
        model: str,
        base_url: str | Sequence[str] = "http://127.0.0.1:8000/v1",
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        endpoint: str = "completions",
        scoring: str = "auto",
        top_logprobs: int = 20,
        server_cooldown_s: float = 30.0,
    ):
        """Set up the HTTP client; no request is sent until the first call.

        Args:
            model: the model name the server knows (sent as `model` in every request).
            base_url: the API root, e.g. "http://127.0.0.1:8000/v1" (`/completions` is appended), or
                several (a fleet of servers of the same model: each request goes to the least busy
                server in rotation; one that fails is taken out for `server_cooldown_s`, then tried again).
            api_key: bearer token, or None for servers that need none (local vLLM, llama.cpp).
            max_concurrency: the most requests in flight at once, per server.
            timeout_s: connect/read/write/pool timeout of one request, in seconds.
            max_retries: retries after the first attempt on 429, 5xx, timeouts and connection errors.
            backoff_initial_s: the first retry's delay; it doubles each retry.
            backoff_max_s: the longest backoff delay (a server's Retry-After still wins).
            endpoint: "completions" or "chat" (where generation requests go).
            scoring: "auto", "echo" or "top_logprobs" (see the module docstring).
            top_logprobs: k of the top_logprobs method.
            server_cooldown_s: how long a failing server of a fleet stays out of rotation.
        """
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("base_url: expected at least one server")
        self.model = model
        self.fleet = Fleet([url.rstrip("/") for url in urls], max_concurrency, server_cooldown_s)
        self.base_url = ", ".join(server.url for server in self.fleet.servers)  # for messages
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.endpoint = endpoint
        self.top_logprobs = top_logprobs
        # The scoring method in use: fixed by config, or decided by the first scoring call (auto).
        self.scoring_method: str | None = None if scoring == "auto" else scoring
        # Chat answers differ from completions of the same text: the cache must not mix them.
        # A fleet serves one model: its identity does not depend on which server answered.
        servers = "|".join(sorted(server.url for server in self.fleet.servers))
        self.model_id = f"openai:{servers}:{model}" + (":chat" if endpoint == "chat" else "")
        # Private, and only ever placed in the client's headers: never formatted into text.
        self._api_key = api_key or None
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        # One pooled connection per worker thread, so no request waits for a free connection.
        connections = max_concurrency * len(urls)
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    def __repr__(self) -> str:
        # Spelled out so that no attribute holding the key can ever leak into a repr.
        return (
            f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, "
            f"max_concurrency={self.max_concurrency}, authenticated={self._api_key is not None})"
        )

    # ----------------------------------------------------------------------------- public API

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        """With `endpoint: chat`, the messages themselves (the server applies the model's template).

        They travel as a marked JSON string through the stages, which only pass prompts along.
        """
        if self.endpoint != "chat":
            return None
        return CHAT_MESSAGES + json.dumps(messages, ensure_ascii=False)

    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None) -> list[str]:
        """Complete each prompt with one `/completions` or `/chat/completions` request.

        Args:
            prompts: raw prompt strings.
            params: sampling parameters shared by the batch.
            seeds: one seed per prompt (default 0 for all), sent as the request's `seed`.

        Returns:
            One completion per prompt, in input order, cut before the first of *all* stop strings.
        """
        seeds = [0] * len(prompts) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        bodies = [self._generation_body(prompt, params, seed) for prompt, seed in zip(prompts, seeds)]
        texts = self._map(lambda body: self._post(body, parse=_choice_text), bodies)
        return [cut_at_stop(text, params.stop) for text in texts]

    def score_options(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """Log-probabilities of each option after each prompt, by the `echo` or `top_logprobs` method.

        Args:
            prompts: N prompt strings.
            options: K continuation strings, e.g. [" (A)", " (B)"].

        Returns:
            N lists of K floats (with top_logprobs: up to a constant shared by a prompt's options).

        Raises:
            UserError: the server supports neither method (`auto`), or not the configured one.
        """
        if not prompts:
            return []
        if self.scoring_method is None:
            self.scoring_method = self._detect_scoring(prompts[0], options)
            log.info("%s: option scoring by %s", self.base_url, self.scoring_method)
        if self.scoring_method == "echo":
            pairs = [(prompt, option) for prompt in prompts for option in options]
            flat = self._map(lambda pair: self._score_one(*pair), pairs)
            k = len(options)
            return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]
        return self._map(lambda prompt: self._score_top(prompt, options), list(prompts))

    def _detect_scoring(self, prompt: str, options: Sequence[str]) -> str:
        """`echo` if the server returns echoed prompt log-probs, else `top_logprobs` if it returns those."""
        lacks = []
        if self.endpoint == "completions" and not prompt.startswith(CHAT_MESSAGES):
            try:
                self._score_one(prompt, options[0], probing=True)
                return "echo"
            except (RuntimeError, UserError) as error:
                lacks.append(f"echo ({error})")
        try:
            self._score_top(prompt, options, probing=True)
            return "top_logprobs"
        except (RuntimeError, UserError) as error:
            lacks.append(f"top_logprobs ({error})")
        raise UserError(f"the server at {self.base_url} answers neither way of scoring options: " + "; ".join(lacks))

    def close(self) -> None:
        """Close the HTTP client and its pooled connections."""
        self._client.close()

    # ----------------------------------------------------------------------------- requests

    def _prompt_fields(self, prompt: str) -> dict[str, Any]:
        """`prompt` for /completions, `messages` for /chat/completions (a plain prompt: one user turn)."""
        if self.endpoint == "completions":
            if prompt.startswith(CHAT_MESSAGES):
                raise UserError(f"{self.base_url}: a chat-formatted prompt needs openai.endpoint 'chat'")
            return {"prompt": prompt}
        if prompt.startswith(CHAT_MESSAGES):
            return {"messages": json.loads(prompt.removeprefix(CHAT_MESSAGES))}
        return {"messages": [{"role": "user", "content": prompt}]}

    def _generation_body(self, prompt: str, params: SamplingParams, seed: int) -> dict[str, Any]:
        """The JSON body of one generation request."""
        body: dict[str, Any] = {
            "model": self.model,
            **self._prompt_fields(prompt),
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": int(seed),
        }
        stops = [marker for marker in params.stop if marker][:MAX_SERVER_STOPS]
        if stops:
            body["stop"] = stops
        if params.min_new_tokens > 0:
            # A vLLM extension; other servers may ignore or reject it, so only send it when asked.
            body["min_tokens"] = params.min_new_tokens
        return body

    def _score_one(self, prompt: str, option: str, probing: bool = False) -> float:
        """Log-probability of `option` after `prompt`, from one echo request (`probing`: see `_post`)."""
        body = {
            "model": self.model,
            "prompt": prompt + option,
            # Not every server accepts max_tokens=0; the one generated token is ignored below.
            "max_tokens": 1,
            "echo": True,
            "logprobs": 1,
            "temperature": 0.0,
        }
        start, end = len(prompt), len(prompt) + len(option)

        def parse(data: dict[str, Any]) -> float:
            return _sum_span_logprobs(_first_choice(data).get("logprobs"), start, end, self.base_url)

        return self._post(body, "completions", parse=parse, retry_malformed=not probing)

    def _score_top(self, prompt: str, options: Sequence[str], probing: bool = False) -> list[float]:
        """Options' log-probs from the top-k log-probs of a few greedy answer tokens (one request)."""
        body: dict[str, Any] = {"model": self.model, **self._prompt_fields(prompt), "max_tokens": SCORING_TOKENS,
                                "temperature": 0.0}  # fmt: skip
        if self.endpoint == "chat":
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        else:
            body["logprobs"] = self.top_logprobs
        positions = self._post(
            body, parse=lambda data: _top_logprob_positions(_first_choice(data), self.base_url),
            retry_malformed=not probing,
        )  # fmt: skip
        return option_logprobs_from_top(positions, options, self.base_url)

    def _map(self, function: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """Apply `function` to every item on at most `max_concurrency` threads; results in order."""
        if not items:
            return []
        workers = self.max_concurrency * len(self.fleet.servers)
        if len(items) == 1 or workers == 1:
            return [function(item) for item in items]
        pool = ThreadPoolExecutor(max_workers=min(workers, len(items)))
        try:
            futures = [pool.submit(function, item) for item in items]
            return [future.result() for future in futures]
        finally:
            # On the first failure, drop the queued requests instead of sending (and retrying)
            # them all against a server that just refused one; those in flight finish.
            pool.shutdown(wait=True, cancel_futures=True)

    def _post(
        self,
        body: dict[str, Any],
        endpoint: str | None = None,
        parse: Callable[[dict[str, Any]], R] | None = None,
        retry_malformed: bool = True,
    ) -> Any:
        """POST one request to `/completions` or `/chat/completions`, retrying transient failures.

        Transient: connection errors and timeouts, 429 and 5xx (a 429's Retry-After is honoured),
        and an answer that is cut short, not JSON, or not in the shape `parse` reads (a proxy or
        an overloaded server can return any of these once).

        Args:
            body: the JSON request.
            endpoint: "completions" or "chat"; default the back end's.
            parse: reads what the caller needs from the answer's JSON; a shape it cannot read
                (`MalformedAnswer`, or a KeyError, TypeError, ... on the server's data) is retried.
            retry_malformed: False while probing what a server supports: an answer without the
                log-probs asked for (a missing capability answers the same every time) is reported
                at once; a body that is not JSON at all is still retried.

        Returns:
            `parse(answer)`, or the answer's JSON object without `parse`.

        Raises:
            UserError: the server rejected the request (4xx other than 429): not retried, since
                sending it again cannot help (wrong model name, bad key, prompt too long, ...).
            MalformedAnswer: with `retry_malformed` off, an answer in the wrong shape.
            ServiceError: still failing after `max_retries` retries (the last error quoted).
        """
        path = "chat/completions" if (endpoint or self.endpoint) == "chat" else "completions"
        attempts = self.max_retries + 1
        last_error = ""
        for attempt in range(attempts):
            retry_after: float | None = None
            server = self.fleet.acquire()
            url = f"{server.url}/{path}"
            try:
                response = self._client.post(url, json=body)
            except httpx.TransportError as error:  # includes timeouts and answers cut short
                last_error = f"{url}: {type(error).__name__}: {error}"
            else:
                if response.status_code == 429 or response.status_code >= 500:
                    last_error = f"{url}: HTTP {response.status_code}: {self._error_text(response)}"
                    retry_after = _retry_after_seconds(response)
                elif response.status_code >= 400:
                    self.fleet.release(server, ok=True)  # the request was wrong, not the server
                    raise UserError(
                        f"{url} rejected the request with HTTP {response.status_code}: {self._error_text(response)}"
                    )
                else:
                    try:
                        result = _read_answer(response, url, parse)
                    except MalformedAnswer as error:
                        if not retry_malformed and not isinstance(error, UnreadableAnswer):
                            self.fleet.release(server, ok=True)
                            raise
                        last_error = str(error)
                    else:
                        self.fleet.release(server, ok=True)
                        return result
            self.fleet.release(server, ok=False, out_for=retry_after)
            if attempt + 1 < attempts:
                # Another server in rotation takes the retry at once; a lone server gets the backoff.
                if self.fleet.others_up(server):
                    delay = 0.0
                else:
                    delay = retry_after if retry_after is not None else self._backoff_s(attempt)
                log.warning("%s; retry %d/%d in %.2fs", last_error, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise ServiceError(f"{self.base_url}/{path} failed after {attempts} attempts; last error: {last_error}")

    def _backoff_s(self, attempt: int) -> float:
        """Exponential backoff with jitter for retry number `attempt` (0-based)."""
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2**attempt)
        # "Equal jitter": keeps at least half the delay but spreads threads that failed together,
        # so they do not hit a recovering server in lockstep.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _error_text(self, response: httpx.Response) -> str:
        """The server's error message on one line, truncated, with the API key masked."""
        try:
            data = response.json()
            error = data.get("error", data) if isinstance(data, dict) else data
            message = error.get("message", error) if isinstance(error, dict) else error
            text = message if isinstance(message, str) else json.dumps(message)
        except ValueError:
            text = response.text
        # Some servers quote (part of) the key they rejected; never let it reach logs or errors.
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return _one_line(text) or response.reason_phrase or "(no message)"


# --------------------------------------------------------------------------------- helpers


class MalformedAnswer(RuntimeError):
    """The server answered 200, but not in the shape of a completions answer (or without what was asked)."""


class UnreadableAnswer(MalformedAnswer):
    """A 200 whose body is not a JSON object: a transport accident, never a missing capability."""


def _read_answer(response: httpx.Response, url: str, parse: Callable[[dict[str, Any]], R] | None) -> Any:
    """The answer's JSON object, read by `parse`; any shape `parse` cannot read is a MalformedAnswer."""
    data = _json_body(response, url)
    if parse is None:
        return data
    try:
        return parse(data)
    except MalformedAnswer:
        raise
    # The server's data, not our code, is what these come from: a field missing or of another type.
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        raise MalformedAnswer(
            f"{url} answered in an unexpected shape ({type(error).__name__}: {error}): {_one_line(response.text)!r}"
        ) from None


def _json_body(response: httpx.Response, url: str) -> dict[str, Any]:
    """The response's JSON object, or a MalformedAnswer quoting what came back instead."""
    try:
        data = response.json()
    except ValueError:
        raise UnreadableAnswer(f"{url} returned a response that is not JSON: {_one_line(response.text)!r}") from None
    if not isinstance(data, dict):
        raise UnreadableAnswer(f"{url} returned JSON that is not an object: {_one_line(json.dumps(data))!r}")
    return data


def _first_choice(data: dict[str, Any]) -> dict[str, Any]:
    """`choices[0]` of a completions response, or a MalformedAnswer saying what is missing."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedAnswer(f"completions response has no choices: {_one_line(json.dumps(data))!r}")
    return choices[0]


def _choice_text(data: dict[str, Any]) -> str:
    """The generated text of a completions (`text`) or chat (`message.content`) response."""
    choice = _first_choice(data)
    if isinstance(choice.get("text"), str):
        return choice["text"]
    message = choice.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return message["content"]
    raise MalformedAnswer(f"response has no generated text: {_one_line(json.dumps(data))!r}")


def _top_logprob_positions(choice: dict[str, Any], base_url: str) -> list[tuple[str, dict[str, float]]]:
    """(greedy token, {top token: log-prob}) per generated position, from either response format.

    /completions: `logprobs.tokens` and `logprobs.top_logprobs` (a dict per position); chat:
    `logprobs.content` (each with `token` and a `top_logprobs` list of {token, logprob}).
    """
    logprobs = choice.get("logprobs")
    positions = []
    if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
        for entry in logprobs["content"]:
            tops = entry.get("top_logprobs") if isinstance(entry, dict) else None
            if not isinstance(tops, list) or not tops:
                break
            positions.append((str(entry.get("token", "")), {str(t["token"]): float(t["logprob"]) for t in tops}))
    elif isinstance(logprobs, dict) and isinstance(logprobs.get("top_logprobs"), list):
        tokens = logprobs.get("tokens") or []
        for index, tops in enumerate(logprobs["top_logprobs"]):
            if not isinstance(tops, dict) or not tops or index >= len(tokens):
                break
            positions.append((str(tokens[index]), {str(token): float(value) for token, value in tops.items()}))
    if not positions:
        raise MalformedAnswer(
            f"the server at {base_url} returned no top log-probabilities: option scoring needs `echo` with "
            "`logprobs` on /completions, or `logprobs` with top-k alternatives on the generated tokens"
        )
    return positions


def option_logprobs_from_top(
    positions: Sequence[tuple[str, dict[str, float]]], options: Sequence[str], base_url: str = "the server"
) -> list[float]:
    """Each option's log-prob at the first answer position where the options part ways.

    Walks the greedy answer while it spells the part all options share (whitespace ignored: " (A)"
    is "(A)", so a "(" is read past). At the first position where the greedy token does anything
    else, an option gets the log-sum-exp of the top tokens consistent with it ("A" after "(", "(A"
    at the start, or "A" where "(A)" was offered), or, when none is, the lowest log-prob listed
    there.

    Returns:
        One log-prob per option; all equal (a tie) when the greedy answer never reached the point where
        the options differ (it left their format, or ran out of tokens), which is logged.

    Raises:
        ValueError: two options are the same after whitespace is removed, or one is a prefix of another.
    """
    wanted = ["".join(option.split()) for option in options]
    for first, second in ((a, b) for i, a in enumerate(wanted) for b in wanted[i + 1 :]):
        if first.startswith(second) or second.startswith(first):
            raise ValueError(f"options {options!r} must differ before one ends, for top_logprobs scoring")
    spelled = ""  # what the greedy answer has spelled so far, whitespace removed
    for greedy, tops in positions:
        remainders = [option[len(spelled) :] for option in wanted]
        shared = os.path.commonprefix(remainders)
        chosen = "".join(greedy.split())
        if shared and (not chosen or shared.startswith(chosen)):
            spelled += chosen  # the answer is still spelling what all options share: read further on
            continue
        found: list[list[float]] = [[] for _ in wanted]
        for token, value in tops.items():
            text = "".join(token.split())
            for index, remainder in enumerate(remainders):
                # A token that reaches past the shared part ("(A" for "(A)"), or that skips it and
                # starts what follows ("A": a model answering "A" rather than "(A)").
                past = len(text) > len(shared) and (remainder.startswith(text) or text.startswith(remainder))
                after = remainder[len(shared) :]
                skipped = bool(text) and (after.startswith(text) or text.startswith(after))
                if past or skipped:
                    found[index].append(value)
        floor = min(tops.values())
        return [_logsumexp(values) if values else floor for values in found]
    # The answer never got to the options (it left their format, or was cut short): no preference.
    log.warning("%s: answer %r did not reach options %r; scored as a tie", base_url, [g for g, _ in positions], options)
    return [0.0] * len(options)


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(value - top) for value in values))


def _sum_span_logprobs(logprobs: Any, start: int, end: int, base_url: str) -> float:
    """Sum the log-probs of echoed tokens covering characters [start, end) of the echoed text.

    Args:
        logprobs: `choices[0]["logprobs"]` of an echo request (`text_offset`, `token_logprobs`).
        start: len(prompt), where the option begins.
        end: len(prompt + option), where the option ends and the one generated token begins.
        base_url: named in the error message.

    Returns:
        The summed log-probability of the option's tokens.
    """
    offsets = logprobs.get("text_offset") if isinstance(logprobs, dict) else None
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if not offsets or not values or len(offsets) != len(values):
        raise MalformedAnswer(
            f"the server at {base_url} returned no prompt log-probabilities: option scoring needs a "
            "server that supports `echo: true` with `logprobs` on /completions (vLLM does)"
        )
    total = 0.0
    for i, (offset, value) in enumerate(zip(offsets, values)):
        token_end = offsets[i + 1] if i + 1 < len(offsets) else float("inf")
        # A token that starts before `start` but ends after it is included: tokenisation may merge
        # the prompt's last characters with the option's first (e.g. "?" + " (" into one token).
        # Tokens from `end` on are the generated token, excluded.
        if offset < end and token_end > start:
            if value is None:
                # Servers give no log-prob for the very first token (nothing to condition on).
                raise MalformedAnswer(f"the server at {base_url} returned no log-probability for the token at {offset}")
            total += float(value)
    return total


def _retry_after_seconds(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds, or None when absent or not a number (an HTTP date)."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _one_line(text: str) -> str:
    """Collapse whitespace and truncate to MAX_ERROR_CHARS."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


# --------------------------------------------------------------------------------- registry entry


# A small multiple-choice question for `check_option_scoring`: options that part ways at the letter.
PROBE_PROMPT = "Which answer is more helpful?\nOptions:\n(A) A clear, correct answer.\n(B) No answer.\nThe answer is:"
PROBE_OPTIONS = (" (A)", " (B)")


def check_option_scoring(model_name: str, settings: OpenAISettings, key: str) -> str:
    """Ask the server, before any work starts, whether it can score options as the config says.

    One question, scored by `openai.scoring` (under `auto`: echo, else top_logprobs), so that a
    server that cannot score (or is not there) stops the run before a stage that generates for
    hours runs ahead of the one that scores. Transient failures are retried as for any request.

    Args:
        model_name: the model's name on the server.
        settings: the `openai` section.
        key: the config key of the model, for the message (e.g. "models.feedback").

    Returns:
        The scoring method the server answered.

    Raises:
        UserError: one line naming the server and what it lacks.
    """
    probe = load(model_name, settings, ".", 0)
    try:
        probe.score_options([PROBE_PROMPT], PROBE_OPTIONS)
    except UserError as error:
        raise UserError(f"{key}: {error}") from None
    except RuntimeError as error:
        raise UserError(
            f"{key}: the server at {probe.base_url} cannot score options by {settings.scoring}: {error}"
        ) from None
    finally:
        probe.close()
    return probe.scoring_method


def load(model_name: str, settings: OpenAISettings, base_dir: str, seed: int) -> OpenAIBackend:
    """Build the back end from the `openai` settings, the key from the environment.

    Args:
        model_name: the model's name as the server knows it.
        settings: the config's `openai` section.
        base_dir, seed: unused (the server resolves names; every request carries its own seed).

    Returns:
        An OpenAIBackend. Without the key's variable set, requests carry no Authorization header
        (local servers need none).
    """
    return OpenAIBackend(
        model=model_name,
        base_url=settings.base_urls or settings.base_url,
        api_key=os.environ.get(settings.api_key_env) or None,
        max_concurrency=settings.max_concurrency,
        timeout_s=settings.timeout_s,
        max_retries=settings.max_retries,
        backoff_initial_s=settings.backoff_initial_s,
        backoff_max_s=settings.backoff_max_s,
        endpoint=settings.endpoint,
        scoring=settings.scoring,
        top_logprobs=settings.top_logprobs,
        server_cooldown_s=settings.server_cooldown_s,
    )
