"""The `openai` back end: any OpenAI-compatible server, `/completions` or `/chat/completions`.

vLLM's, llama.cpp's and TGI's servers and hosted APIs all speak one or both. Generation sends one
request per prompt: to `/completions`, or (`endpoint: chat`) to `/chat/completions`, where a prompt
rendered for a chat model travels as its messages and the server applies the template.

Option scoring has two methods, chosen by `scoring` or, with `auto`, by what the server answers:
- `echo`: one `/completions` request per (prompt, option) with `echo` + `logprobs`, summing the
  echoed log-probabilities of the option's tokens, found from the end of the echo by their text
  (exact; vLLM, whose offsets are shifted by its BOS token's string; a server whose echo holds no
  prompt log-probs is not taken for one that echoes). vLLM skips its prefix cache for these;
- `top_logprobs`: one greedy request per prompt for a few answer tokens with their top-k
  log-probabilities, read at the first position where the options part ways (" (A)" and " (B)"
  share " (", so after "(" the next token is "A" or "B"). An option's log-prob there is that of its
  matching tokens; an option missing from the top k gets the lowest log-prob returned at that
  position (the most it could have had). The options' shared tokens are left out: they are the
  same for every option, so normalised option probabilities do not change (llama.cpp's server,
  hosted and chat-only APIs).

This module builds the requests; `answers.py` reads the answers (generated text, log-probs, option
scores) and `transport.py` sends the requests: on a thread pool bounded by `max_concurrency` over
one pooled `httpx.Client`, with transient failures (429, 5xx, timeouts, dropped connections, and
200 answers that are cut short, not JSON, or not in the shape asked for) retried with jittered
exponential backoff; still failing after `max_retries` retries, a request raises `ServiceError`
(one line, exit 1).

The API key is read from an environment variable, sent only in the Authorization header, and kept
out of reprs, logs and error messages.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from constitutional.backends.answers import (
    MalformedAnswer,
    choice_text,
    echoed_option_logprob,
    first_choice,
    option_logprobs_from_top,
    top_logprob_positions,
)
from constitutional.backends.base import Backend, SamplingParams, cut_at_stop
from constitutional.backends.settings import OpenAISettings
from constitutional.backends.transport import RejectedRequest, Transport
from constitutional.errors import ServiceError, UserError

log = logging.getLogger(__name__)

R = TypeVar("R")

# The OpenAI API rejects more than 4 stop strings. The rest are cut client-side only: the server
# keeps generating past them (up to max_tokens), which costs time, not correctness.
MAX_SERVER_STOPS = 4
# A prompt rendered for a chat model: this marker, then its messages as JSON (see apply_chat_template).
CHAT_MESSAGES = "\x00chat-messages:"
# Answer tokens a top_logprobs scoring request asks for: enough to get past "(" to the option letter.
SCORING_TOKENS = 4
# The most top log-probs OpenAI's legacy /completions returns (`logprobs`); vLLM allows 20 and more.
COMPLETIONS_LOGPROBS_LIMIT = 5
# What a refused request's parameter means for a run, for the one-line error (see _hint).
REFUSED_PARAMETERS = {
    "logprobs": "this model gives no log-probabilities, so it cannot score options: use another model as "
    "feedback model or judge",
    "temperature": "this model takes only its default sampling (reasoning models do): use another model for this "
    "role, or set its temperature to the default",
    "top_p": "this model takes only its default sampling (reasoning models do): use another model for this role",
    "echo": "set openai.scoring: top_logprobs",
}


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
        # The HTTP side (the fleet, the client, retries, the key); this class builds and reads requests.
        self._transport = Transport(
            base_url,
            api_key=api_key,
            max_concurrency=max_concurrency,
            timeout_s=timeout_s,
            max_retries=max_retries,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            server_cooldown_s=server_cooldown_s,
        )
        self.model = model
        self.fleet = self._transport.fleet
        self.base_url = self._transport.base_url  # for messages
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.endpoint = endpoint
        self.top_logprobs = top_logprobs
        # What the server's 400s taught (see _learn_limit): sent that way from then on.
        self._chat_takes_max_completion_tokens = False
        self._completions_logprobs_limit = top_logprobs
        # The scoring method in use: fixed by config, or decided by the first scoring call (auto).
        self.scoring_method: str | None = None if scoring == "auto" else scoring
        # Chat answers differ from completions of the same text: the cache must not mix them.
        # A fleet serves one model: its identity does not depend on which server answered.
        servers = "|".join(sorted(server.url for server in self.fleet.servers))
        self.model_id = f"openai:{servers}:{model}" + (":chat" if endpoint == "chat" else "")

    def __repr__(self) -> str:
        # Spelled out so that no attribute holding the key can ever leak into a repr.
        return (
            f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, "
            f"max_concurrency={self.max_concurrency}, authenticated={self._transport.authenticated})"
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
        texts = self._transport.map(lambda body: self._post(body, parse=choice_text), bodies)
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
            flat = self._transport.map(lambda pair: self._score_one(*pair), pairs)
            k = len(options)
            return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]
        return self._transport.map(lambda prompt: self._score_top(prompt, options), list(prompts))

    def _detect_scoring(self, prompt: str, options: Sequence[str]) -> str:
        """`echo` if the server returns echoed prompt log-probs, else `top_logprobs` if it returns those."""
        lacks = []
        if self.endpoint == "completions" and not prompt.startswith(CHAT_MESSAGES):
            try:
                self._score_one(prompt, options[0], probing=True)
                return "echo"
            except (MalformedAnswer, UserError) as error:  # a server down (ServiceError) is not a missing feature
                lacks.append(f"echo ({error})")
        try:
            self._score_top(prompt, options, probing=True)
            return "top_logprobs"
        except (MalformedAnswer, UserError) as error:
            lacks.append(f"top_logprobs ({error})")
        raise UserError(f"the server at {self.base_url} answers neither way of scoring options: " + "; ".join(lacks))

    def close(self) -> None:
        """Close the HTTP client and its pooled connections."""
        self._transport.close()

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

        def parse(data: dict[str, Any]) -> float:
            return echoed_option_logprob(first_choice(data).get("logprobs"), option, self.base_url)

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
            body, parse=lambda data: top_logprob_positions(first_choice(data), self.base_url),
            retry_malformed=not probing,
        )  # fmt: skip
        return option_logprobs_from_top(positions, options, self.base_url)

    def _post(
        self,
        body: dict[str, Any],
        endpoint: str | None = None,
        parse: Callable[[dict[str, Any]], R] | None = None,
        retry_malformed: bool = True,
    ) -> Any:
        """POST one request to `/completions` or `/chat/completions`, retrying transient failures.

        Args:
            body: the JSON request.
            endpoint: "completions" or "chat"; default the back end's.
            parse, retry_malformed: as `Transport.post`, which also says what is retried and raised.

        Returns:
            `parse(answer)`, or the answer's JSON object without `parse`.
        """
        path = "chat/completions" if (endpoint or self.endpoint) == "chat" else "completions"
        body = self._accepted(body, path)
        try:
            return self._transport.post(path, body, parse=parse, retry_malformed=retry_malformed)
        except RejectedRequest as error:
            if not self._learn_limit(error.server_message, body, path):
                raise UserError(f"{error}{_hint(error.server_message)}") from None
            log.warning("%s: %s; sending what it accepts from now on", self.base_url, error.server_message)
        return self._transport.post(path, self._accepted(body, path), parse=parse, retry_malformed=retry_malformed)

    def _accepted(self, body: dict[str, Any], path: str) -> dict[str, Any]:
        """`body` as the server accepts it, after what `_learn_limit` learnt from its 400s."""
        body = dict(body)
        if path == "chat/completions" and self._chat_takes_max_completion_tokens and "max_tokens" in body:
            body["max_completion_tokens"] = body.pop("max_tokens")
        if path == "completions" and isinstance(body.get("logprobs"), int):
            body["logprobs"] = min(body["logprobs"], self._completions_logprobs_limit)
        return body

    def _learn_limit(self, message: str, body: dict[str, Any], path: str) -> bool:
        """Whether a 400's reason names a documented limit that a changed request meets (then remembered).

        OpenAI's chat API takes `max_completion_tokens` instead of `max_tokens` for newer models,
        and its legacy /completions allows `logprobs` up to 5 (chat's `top_logprobs` up to 20).
        """
        text = message.lower()
        # Decided from the body that was refused, so that every thread of a batch refused at once learns it.
        if path == "chat/completions" and "max_completion_tokens" in text and "max_tokens" in body:
            self._chat_takes_max_completion_tokens = True
            return True
        if path == "completions" and "logprobs" in text and body.get("logprobs", 0) > COMPLETIONS_LOGPROBS_LIMIT:
            self._completions_logprobs_limit = COMPLETIONS_LOGPROBS_LIMIT
            return True
        return False


def _hint(server_message: str) -> str:
    """What to change, for a refusal naming a parameter in REFUSED_PARAMETERS ("" if none)."""
    text = server_message.lower()
    for parameter, advice in REFUSED_PARAMETERS.items():
        if re.search(rf"\b{parameter}\b", text):  # quoted or not: llama.cpp says "Only no echo is supported"
            return f" ({advice})"
    return ""


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
    except ServiceError:  # still down after the retries: a service failure (exit 1), not bad input
        raise
    except MalformedAnswer as error:
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
