"""A fault-injecting OpenAI-compatible server on 127.0.0.1 for the HTTP-fault campaign.

Its correct answers are a pure function of the request: generated text from a hash of the
prompt and seed, top-k log-probs of " (A)"/" (B)" from a hash of the prompt. Before answering a
request correctly it fails it a seeded number of times (0 to `max_faults`, per request body), each
time in a seeded way:

- `500`: HTTP 500 with a JSON error;
- `429`: HTTP 429 with `Retry-After: 0`;
- `timeout`: answers only after the client's timeout;
- `truncated`: a 200 whose body stops half-way (the connection closes before Content-Length);
- `not_json`: a 200 whose whole body is half a JSON document;
- `dropped`: the connection closes without any answer;
- `wrong_shape`: a 200 JSON answer without the text or log-probs asked for.

`down` makes every request fail with 503 (a server that stays down); `quote_key` puts the
request's Authorization header into error messages; `answered` counts the correct answers,
`attempts` the tries per request body.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("500", "429", "timeout", "truncated", "not_json", "dropped", "wrong_shape")


@dataclass
class FaultPlan:
    seed: int = 0
    max_faults: int = 0  # per request body; 0: a healthy server
    timeout_s: float = 0.3  # the client's timeout: a `timeout` fault answers after it
    down: bool = False
    quote_key: bool = False  # error messages repeat the request's Authorization header (some servers do)
    injected: Counter = field(default_factory=Counter)  # fault kind -> how many
    attempts: Counter = field(default_factory=Counter)  # request body -> tries
    answered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fault_for(self, key: str) -> str | None:
        """The fault for this try of the request `key`, or None to answer it correctly."""
        with self.lock:
            attempt = self.attempts[key]
            self.attempts[key] += 1
            rng = random.Random(f"{self.seed}:{key}")
            if self.down:
                self.injected["down"] += 1
                return "down"
            if attempt >= rng.randint(0, self.max_faults):
                self.answered += 1
                return None
            kind = random.Random(f"{self.seed}:{key}:{attempt}").choice(FAULTS)
            self.injected[kind] += 1
            return kind


def digest(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def correct_answer(body: dict[str, Any]) -> dict[str, Any]:
    """The answer a healthy server gives: deterministic in the request."""
    prompt = body.get("prompt") if "prompt" in body else json.dumps(body.get("messages"))
    if body.get("logprobs"):  # a top_logprobs scoring request
        h = digest("score", prompt)
        a, b = -0.2 - int(h[:2], 16) / 100, -0.2 - int(h[2:4], 16) / 100
        tops = [{" (": -0.01}, {"A": a, "B": b}]
        return {"choices": [{"index": 0, "text": " (A", "logprobs": {"tokens": [" (", "A"], "top_logprobs": tops}}]}
    text = f" answer {digest(prompt, body.get('seed'))[:10]}."
    return {"choices": [{"index": 0, "text": text, "finish_reason": "stop"}]}


def make_handler(plan: FaultPlan) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            body = json.loads(raw)
            fault = plan.fault_for(digest(raw))
            answer = correct_answer(body)
            if fault is None:
                return self._send(200, json.dumps(answer).encode())
            if fault == "down":
                return self._send(503, b'{"error": {"message": "service unavailable"}}')
            if fault == "500":
                quoted = f" for {self.headers.get('Authorization')}" if plan.quote_key else ""
                return self._send(500, json.dumps({"error": {"message": f"internal error{quoted}"}}).encode())
            if fault == "429":
                return self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0"})
            if fault == "timeout":
                time.sleep(plan.timeout_s + 0.2)
                with contextlib.suppress(OSError):
                    self._send(200, json.dumps(answer).encode())
                return None
            if fault == "truncated":
                payload = json.dumps(answer).encode()
                return self._send(200, payload[: len(payload) // 2], length=len(payload), close=True)
            if fault == "not_json":
                payload = json.dumps(answer).encode()[:-7]
                return self._send(200, payload)
            if fault == "dropped":
                self.close_connection = True
                self.connection.shutdown(2)
                return None
            # wrong_shape: the right envelope without what was asked for
            wrong = {"choices": [{"index": 0, "logprobs": {"tokens": " (A", "top_logprobs": [[" (", -0.1]]}}]}
            return self._send(200, json.dumps(wrong).encode())

        def _send(self, status: int, payload: bytes, headers: dict | None = None, length: int | None = None,
                  close: bool = False) -> None:  # fmt: skip
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(length if length is not None else len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
            if close:
                self.close_connection = True
                self.connection.shutdown(2)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextlib.contextmanager
def fault_server(plan: FaultPlan) -> Iterator[str]:
    """Serve on a free loopback port; yields the base URL (`http://127.0.0.1:PORT/v1`)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(plan))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
