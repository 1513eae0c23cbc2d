"""Prompt and preference sources: built-in sets, local files and Hugging Face datasets.

A source is named by a spec string (config keys `data.red_team`, `data.helpful`,
`data.human_preferences`):

- `builtin`: a prompt set shipped in `constitutional/assets/`;
- `hf:<dataset id>` or `hf:<dataset id>:<split>` (default split `train`; a local folder works as
  the id too): loaded with `datasets.load_dataset`;
- a path, relative to the config's folder: `.jsonl`, `.json` (a list of rows), `.csv` (with a
  header row) or `.txt` (one prompt per non-blank line), each optionally gzipped (`.gz`).

Rows are read the same way whatever the container: the first field present of `prompt`,
`chosen` (an HH-RLHF transcript), `instruction` (self-instruct or Alpaca style), `question`,
`text`, `goal` (AdvBench, HarmBench), `Behavior` (HarmBench's CSV), `turns` (a list of user turns,
as in MT-Bench: the first one is the prompt); or the one field a caller names. Prompt ids are
content hashes, so the same prompt from two files gets the same id and duplicates collapse. Every
problem with the input is a one-line `UserError` naming the file and, where there is one, the line.
Files are read line by line (gzip decompressed as it goes): a capped load stops early, and no file
is ever held whole in memory, except a `.json` list, which is parsed as one document.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import zlib
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from constitutional.errors import UserError

log = logging.getLogger(__name__)

Turn = tuple[str, str]  # (role, text), role "human" | "assistant"
Row = Any  # a dict (or, in .json lists and JSONL, a bare string) as read from the source

HUMAN_MARKER = "\n\nHuman:"
ASSISTANT_MARKER = "\n\nAssistant:"
PROMPT_FIELDS = ("prompt", "chosen", "instruction", "question", "text", "goal", "Behavior", "turns")
FILE_TYPES = (".jsonl", ".json", ".csv", ".txt")


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


# --------------------------------------------------------------------------- transcripts


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


def _looks_like_transcript(text: str) -> bool:
    """Whether a `prompt` value is an HH transcript rather than a plain prompt.

    A transcript starts with a Human turn and has another turn marker; plain prompts that merely
    mention "Human:" stay plain.
    """
    stripped = text.lstrip()
    return stripped.startswith("Human:") and (HUMAN_MARKER in text or ASSISTANT_MARKER in stripped)


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
        spec: "builtin", "hf:<dataset id>[:<split>]", or a file path (see the module docstring).
        prefix: id prefix, e.g. "rt" for red-team prompts.
        limit: keep at most this many prompts (the first ones, after de-duplication).
        base_dir: folder that relative paths (and local `hf:` folders) are resolved against.
        builtin: the asset file that "builtin" means, e.g. "red_team_prompts.jsonl".
        field: read the prompt from this field only (default: the first of PROMPT_FIELDS present).
        exclude: prompt texts to skip (e.g. the prompts a model was trained on); skipped prompts
            do not count towards `limit`.

    Returns:
        PromptItems in source order, ids unique (the first of duplicates kept); empty when every
        prompt was excluded.

    Raises:
        UserError: the source is missing or malformed, or holds no prompts.
    """
    _check_limit(limit)
    name, rows = _open_source(spec, Path(base_dir), builtin)
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
    """Load human comparisons in the HH-RLHF format (plain or gzipped JSONL, JSON, CSV, or `hf:`).

    Each row has `chosen` and `rejected` transcripts that share the conversation up to the last
    Human turn and differ in the final Assistant reply. Rows that already hold the pieces
    (`prompt`, plus `chosen` / `rejected` replies) are accepted too.

    Args:
        spec: "hf:<dataset id>[:<split>]" or a file path.
        limit: keep at most this many pairs (the first ones, after de-duplication).
        base_dir: folder that relative paths are resolved against.
        prefix: id prefix.
        builtin: the asset that `builtin` names (None: `builtin` is an error).

    Returns:
        Dicts {"id", "prompt", "history", "chosen", "rejected"}: `history` is a tuple of
        (role, text) turns before the prompt, `chosen` / `rejected` the final replies. Pairs with
        identical replies are kept (they are part of the data); rows whose transcripts differ
        before the final reply are skipped with a warning.

    Raises:
        UserError: the source is missing or malformed, or holds no pairs.
    """
    _check_limit(limit)
    name, rows = _open_source(spec, Path(base_dir), builtin)
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
    field = field or next((name for name in PROMPT_FIELDS if row.get(name) is not None), None)
    if field is None:
        raise UserError(f"{where}: no prompt field (expected one of {', '.join(PROMPT_FIELDS)})")
    if field == "turns":
        return _first_turn(row[field], where), ()
    value = _require_text(row[field], field, where)
    history = _explicit_history(row, where)
    if field == "chosen" or (field == "prompt" and _looks_like_transcript(value)):
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
    if not (isinstance(row, dict) and isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)):
        raise UserError(f"{where}: no chosen/rejected fields (expected HH-RLHF comparison rows)")
    for field in ("chosen", "rejected"):
        if not row[field].strip():
            raise UserError(f"{where}: field {field!r} is empty")
    if row.get("prompt") is not None:
        # Already split: the prompt (a plain prompt or a transcript) and the two replies.
        prompt, history = _prompt_from_row({"prompt": row["prompt"], "history": row.get("history")}, where)
        chosen, rejected = row["chosen"].strip(), row["rejected"].strip()
        return {"prompt": prompt, "history": history, "chosen": chosen, "rejected": rejected}
    try:
        chosen, rejected = parse_transcript(row["chosen"]), parse_transcript(row["rejected"])
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


# --------------------------------------------------------------------------- containers


def _open_source(spec: str, base_dir: Path, builtin: str | None) -> tuple[str, Iterator[tuple[str, Row]]]:
    """Resolve a spec to (a name for messages, an iterator of ("name:LINE", row))."""
    if spec == "builtin":
        if builtin is None:
            raise UserError("'builtin' is not available for this source: give a path or hf:<dataset id>")
        name = f"constitutional/assets/{builtin}"
        try:
            data = resources.files("constitutional").joinpath("assets", builtin).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{name}: no such built-in prompt set") from None
        return name, _rows_from_bytes(data, name, builtin)
    if spec.startswith("hf:"):
        return spec, _hf_rows(spec, base_dir)
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else base_dir / path
    return str(path), _file_rows(path)


def _file_rows(path: Path) -> Iterator[tuple[str, Row]]:
    if not path.is_file():
        raise UserError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    _file_type(path)  # reject an unknown extension before reading anything
    return _rows_from_lines(_decoded_lines(_file_lines(path), str(path)), str(path), path.name)


def _file_lines(path: Path) -> Iterator[bytes]:
    """The file's lines (without their newline), read one at a time: a file of any size is never held whole."""
    if not path.name.lower().endswith(".gz"):
        with path.open("rb") as handle:
            yield from (line.removesuffix(b"\n") for line in handle)
        return
    try:
        with gzip.open(path, "rb") as handle:
            for line in handle:
                yield line.removesuffix(b"\n")
    except (OSError, EOFError, zlib.error) as error:  # gzip's own errors, raised as it decompresses
        raise UserError(f"{path}: not a valid gzip file ({error})") from None


def _file_type(path: Path | str) -> str:
    name = Path(path).name.lower().removesuffix(".gz")
    for suffix in FILE_TYPES:
        if name.endswith(suffix):
            return suffix
    expected = ", ".join(FILE_TYPES)
    raise UserError(f"{path}: unknown file type (expected {expected}, optionally gzipped as .gz)")


def _rows_from_bytes(data: bytes, name: str, filename: str) -> Iterator[tuple[str, Row]]:
    return _rows_from_lines(_decoded_lines(data.split(b"\n"), name), name, filename)


def _rows_from_lines(lines: Iterable[tuple[int, str]], name: str, filename: str) -> Iterator[tuple[str, Row]]:
    """Rows of a file's numbered lines; JSONL, CSV and text stream, a .json list is parsed whole."""
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".txt": _txt_rows}
    return readers[_file_type(filename)](lines, name)


def _decoded_lines(raw_lines: Iterable[bytes], name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line, decoded one at a time so a bad byte is reported by line."""
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            byte = error.object[error.start]
            raise UserError(
                f"{name}:{number}: not valid UTF-8 (byte {byte:#04x} at column {error.start + 1})"
            ) from None
        yield number, line.removeprefix("\ufeff") if number == 1 else line


def _jsonl_rows(lines: Iterable[tuple[int, str]], name: str) -> Iterator[tuple[str, Row]]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{name}:{number}: invalid JSON: {error.msg} (column {error.colno})") from None
        yield f"{name}:{number}", row


def _json_rows(lines: Iterable[tuple[int, str]], name: str) -> Iterator[tuple[str, Row]]:
    text = "\n".join(line for _, line in lines)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{name}:{error.lineno}: invalid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(rows, list):
        raise UserError(f"{name}: expected a JSON list of rows, got {type(rows).__name__}")
    # A parsed list has no line numbers; name the item (1-based) instead.
    for index, row in enumerate(rows, start=1):
        yield f"{name}: item {index}", row


def _csv_rows(lines: Iterable[tuple[int, str]], name: str) -> Iterator[tuple[str, Row]]:
    # Fed line by line: the reader pulls the next line itself for a quoted field that spans lines.
    reader = csv.DictReader(line + "\n" for _, line in lines)
    try:
        for row in reader:
            # line_num is the reader's physical line: right even for quoted multi-line fields.
            yield f"{name}:{reader.line_num}", {key: value for key, value in row.items() if key is not None}
    except csv.Error as error:
        raise UserError(f"{name}:{reader.line_num}: invalid CSV: {error}") from None


def _txt_rows(lines: Iterable[tuple[int, str]], name: str) -> Iterator[tuple[str, Row]]:
    for number, line in lines:
        if line.strip():
            yield f"{name}:{number}", line.strip()


def _hf_rows(spec: str, base_dir: Path) -> Iterator[tuple[str, Row]]:
    """Rows of `hf:<dataset id>[:<split>]`; a local folder (relative to base_dir) works as the id."""
    dataset_id, _, split = spec.removeprefix("hf:").partition(":")
    if not dataset_id:
        raise UserError(f"{spec}: expected hf:<dataset id> or hf:<dataset id>:<split>")
    local = Path(dataset_id).expanduser()
    local = local if local.is_absolute() else base_dir / local
    source = str(local) if local.exists() else dataset_id
    import datasets  # lazy: only hf: sources need it, and it is slow to import

    try:
        dataset = datasets.load_dataset(source, split=split or "train")
    # What loading can meet that is the input's fault or the network's: the library's own errors,
    # files or hub entries missing, unreachable or refused (OSError: the hub's HTTP errors are
    # OSErrors), an unknown split or a column that does not cast (ValueError). Anything else is a bug.
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        raise UserError(f"{spec}: could not load dataset: {message}") from None
    return ((f"{spec} row {index}", row) for index, row in enumerate(dataset, start=1))
