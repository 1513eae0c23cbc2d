"""Prompt and preference sources: built-in sets, local files and Hugging Face datasets.

A source is named by a spec string (config keys `data.red_team`, `data.helpful`,
`data.human_preferences`):

- `builtin`: a prompt set shipped in `constitutional/assets/`;
- `hf:<dataset id>[:<split>][?name=<config>&data_dir=<folder>&split=<split>&revision=<commit>]`:
  loaded with `datasets.load_dataset` (default split `train`; a local folder works as the id too;
  every option is optional), e.g. `hf:Anthropic/hh-rlhf?data_dir=harmless-base&split=test` (the
  options are described in `source_rows.py`);
- a path, relative to the config's folder: `.jsonl`, `.json` (a list of rows), `.csv` (with a
  header row) or `.txt` (one prompt per non-blank line), each optionally gzipped (`.gz`).

Rows are read the same way whatever the container: the first field present of `prompt`,
`chosen` (an HH-RLHF transcript), `instruction` (self-instruct or Alpaca style), `question`,
`text`, `goal` (AdvBench, HarmBench), `Behavior` (HarmBench's CSV), `turns` (a list of user turns,
as in MT-Bench: the first one is the prompt), and last `messages` (a conversation, below); or the
one field a caller names. Prompt ids are content hashes, so the same prompt from two files gets the
same id and duplicates collapse. Every problem with the input is a one-line `UserError` naming the
file and, where there is one, the line.

Conversational rows hold message lists, `[{"role": "user" | "assistant" | "system", "content":
"..."}, ...]`, in `messages` (chat data), in `prompt` (TRL's conversational prompts), or in
`chosen` / `rejected` (preference data such as HuggingFaceH4/ultrafeedback_binarized, where each is
the whole conversation and its last message the assistant's answer). The prompt is the last user
turn, and the turns before it its history, user turns as "human"; assistant turns after the last
user turn are not part of the prompt. System messages are dropped, wherever they stand: a history
holds only human and assistant turns. In a comparison, `chosen` and `rejected` must end with the
assistant's answer (several assistant messages in a row are joined, as in HH-RLHF); a `prompt`
field is read only when the conversations hold no user turn (TRL's explicit-prompt form), since
UltraFeedback's `prompt` repeats the conversation's last user turn.

Files are read line by line (gzip decompressed as it goes): a capped load stops early, and no file
is ever held whole in memory, except a `.json` list, which is parsed as one document.

The containers are read in `source_rows.py` and HH-RLHF transcripts split in `hh_rlhf.py`; this
module turns their rows into prompts and preference pairs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional.errors import UserError
from constitutional.hh_rlhf import Turn, looks_like_transcript, prompt_from_transcript, split_comparison
from constitutional.source_rows import Row, open_source

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("prompt", "chosen", "instruction", "question", "text", "goal", "Behavior", "turns")
# Read after every PROMPT_FIELDS entry, so rows that have one of those keep their prompt (and id).
MESSAGES_FIELD = "messages"
# Message roles as turn roles; None: dropped (a history has only human and assistant turns).
MESSAGE_ROLES = {"user": "human", "assistant": "assistant", "system": None}


@dataclass(frozen=True)
class PromptItem:
    """One prompt: the last Human turn of a conversation, plus the turns before it.

    Attributes:
        id: `f"{prefix}-{hash}"`, the hash taken over history and prompt, so it is stable across
            runs and machines and equal for equal content.
        prompt: the text of the last Human turn.
        history: earlier turns as (role, text), role "human" or "assistant", oldest first.
    """

    id: str
    prompt: str
    history: tuple[Turn, ...] = ()


# --------------------------------------------------------------------------- public loaders


def load_prompts(
    spec: str,
    *,
    prefix: str,
    limit: int | None = None,
    base_dir: str | Path = ".",
    builtin: str | None = None,
    field: str | None = None,
    exclude: Collection[str] = (),
) -> list[PromptItem]:
    """Load prompts from a built-in set, a local file or a Hugging Face dataset.

    Args:
        spec: "builtin", "hf:<dataset id>[:<split>][?name=..&data_dir=..&split=..&revision=..]",
            or a file path (see the module docstring).
        prefix: id prefix, e.g. "rt" for red-team prompts.
        limit: keep at most this many prompts (the first ones, after de-duplication).
        base_dir: folder that relative paths (and local `hf:` folders) are resolved against.
        builtin: the asset file that "builtin" means, e.g. "red_team_prompts.jsonl".
        field: read the prompt from this field only (default: the first of PROMPT_FIELDS present,
            else `messages`).
        exclude: prompt texts to skip (e.g. the prompts a model was trained on); skipped prompts
            do not count towards `limit`.

    Returns:
        PromptItems in source order, ids unique (the first of duplicates kept); empty when every
        prompt was excluded.

    Raises:
        UserError: the source is missing or malformed, or holds no prompts.
    """
    _check_limit(limit)
    name, rows = open_source(spec, Path(base_dir), builtin)
    items: dict[str, PromptItem] = {}
    excluded = 0
    for where, row in rows:
        if limit is not None and len(items) >= limit:
            break  # stop reading early: large datasets need not be parsed past the cap
        prompt, history = _prompt_from_row(row, where, field)
        if prompt in exclude:
            excluded += 1
            continue
        item = PromptItem(_content_id(prefix, history, prompt), prompt, history)
        items.setdefault(item.id, item)
    if not items and limit != 0 and not excluded:
        raise UserError(f"{name}: no prompts found")
    return list(items.values())


def load_preference_pairs(
    spec: str,
    *,
    limit: int | None = None,
    base_dir: str | Path = ".",
    prefix: str = "pair",
    builtin: str | None = None,
) -> list[dict[str, Any]]:
    """Load human comparisons (plain or gzipped JSONL, JSON, CSV, or `hf:`).

    Each row has `chosen` and `rejected` transcripts that share the conversation up to the last
    Human turn and differ in the final Assistant reply: HH-RLHF text transcripts, or message lists
    whose last message is the assistant's (see the module docstring). Rows that already hold the
    pieces (`prompt`, plus `chosen` / `rejected` replies) are accepted too.

    Args:
        spec: "hf:<dataset id>[:<split>][?name=..&data_dir=..&split=..&revision=..]" or a file path.
        limit: keep at most this many pairs (the first ones, after de-duplication).
        base_dir: folder that relative paths are resolved against.
        prefix: id prefix.
        builtin: the asset that `builtin` names (None: `builtin` is an error).

    Returns:
        Dicts {"id", "prompt", "history", "chosen", "rejected"}: `history` is a tuple of
        (role, text) turns before the prompt, `chosen` / `rejected` the final replies. Pairs with
        identical replies are kept (they are part of the data); rows whose transcripts (or
        conversations) differ before the final reply are skipped with a warning.

    Raises:
        UserError: the source is missing or malformed, or holds no pairs.
    """
    _check_limit(limit)
    name, rows = open_source(spec, Path(base_dir), builtin)
    pairs: dict[str, dict[str, Any]] = {}
    skipped = empty = 0
    for where, row in rows:
        if limit is not None and len(pairs) >= limit:
            break
        pair = _pair_from_row(row, where)
        if pair is None:
            skipped += 1
            continue
        if not (pair["chosen"] and pair["rejected"]):
            # Real HH-RLHF rows sometimes end in an Assistant turn with no text: nothing to compare.
            empty += 1
            continue
        pair["id"] = _content_id(prefix, pair["history"], pair["prompt"], pair["chosen"], pair["rejected"])
        pairs.setdefault(pair["id"], pair)
    if skipped:
        log.warning("%s: skipped %d rows whose chosen and rejected differ before the last reply", name, skipped)
    if empty:
        log.warning("%s: skipped %d rows whose final Assistant reply is empty", name, empty)
    if not pairs and limit != 0:
        raise UserError(f"{name}: no preference pairs found")
    return [{key: pair[key] for key in ("id", "prompt", "history", "chosen", "rejected")} for pair in pairs.values()]


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")


def _content_id(prefix: str, history: tuple[Turn, ...], *texts: str) -> str:
    """A stable id from content: JSON of the parts, so no separator can make two contents collide."""
    payload = json.dumps([[list(turn) for turn in history], *texts], ensure_ascii=False)
    return f"{prefix}-{hashlib.sha256(payload.encode('utf-8')).hexdigest()[:12]}"


# --------------------------------------------------------------------------- rows


def _prompt_from_row(row: Row, where: str, field: str | None = None) -> tuple[str, tuple[Turn, ...]]:
    """(prompt, history) from one row; `where` ("file:LINE") prefixes any error."""
    if isinstance(row, str):
        return _require_text(row, "prompt", where), ()
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object or string, got {type(row).__name__}")
    if field is not None and row.get(field) is None:
        raise UserError(f"{where}: no field {field!r}")
    fields = (*PROMPT_FIELDS, MESSAGES_FIELD)
    field = field or next((name for name in fields if row.get(name) is not None), None)
    if field is None:
        expected = ", ".join(PROMPT_FIELDS)
        raise UserError(f"{where}: no prompt field (expected one of {expected}) nor a '{MESSAGES_FIELD}' list")
    if field == "turns":
        return _first_turn(row[field], where), ()
    history = _explicit_history(row, where)
    if field == MESSAGES_FIELD or (field in ("prompt", "chosen") and isinstance(row[field], list)):
        prompt, earlier = _conversation_prompt(row[field], field, where)
        return prompt, history + earlier
    value = _require_text(row[field], field, where)
    if field == "chosen" or (field == "prompt" and looks_like_transcript(value)):
        prompt, earlier = _transcript_prompt(value, field, where)
        return prompt, history + earlier
    if field == "instruction":
        value = _with_input(value, row)
    return value, history


def _first_turn(turns: Any, where: str) -> str:
    """The first user turn of a `turns` list (MT-Bench style; later turns depend on the answers)."""
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: field 'turns' must be a non-empty list of strings")
    return _require_text(turns[0], "turns[0]", where)


def _require_text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{where}: field '{field}' is empty")
    return value.strip()


def _transcript_prompt(text: str, field: str, where: str) -> tuple[str, tuple[Turn, ...]]:
    try:
        prompt, history = prompt_from_transcript(text)
    except ValueError as error:
        raise UserError(f"{where}: field '{field}': {error}") from None
    if not prompt:
        raise UserError(f"{where}: field '{field}': the last Human turn is empty")
    return prompt, history


def _with_input(instruction: str, row: dict[str, Any]) -> str:
    """Self-instruct keeps an instruction's input in `instances[0].input`, Alpaca in `input`."""
    instances = row.get("instances")
    extra = row.get("input")
    if isinstance(instances, list) and instances and isinstance(instances[0], dict):
        extra = instances[0].get("input") or extra
    if isinstance(extra, str) and extra.strip():
        return f"{instruction}\n\n{extra.strip()}"
    return instruction


def _explicit_history(row: dict[str, Any], where: str) -> tuple[Turn, ...]:
    """A row's optional `history`: [{"role": "human"|"assistant", "text": ...}, ...]."""
    history = row.get("history")
    if history is None:
        return ()
    if not isinstance(history, list):
        raise UserError(f"{where}: field 'history' must be a list of {{role, text}} objects")
    turns = []
    for turn in history:
        valid = isinstance(turn, dict) and turn.get("role") in ("human", "assistant")
        if not (valid and isinstance(turn.get("text"), str)):
            raise UserError(f"{where}: field 'history': each turn needs role 'human' or 'assistant' and a string text")
        turns.append((turn["role"], turn["text"].strip()))
    return tuple(turns)


def _pair_from_row(row: Row, where: str) -> dict[str, Any] | None:
    """One comparison from a row, or None when chosen and rejected differ before the last reply."""
    if not (isinstance(row, dict) and row.get("chosen") is not None and row.get("rejected") is not None):
        raise UserError(f"{where}: no chosen/rejected fields (expected HH-RLHF comparison rows or message lists)")
    if isinstance(row["chosen"], list) or isinstance(row["rejected"], list):
        return _conversation_pair(row, where)
    if not (isinstance(row["chosen"], str) and isinstance(row["rejected"], str)):
        kinds = f"{type(row['chosen']).__name__} and {type(row['rejected']).__name__}"
        raise UserError(
            f"{where}: fields 'chosen' and 'rejected' must be HH-RLHF transcripts (strings) or message lists, "
            f"got {kinds}"
        )
    for field in ("chosen", "rejected"):
        if not row[field].strip():
            raise UserError(f"{where}: field {field!r} is empty")
    if row.get("prompt") is not None:
        # Already split: the prompt (a plain prompt or a transcript) and the two replies.
        prompt, history = _prompt_from_row({"prompt": row["prompt"], "history": row.get("history")}, where)
        chosen, rejected = row["chosen"].strip(), row["rejected"].strip()
        return {"prompt": prompt, "history": history, "chosen": chosen, "rejected": rejected}
    return split_comparison(row["chosen"], row["rejected"], where)


# --------------------------------------------------------------------------- conversations


def _message_turns(messages: Any, field: str, where: str) -> list[Turn]:
    """A message list as turns: "user" becomes "human", "assistant" stays, "system" is dropped."""
    if not isinstance(messages, list):
        raise UserError(
            f"{where}: field '{field}' must be a list of {{role, content}} messages, got {type(messages).__name__}"
        )
    turns = []
    for number, message in enumerate(messages, start=1):
        at = f"{where}: field '{field}' message {number}"
        if not isinstance(message, dict):
            raise UserError(f"{at}: expected a {{role, content}} object, got {type(message).__name__}")
        if not (isinstance(message.get("role"), str) and message["role"] in MESSAGE_ROLES):
            raise UserError(f"{at}: role {message.get('role')!r} (expected 'user', 'assistant' or 'system')")
        if not isinstance(message.get("content"), str):
            raise UserError(f"{at}: 'content' must be a string, got {type(message.get('content')).__name__}")
        role = MESSAGE_ROLES[message["role"]]
        if role is not None:
            turns.append((role, message["content"].strip()))
    return turns


def _split_at_last_user(turns: list[Turn]) -> tuple[list[Turn], list[Turn]]:
    """(the turns up to and including the last human turn, the turns after it); ([], turns) without one."""
    last = max((index for index, (role, _) in enumerate(turns) if role == "human"), default=-1)
    return turns[: last + 1], turns[last + 1 :]


def _conversation_prompt(messages: Any, field: str, where: str) -> tuple[str, tuple[Turn, ...]]:
    """(the last user turn, the turns before it) of a message list."""
    context, _ = _split_at_last_user(_message_turns(messages, field, where))
    if not context:
        raise UserError(f"{where}: field '{field}': no user turn")
    if not context[-1][1]:
        raise UserError(f"{where}: field '{field}': the last user turn is empty")
    return context[-1][1], tuple(context[:-1])


def _conversation_pair(row: dict[str, Any], where: str) -> dict[str, Any] | None:
    """A comparison of two message lists, or None when they differ before the assistant's answer."""
    sides = []
    for field in ("chosen", "rejected"):
        turns = _message_turns(row[field], field, where)
        if not turns or turns[-1][0] != "assistant":
            found = "it has no user or assistant messages" if not turns else "it ends with a user turn"
            raise UserError(f"{where}: field '{field}': the last message must be the assistant's answer ({found})")
        sides.append(_split_at_last_user(turns))
    (context, chosen), (other, rejected) = sides
    if context != other:
        return None
    if context:
        if not context[-1][1]:
            raise UserError(f"{where}: field 'chosen': the last user turn is empty")
        prompt, history = context[-1][1], tuple(context[:-1])
    elif row.get("prompt") is not None:
        # TRL's explicit-prompt form: the prompt apart, chosen and rejected only the answers.
        prompt, history = _prompt_from_row({"prompt": row["prompt"], "history": row.get("history")}, where)
    else:
        raise UserError(f"{where}: field 'chosen': no user turn (and no 'prompt' field)")
    return {"prompt": prompt, "history": history, "chosen": _joined(chosen), "rejected": _joined(rejected)}


def _joined(turns: list[Turn]) -> str:
    # Several assistant messages after the last user turn are together the reply being judged.
    return "\n\n".join(text for _, text in turns).strip()
