"""HTTP transport to a fleet of OpenAI-compatible servers: concurrency, retries, backoff, errors.

Requests run on a thread pool bounded by `max_concurrency` per server over one pooled
`httpx.Client`, and transient failures (429, 5xx, timeouts, dropped connections, and 200 answers
that are cut short, not JSON, or not in the shape asked for) are retried with jittered exponential
backoff; still failing after `max_retries` retries, a request raises `ServiceError` (one line,
exit 1). A 4xx other than 429 raises `UserError` at once, and so does an answer in a layout the
reader cannot use (`parse` raises `UserError`): trying again gets the same answer.

The API key is sent only in the Authorization header, and kept out of reprs, logs and error
messages. Only the `openai` back end imports this module (importing the package imports no HTTP
client).
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from constitutional.backends.answers import MalformedAnswer, UnreadableAnswer, one_line
from constitutional.errors import ServiceError, UserError

log = logging.getLogger(__name__)

# A server error message that names a missing feature rather than a failure (see _try_once).
UNSUPPORTED = re.compile(r"not supported|unsupported|only no echo", re.IGNORECASE)

T = TypeVar("T")
R = TypeVar("R")


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


@dataclass
class _Failure:
    """One try that failed transiently: what went wrong, and the server's Retry-After if it sent one."""

    error: str
    retry_after: float | None = None


class Transport:
    """POSTs JSON requests to a fleet of servers, on a bounded thread pool, retrying transient failures.

    Attributes:
        fleet: the servers and their state.
        base_url: the servers' URLs, comma-separated (for messages).
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        server_cooldown_s: float = 30.0,
    ):
        """Set up the HTTP client; no request is sent until the first `post`.

        Args:
            base_url: the API root of each server of the fleet (one URL, or several of the same model).
            api_key: bearer token, or None for servers that need none (local vLLM, llama.cpp).
            max_concurrency: the most requests in flight at once, per server.
            timeout_s: connect/read/write/pool timeout of one request, in seconds.
            max_retries: retries after the first attempt on 429, 5xx, timeouts and connection errors.
            backoff_initial_s: the first retry's delay; it doubles each retry.
            backoff_max_s: the longest backoff delay (a server's Retry-After still wins).
            server_cooldown_s: how long a failing server of a fleet stays out of rotation.
        """
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("base_url: expected at least one server")
        self.fleet = Fleet([url.rstrip("/") for url in urls], max_concurrency, server_cooldown_s)
        self.base_url = ", ".join(server.url for server in self.fleet.servers)  # for messages
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        # Private, and only ever placed in the client's headers: never formatted into text.
        self._api_key = api_key or None
        # One pooled connection per worker thread, so no request waits for a free connection.
        self._client = _http_client(self._api_key, timeout_s, connections=max_concurrency * len(urls))

    @property
    def authenticated(self) -> bool:
        """Whether requests carry an API key (the key itself is never shown)."""
        return self._api_key is not None

    def __repr__(self) -> str:
        # Spelled out so that no attribute holding the key can ever leak into a repr.
        return f"Transport(base_url={self.base_url!r}, authenticated={self.authenticated})"

    def close(self) -> None:
        """Close the HTTP client and its pooled connections."""
        self._client.close()

    def map(self, function: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """Apply `function` to every item on at most `max_concurrency` threads per server; results in order."""
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

    def post(
        self,
        path: str,
        body: dict[str, Any],
        parse: Callable[[dict[str, Any]], R] | None = None,
        retry_malformed: bool = True,
    ) -> Any:
        """POST one request to `{server}/{path}` of a server in rotation, retrying transient failures.

        Transient: connection errors and timeouts, 429 and 5xx (a 429's Retry-After is honoured),
        and an answer that is cut short, not JSON, or not in the shape `parse` reads (a proxy or
        an overloaded server can return any of these once).

        Args:
            path: "completions" or "chat/completions".
            body: the JSON request.
            parse: reads what the caller needs from the answer's JSON; a shape it cannot read
                (`MalformedAnswer`, raised where the field is read) is retried.
            retry_malformed: False while probing what a server supports: an answer without the
                log-probs asked for is asked again at once, without backoff, and reported when every
                try answered so (a missing capability answers the same every time; a fault does
                not); a body that is not JSON at all is retried as usual.

        Returns:
            `parse(answer)`, or the answer's JSON object without `parse`.

        Raises:
            UserError: the server rejected the request (4xx other than 429), or `parse` found the
                answer in a layout it cannot use: not retried, since sending it again cannot help
                (wrong model name, bad key, prompt too long, a server that does not echo, ...).
            MalformedAnswer: with `retry_malformed` off, an answer in the wrong shape.
            ServiceError: still failing after `max_retries` retries (the last error quoted).
        """
        attempts = self.max_retries + 1
        last_error = ""
        for attempt in range(attempts):
            server = self.fleet.acquire()
            try:
                outcome = self._try_once(server, f"{server.url}/{path}", body, parse, retry_malformed)
            except MalformedAnswer:
                # Probing: a missing capability answers the same every time, a transient accident does
                # not, so the question is asked again at once (no backoff) before the answer counts.
                if attempt + 1 < attempts:
                    continue
                raise
            if not isinstance(outcome, _Failure):
                return outcome
            last_error = outcome.error
            self.fleet.release(server, ok=False, out_for=outcome.retry_after)
            if attempt + 1 < attempts:
                self._wait_to_retry(server, attempt, outcome)
        raise ServiceError(f"{self.base_url}/{path} failed after {attempts} attempts; last error: {last_error}")

    def _try_once(
        self,
        server: Server,
        url: str,
        body: dict[str, Any],
        parse: Callable[[dict[str, Any]], R] | None,
        retry_malformed: bool,
    ) -> Any:
        """One try of `post` on `server` (acquired by the caller).

        Returns:
            The answer (read by `parse`), with the server released as healthy; or a `_Failure` for
            a transient failure, with the server still held (the caller takes it out of rotation).

        Raises:
            UserError, MalformedAnswer: as `post` (the server released as healthy).
        """
        try:
            response = self._client.post(url, json=body)
        except httpx.TransportError as error:  # includes timeouts and answers cut short
            return _Failure(f"{url}: {type(error).__name__}: {error}")
        if response.status_code == 429 or response.status_code >= 500:
            error_text = self._error_text(response)
            if response.status_code >= 500 and UNSUPPORTED.search(error_text):
                # A server error that says the feature is not supported is an answer, not an outage:
                # llama.cpp's server answers echo with 500 "Only no echo is supported", every time.
                self.fleet.release(server, ok=True)
                raise RejectedRequest(f"{url} answered HTTP {response.status_code}: {error_text}", error_text)
            return _Failure(f"{url}: HTTP {response.status_code}: {error_text}", _retry_after_seconds(response))
        if response.status_code >= 400:
            self.fleet.release(server, ok=True)  # the request was wrong, not the server
            text = self._error_text(response)
            raise RejectedRequest(f"{url} rejected the request with HTTP {response.status_code}: {text}", text)
        try:
            result = _read_answer(response, url, parse)
        except UserError:  # an answer in a layout this client cannot read: the same on every try
            self.fleet.release(server, ok=True)
            raise
        except MalformedAnswer as error:
            if not retry_malformed and not isinstance(error, UnreadableAnswer):
                self.fleet.release(server, ok=True)
                raise
            return _Failure(str(error))
        except Exception:  # a bug in the reader, raised as it is: the server's slot is freed first
            self.fleet.release(server, ok=True)
            raise
        self.fleet.release(server, ok=True)
        return result

    def _wait_to_retry(self, server: Server, attempt: int, failure: _Failure) -> None:
        """Log the failure of try `attempt` (0-based) and sleep until the next try."""
        # Another server in rotation takes the retry at once; a lone server gets the backoff.
        if self.fleet.others_up(server):
            delay = 0.0
        else:
            delay = failure.retry_after if failure.retry_after is not None else self._backoff_s(attempt)
        log.warning("%s; retry %d/%d in %.2fs", failure.error, attempt + 1, self.max_retries, delay)
        time.sleep(delay)

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
        return one_line(text) or response.reason_phrase or "(no message)"


class RejectedRequest(UserError):
    """A 4xx other than 429: the server refused the request itself. `server_message` is its reason
    (one line), which the back end reads to send once more what a hosted API documents it accepts."""

    def __init__(self, message: str, server_message: str):
        super().__init__(message)
        self.server_message = server_message


def _http_client(api_key: str | None, timeout_s: float, connections: int) -> httpx.Client:
    """One pooled client for every server, the key (if any) in its Authorization header only."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(
        headers=headers,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


def _read_answer(response: httpx.Response, url: str, parse: Callable[[dict[str, Any]], R] | None) -> Any:
    """The answer's JSON object, read by `parse` (which raises MalformedAnswer on a shape it cannot read)."""
    data = _json_body(response, url)
    if parse is None:
        return data
    # The readers (answers.py) turn a field that is missing or of another type into MalformedAnswer
    # where they read it; any other exception from `parse` is a bug of ours, raised as it is.
    return parse(data)


def _json_body(response: httpx.Response, url: str) -> dict[str, Any]:
    """The response's JSON object, or a MalformedAnswer quoting what came back instead."""
    try:
        data = response.json()
    except ValueError:
        raise UnreadableAnswer(f"{url} returned a response that is not JSON: {one_line(response.text)!r}") from None
    if not isinstance(data, dict):
        raise UnreadableAnswer(f"{url} returned JSON that is not an object: {one_line(json.dumps(data))!r}")
    return data


def _retry_after_seconds(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds, or None when absent or not a number (an HTTP date)."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
