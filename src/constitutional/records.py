"""JSONL records: reading with line numbers, typed readers per record file, durable appends.

Stages talk through files: each appends finished records to `data/<name>.jsonl` and flushes them
to disk at once, so an interrupted stage resumes from what is on disk. A crash can leave at most
one partial last line; `read_records` drops it (it was never a finished record).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from constitutional.errors import UserError
from constitutional.prompts import PLAIN_LABELS

log = logging.getLogger(__name__)

_VERSIONED_PACKAGES = ("constitutional", "torch", "transformers", "trl", "peft", "datasets", "vllm", "httpx")


def read_records(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Read a JSONL file of records (an absent file reads as no records).

    Args:
        path: the file.
        repair: drop (and truncate away) a partial last line left by a crash. Only for files this
            program appends to; a user's input file with a bad line is an error.

    Raises:
        UserError: a malformed line, naming file and line number; non-UTF-8 content.
    """
    return [record for _, record in numbered_records(path, repair=repair)]


def numbered_records(path: Path, *, repair: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """Like `read_records`, each record with its line number (blank lines are skipped but counted)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if repair and raw and not raw.endswith(b"\n"):
        # The last write was interrupted: everything after the last newline is a partial record.
        keep = raw.rfind(b"\n") + 1
        with path.open("r+b") as handle:
            handle.truncate(keep)
        raw = raw[:keep]
    records = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{path}:{number}: not valid UTF-8") from None
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: invalid JSON: {error.msg}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object per line")
        records.append((number, record))
    return records


def append_records(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Append records, one JSON object per line, and make them durable before returning.

    Returns:
        The number of records written.
    """
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    if not lines:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(lines))
        handle.flush()
        os.fsync(handle.fileno())
    return len(lines)


def write_records_atomic(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace a record file as a whole: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    with _removed_on_failure(temporary):
        append_records(temporary, records)
        temporary.touch()  # an empty record set is an empty file
        os.replace(temporary, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with _removed_on_failure(temporary):
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)


@contextlib.contextmanager
def _removed_on_failure(temporary: Path) -> Iterator[None]:
    """Remove a half-written temporary file if writing it fails (a full disk): the old file stays as it was."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """Hex digest of a file's bytes (input hashes in the manifest)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a run's results."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):  # optional packages (vllm, ...)
            versions[name] = metadata.version(name)
    return versions


# ----------------------------------------------------------------------------- typed readers
# One reader per record file that another stage consumes: each checks the fields its consumers
# need and names file and line, so a hand-edited or truncated file fails before any model loads.


def read_critiques(path: Path) -> list[dict[str, Any]]:
    """`critiques.jsonl`: id, kind (red_team | helpful), prompt, final_response, optional history."""
    records = _checked_records(path, "critique", ("id", "kind", "prompt", "final_response"))
    for number, record in records:
        if record["kind"] not in ("red_team", "helpful"):
            raise UserError(f"{path}:{number}: field 'kind': expected red_team or helpful, got {record['kind']!r}")
    return [record for _, record in records]


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """`pairs.jsonl`: id, prompt, response_a, response_b, optional history."""
    return [record for _, record in _checked_records(path, "pairs", ("id", "prompt", "response_a", "response_b"))]


def read_ai_labels(path: Path) -> list[dict[str, Any]]:
    """`ai_labels.jsonl`: a pair's fields plus principle_id and p_a in [0, 1]."""
    fields = ("id", "prompt", "response_a", "response_b", "principle_id")
    records = _checked_records(path, "feedback", fields)
    for number, record in records:
        p_a = record.get("p_a")
        if isinstance(p_a, bool) or not isinstance(p_a, (int, float)) or not 0 <= p_a <= 1:
            raise UserError(f"{path}:{number}: field 'p_a': expected a probability in [0, 1], got {p_a!r}")
    return [record for _, record in records]


def conversation(record: dict[str, Any]) -> list[tuple[str, str]]:
    """A record's turns up to and including its prompt, as (role, text) pairs."""
    return [(turn["role"], turn["text"]) for turn in record.get("history", [])] + [("human", record["prompt"])]


def _checked_records(path: Path, made_by: str, fields: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """Records with their line numbers, each holding `fields` as strings and a well-formed history.

    Raises:
        UserError: the file is missing (naming the stage that makes it), or a record lacks a field.
    """
    if not path.exists():
        raise UserError(f"{path}: not found; run stage '{made_by}' first")
    records = numbered_records(path)
    for number, record in records:
        for name in fields:
            if name not in record:
                raise UserError(f"{path}:{number}: missing field {name!r}")
            if not isinstance(record[name], str):
                raise UserError(f"{path}:{number}: field {name!r}: expected a string")
        _check_history(record.get("history", []), f"{path}:{number}")
    return records


def _check_history(history: Any, where: str) -> None:
    """`history` is optional: a list of {role, text} turns before the prompt."""
    if not isinstance(history, list):
        raise UserError(f"{where}: field 'history': expected a list of turns")
    for turn in history:
        if not (isinstance(turn, dict) and turn.get("role") in PLAIN_LABELS and isinstance(turn.get("text"), str)):
            raise UserError(f'{where}: field \'history\': expected turns like {{"role": "human", "text": "..."}}')
