"""JSONL records and the run directory's bookkeeping (manifest, resume).

Stages talk through files: each appends finished records to `data/<name>.jsonl` and flushes them
to disk at once, so an interrupted stage resumes from what is on disk. A crash can leave at most
one partial last line; `read_records` drops it (it was never a finished record).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from constitutional.errors import UserError

STAGE_STATUSES = ("pending", "running", "done", "failed")
_VERSIONED_PACKAGES = ("constitutional", "torch", "transformers", "trl", "peft", "datasets", "vllm", "httpx")


def read_records(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Read a JSONL file of records.

    Args:
        path: the file.
        repair: drop (and truncate away) a partial last line left by a crash. Only for files this
            program appends to; a user's input file with a bad line is an error.

    Raises:
        UserError: a malformed line, naming file and line number; non-UTF-8 content.
    """
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
        records.append(record)
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


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


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
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunDir:
    """A run directory: config.yaml, manifest.json, data/, models/, eval/, cache/."""

    root: Path

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def data(self, name: str) -> Path:
        """Path of `data/<name>`."""
        return self.root / "data" / name

    def model(self, name: str) -> Path:
        """Path of `models/<name>/`."""
        return self.root / "models" / name

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"stages": {}}
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def stage_status(self, stage: str) -> str:
        return self.read_manifest()["stages"].get(stage, {}).get("status", "pending")

    def update_stage(self, stage: str, **fields: Any) -> None:
        """Merge `fields` into the stage's manifest entry and write the manifest atomically."""
        manifest = self.read_manifest()
        entry = manifest["stages"].setdefault(stage, {"status": "pending"})
        entry.update(fields)
        write_json_atomic(self.manifest_path, manifest)

    def start_stage(self, stage: str, inputs: dict[str, str]) -> None:
        """Mark a stage running, with its input hashes and the package versions."""
        self.update_stage(
            stage, status="running", started=_now(), ended=None, inputs=inputs, versions=package_versions(), error=None
        )

    def finish_stage(self, stage: str, counts: dict[str, Any]) -> None:
        self.update_stage(stage, status="done", ended=_now(), counts=counts)

    def fail_stage(self, stage: str, error: str) -> None:
        self.update_stage(stage, status="failed", ended=_now(), error=error)
