"""The HH-RLHF transcript format (Bai et al. 2022a): turns, prompts and comparisons.

An HH-RLHF transcript is "\\n\\nHuman: ...\\n\\nAssistant: ..." with any number of turns; a
comparison row holds two such transcripts, `chosen` and `rejected`, that share the conversation
up to the last Human turn and differ in the final Assistant reply. `sources.py` reads the rows;
this module splits their text.
"""

from __future__ import annotations

from typing import Any

from constitutional.errors import UserError

Turn = tuple[str, str]  # (role, text), role "human" | "assistant"

HUMAN_MARKER = "\n\nHuman:"
ASSISTANT_MARKER = "\n\nAssistant:"


def parse_transcript(text: str) -> list[Turn]:
    """Split an HH-RLHF transcript into turns.

    Only the exact markers "\\n\\nHuman:" and "\\n\\nAssistant:" start a turn (or "Human:" /
    "Assistant:" at the very start of the text), so a colon inside a turn, or "Human:" in the
    middle of a line, stays part of the text.

    Args:
        text: "\\n\\nHuman: ...\\n\\nAssistant: ...", any number of turns.

    Returns:
        [(role, text), ...] with roles "human" / "assistant", each text stripped.

    Raises:
        ValueError: the text has no marker, or has text before the first one.
    """
    stripped = text.lstrip()
    if stripped.startswith(("Human:", "Assistant:")):
        text = "\n\n" + stripped
    marker = _next_marker(text, 0)
    if marker is None:
        raise ValueError("no 'Human:' or 'Assistant:' turn found")
    if text[: marker[0]].strip():
        raise ValueError("text before the first 'Human:' or 'Assistant:' turn")
    turns: list[Turn] = []
    while marker is not None:
        _, role, text_start = marker
        marker = _next_marker(text, text_start)
        turns.append((role, text[text_start : marker[0] if marker else len(text)].strip()))
    return turns


def _next_marker(text: str, start: int) -> tuple[int, str, int] | None:
    """The first turn marker at or after `start`: (its index, its role, the index after it)."""
    found = []
    for marker, role in ((HUMAN_MARKER, "human"), (ASSISTANT_MARKER, "assistant")):
        index = text.find(marker, start)
        if index >= 0:
            found.append((index, role, index + len(marker)))
    return min(found) if found else None


def prompt_from_transcript(text: str) -> tuple[str, tuple[Turn, ...]]:
    """The conversation up to and including its last Human turn.

    Args:
        text: an HH-RLHF transcript.

    Returns:
        (text of the last Human turn, the turns before it).

    Raises:
        ValueError: the transcript is malformed or has no Human turn.
    """
    turns = parse_transcript(text)
    last = _last_human(turns)
    return turns[last][1], tuple(turns[:last])


def _last_human(turns: list[Turn]) -> int:
    for index in range(len(turns) - 1, -1, -1):
        if turns[index][0] == "human":
            return index
    raise ValueError("transcript has no 'Human:' turn")


def looks_like_transcript(text: str) -> bool:
    """Whether a `prompt` value is an HH transcript rather than a plain prompt.

    A transcript starts with a Human turn and has another turn marker; plain prompts that merely
    mention "Human:" stay plain.
    """
    stripped = text.lstrip()
    return stripped.startswith("Human:") and (HUMAN_MARKER in text or ASSISTANT_MARKER in stripped)


def split_comparison(chosen_text: str, rejected_text: str, where: str) -> dict[str, Any] | None:
    """One comparison from its two transcripts, or None when they differ before the last reply.

    Args:
        chosen_text: the row's `chosen` transcript.
        rejected_text: the row's `rejected` transcript.
        where: "file:LINE", the prefix of any error.

    Returns:
        {"prompt", "history", "chosen", "rejected"}: the last Human turn of `chosen`, the turns
        before it, and the two final replies.

    Raises:
        UserError: a transcript is malformed, or the last Human turn is empty.
    """
    try:
        chosen, rejected = parse_transcript(chosen_text), parse_transcript(rejected_text)
        last = _last_human(chosen)
    except ValueError as error:
        raise UserError(f"{where}: {error}") from None
    context = chosen[: last + 1]
    if rejected[: last + 1] != context:
        return None
    if not context[-1][1]:
        raise UserError(f"{where}: field 'chosen': the last Human turn is empty")
    pair = {
        "prompt": context[-1][1],
        "history": tuple(context[:-1]),
        "chosen": _reply(chosen[last + 1 :]),
        "rejected": _reply(rejected[last + 1 :]),
    }
    return pair


def _reply(turns: list[Turn]) -> str:
    # A few HH rows end in two Assistant turns in a row; together they are the reply being judged.
    return "\n\n".join(text for _, text in turns).strip()
