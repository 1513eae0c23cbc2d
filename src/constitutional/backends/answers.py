"""Reading an OpenAI-compatible server's answers: generated text, echoed and top-k log-probabilities.

Pure functions of the answer's JSON (no HTTP here): the generated text of a `/completions` or
`/chat/completions` answer, the summed log-probability of an echoed option (the `echo` scoring
method) and each option's log-prob from the top-k alternatives of a greedy answer (the
`top_logprobs` method; see `constitutional.backends.openai`). An answer that lacks what was asked
for raises `MalformedAnswer`, which the transport retries (or, while probing, reports at once); one
in a layout this client cannot read, which a server answers the same every time, raises
`UserError` (one line naming the server and the setting to change).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from constitutional.errors import UserError

log = logging.getLogger(__name__)

# Server error text quoted in our messages is cut to this many characters (one readable line).
MAX_ERROR_CHARS = 300


class MalformedAnswer(RuntimeError):
    """The server answered 200, but not in the shape of a completions answer (or without what was asked)."""


class UnreadableAnswer(MalformedAnswer):
    """A 200 whose body is not a JSON object: a transport accident, never a missing capability."""


def first_choice(data: dict[str, Any]) -> dict[str, Any]:
    """`choices[0]` of a completions response, or a MalformedAnswer saying what is missing."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedAnswer(f"completions response has no choices: {one_line(json.dumps(data))!r}")
    return choices[0]


def choice_text(data: dict[str, Any]) -> str:
    """The generated text of a completions (`text`) or chat (`message.content`) response.

    A chat answer whose `content` is null is not a transport accident, so it is not retried: a
    model's refusal (`message.refusal`) is its answer; a reasoning model that spent the whole
    token budget before answering (`finish_reason: length`) gives the empty answer it gave; any
    other null (tool calls, for instance) is a UserError.
    """
    choice = first_choice(data)
    if isinstance(choice.get("text"), str):
        return choice["text"]
    message = choice.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return message["content"]
    if isinstance(message, dict) and "content" in message and message["content"] is None:
        if isinstance(message.get("refusal"), str):
            return message["refusal"]
        if choice.get("finish_reason") in ("length", "content_filter"):
            # Out of tokens (a reasoning model may spend them all), or withheld by a hosted filter: no answer.
            log.warning("a chat answer has no text (finish_reason %s)", choice.get("finish_reason"))
            return ""
        raise UserError(
            f"a chat answer has no text (finish_reason {choice.get('finish_reason')!r}): the model answered "
            f"with something other than text: {one_line(json.dumps(message))!r}"
        )
    raise MalformedAnswer(f"response has no generated text: {one_line(json.dumps(data))!r}")


def top_logprob_positions(choice: dict[str, Any], base_url: str) -> list[tuple[str, dict[str, float]]]:
    """(greedy token, {top token: log-prob}) per generated position, from either response format.

    /completions: `logprobs.tokens` and `logprobs.top_logprobs` (a dict per position); chat:
    `logprobs.content` (each with `token` and a `top_logprobs` list of {token, logprob}).
    """
    try:
        positions = _top_positions(choice.get("logprobs"))
    except (KeyError, TypeError, ValueError, AttributeError) as error:  # a field missing or not a number
        raise MalformedAnswer(
            f"the server at {base_url} returned top log-probabilities in an unexpected shape "
            f"({type(error).__name__}: {error}): {one_line(json.dumps(choice.get('logprobs')))!r}"
        ) from None
    if not positions:
        raise MalformedAnswer(
            f"the server at {base_url} returned no top log-probabilities: option scoring needs `echo` with "
            "`logprobs` on /completions, or `logprobs` with top-k alternatives on the generated tokens"
        )
    return positions


def _top_positions(logprobs: Any) -> list[tuple[str, dict[str, float]]]:
    positions: list[tuple[str, dict[str, float]]] = []
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


def echoed_option_logprob(logprobs: Any, option: str, base_url: str) -> float:
    """Sum the echoed log-probs of the tokens that spell `option` at the end of the echoed prompt.

    An echo answer lists the tokens of prompt + option, then the one generated token. The option's
    tokens are found from the end, by their text: real servers' `text_offset` cannot be trusted
    (vLLM adds up individually decoded token lengths from a first BOS token whose string, "<s>" or
    "<bos>", is not in the echoed text, so every offset is shifted). A token that straddles the
    prompt's end and the option's start (tokenisation may merge "?" and " (") is included.

    Args:
        logprobs: `choices[0]["logprobs"]` of an echo request (`tokens`, `token_logprobs`).
        option: the option text, the end of the echoed prompt.
        base_url: named in the error messages.

    Returns:
        The summed log-probability of the option's tokens.

    Raises:
        MalformedAnswer: no log-probs at all (possibly transient: retried).
        UserError: the server does not really echo (only the generated token has a log-prob), or
            its tokens do not spell the option: a layout this client cannot read, the same every time.
    """
    tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(values, list) or not values:
        raise MalformedAnswer(
            f"the server at {base_url} returned no prompt log-probabilities: option scoring needs a "
            "server that supports `echo: true` with `logprobs` on /completions (vLLM does)"
        )
    fix = "set openai.scoring: top_logprobs"
    # The first prompt token has nothing to condition on: a server that echoes gives it None.
    if len(values) < 2 or values[0] is not None:
        raise UserError(
            f"the server at {base_url} does not echo the prompt's log-probabilities (it returned "
            f"{len(values)} log-prob(s), the first {values[0]!r}, not None): {fix}"
        )
    if not isinstance(tokens, list) or len(tokens) != len(values) or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"the server at {base_url} echoed log-probabilities without their token strings: {fix}")
    for generated in (1, 0):  # the one generated token comes last; a server may leave it out
        echoed = tokens[: len(tokens) - generated]
        if "".join(echoed).endswith(option):
            break
    else:
        raise UserError(
            f"the server at {base_url} echoed tokens that do not end with the option {option!r} "
            f"(last tokens {tokens[-6:]!r}): its log-prob layout cannot be read: {fix}"
        )
    total, remaining = 0.0, len(option)
    for index in range(len(echoed) - 1, 0, -1):
        if remaining <= 0:
            break
        if not isinstance(values[index], (int, float)):
            raise UserError(f"the server at {base_url} returned {values[index]!r} for echoed token {index}: {fix}")
        total += float(values[index])
        remaining -= len(echoed[index])
    if remaining > 0:  # the option reaches back to the first token, which has no log-prob
        raise UserError(f"the server at {base_url} echoed the option {option!r} as the whole prompt: nothing to score")
    return total


def one_line(text: str) -> str:
    """Collapse whitespace and truncate to MAX_ERROR_CHARS."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."
