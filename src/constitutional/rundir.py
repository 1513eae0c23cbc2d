"""The run directory: where every artefact of a run lives, who makes it, and the manifest.

```
RUN_DIR/
  config.yaml              the resolved config of the latest run
  manifest.json            per stage: status, times, counts, versions, settings and input fingerprints
  data/critiques.jsonl     critique    data/pairs.jsonl      pairs
  data/ai_labels.jsonl     feedback    data/pm_train.jsonl, data/pm_eval.jsonl   pm
  models/sl-cai/           sl          models/pm/   pm       models/rl-cai/   rl
  eval/pm.json, eval/pm_calibration.png   pm                 eval/metrics.json, eval/report.html   eval
  models/*/README.md       model cards (written by eval; not part of a model's fingerprint)
  checkpoints/<stage>/     training checkpoints (resume only)
  cache/generations.sqlite the generation cache
  previous/<time>/         outputs replaced by `--rerun`, with the config and manifest they came from
```

Every path of a run is named in `registry.py` (with the stage that makes it) and nowhere else;
stages ask `RunDir.path(artefact)`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional.errors import UserError
from constitutional.records import file_sha256, package_versions, write_json_atomic
from constitutional.registry import ARTEFACTS, artefacts_made_by

log = logging.getLogger(__name__)

STAGE_STATUSES = ("pending", "running", "done", "failed")
MODEL_CARD = "README.md"


def now() -> str:
    """The current UTC time, to the second (manifest times)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass
class RunDir:
    """A run directory: its artefacts, the manifest, and the archive of replaced outputs."""

    root: Path
    shard: Any = None  # a sharding.Shard while running a stage with --shard i/n

    # ------------------------------------------------------------------------- paths

    def path(self, artefact: str) -> Path:
        """Where `artefact` (a key of ARTEFACTS, e.g. "pairs") lives."""
        return self.root / ARTEFACTS[artefact].path

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def cache_path(self) -> Path:
        return self.root / "cache" / "generations.sqlite"

    def checkpoints(self, stage: str) -> Path:
        """`checkpoints/<stage>/`: training state, only there to resume an interrupted stage."""
        return self.root / "checkpoints" / stage

    def exists(self) -> bool:
        """Whether a run was ever started here (it has a manifest)."""
        return self.manifest_path.exists()

    # ------------------------------------------------------------------------- manifest

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"stages": {}}
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{self.manifest_path}: not valid JSON; was it edited by hand?") from None

    def stage_entry(self, stage: str) -> dict[str, Any]:
        """The stage's manifest entry ({"status": "pending"} if it never ran)."""
        return self.read_manifest()["stages"].get(stage, {"status": "pending"})

    def stage_status(self, stage: str) -> str:
        return self.stage_entry(stage).get("status", "pending")

    def update_stage(self, stage: str, **fields: Any) -> None:
        """Merge `fields` into the stage's manifest entry and write the manifest atomically."""
        manifest = self.read_manifest()
        entry = manifest["stages"].setdefault(stage, {"status": "pending"})
        entry.update(fields)
        write_json_atomic(self.manifest_path, manifest)

    def start_stage(self, stage: str, settings: dict[str, Any], inputs: dict[str, str], **fields: Any) -> None:
        """Mark a stage running, with the settings and input fingerprints it runs on.

        Args:
            stage: its name.
            settings: every config value it reads, flattened ("feedback.cot": false, ...).
            inputs: fingerprints of what it reads (upstream artefacts, prompt files, models).
            fields: more of the entry, written with it (`shard`, `trust_remote_code`).
        """
        self.update_stage(
            stage,
            status="running",
            started=now(),
            ended=None,
            settings=settings,
            inputs=inputs,
            versions=package_versions(),
            error=None,
            **fields,
        )

    def finish_stage(self, stage: str, counts: dict[str, Any]) -> None:
        """Mark a stage done with its counts and the seconds since it (last) started."""
        ended, started = now(), self.stage_entry(stage).get("started")
        seconds = None
        if started:
            seconds = (_dt.datetime.fromisoformat(ended) - _dt.datetime.fromisoformat(started)).total_seconds()
        # The content of each model folder it made, hashed once now, so that fingerprints survive a
        # copy of the run directory (a copy keeps the bytes, not the modification times).
        content = {
            artefact: folder_content(self.path(artefact))
            for artefact in artefacts_made_by(stage)
            if self.path(artefact).is_dir()
        }
        fields = {"content": content} if content else {}
        self.update_stage(stage, status="done", ended=ended, seconds=seconds, counts=counts, **fields)

    def fail_stage(self, stage: str, error: str) -> None:
        self.update_stage(stage, status="failed", ended=now(), error=error)

    # ------------------------------------------------------------------------- fingerprints

    def fingerprint(self, artefact: str) -> str | None:
        """A fingerprint of an artefact's content (None if it is absent).

        Record files are hashed whole (cheap). A model folder is fingerprinted by its files' names
        and SHA-256s. Those were hashed once, when the stage that made it finished (its manifest
        entry's `content`, with each file's size and modification time): a file whose size and
        time still match is not read again, so no run re-hashes gigabytes of weights, and a copy of
        the run directory, whose times differ, hashes the same. Its model card (README.md, written
        by stage `eval`) is documentation, not the model, and is left out. A folder made before
        contents were recorded keeps its old fingerprint (names, sizes and times).
        """
        path = self.path(artefact)
        if path.is_file():
            return file_sha256(path)[:16]
        if not path.is_dir():
            return None
        recorded = self.stage_entry(ARTEFACTS[artefact].made_by).get("content", {}).get(artefact)
        digest = hashlib.sha256()
        for file in _model_files(path):
            name = str(file.relative_to(path))
            if recorded is None:
                stat = file.stat()
                digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
            else:
                digest.update(f"{name}:{_file_hash(file, recorded.get(name))}\n".encode())
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------------- replacing outputs

    def archive(self, stages: list[str]) -> Path:
        """Move the outputs of `stages` under `previous/<time>/` and mark those stages pending.

        The archive keeps the same relative paths, plus the config and manifest that describe
        them, so a replaced result can be compared with its successor or restored by hand.
        Nothing is deleted.

        Returns:
            The archive folder.
        """
        target = self.root / "previous" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        suffix = 1
        while target.exists():
            target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
            suffix += 1
        target.mkdir(parents=True)
        for name in (self.config_path, self.manifest_path):
            if name.exists():
                shutil.copy2(name, target / name.name)
        for stage in stages:
            paths = [self.path(artefact) for artefact in artefacts_made_by(stage)] + [self.checkpoints(stage)]
            for path in paths:
                for candidate in (path, path.with_name(path.name + ".partial")):
                    if candidate.exists():
                        destination = target / candidate.relative_to(self.root)
                        destination.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(candidate, destination)
        manifest = self.read_manifest()
        for stage in stages:
            manifest["stages"][stage] = {"status": "pending", "archived_to": str(target.relative_to(self.root))}
        write_json_atomic(self.manifest_path, manifest)
        log.info("moved the outputs of %s to %s", ", ".join(stages), target)
        return target


def folder_content(folder: Path) -> dict[str, list[Any]]:
    """{relative path: [size, modification time in ns, SHA-256]} of a model folder's files (README.md aside)."""
    content = {}
    for file in _model_files(folder):
        stat = file.stat()
        content[str(file.relative_to(folder))] = [stat.st_size, stat.st_mtime_ns, file_sha256(file)]
    return content


def _model_files(folder: Path) -> list[Path]:
    return sorted(item for item in folder.rglob("*") if item.is_file() and item.name != MODEL_CARD)


# SHA-256s read in this process, by (path, size, time): a copied run's folders (new times) are read
# once per command, not once per stage that fingerprints them.
_HASHED: dict[tuple[str, int, int], str] = {}


def _file_hash(file: Path, recorded: list[Any] | None) -> str:
    """The file's SHA-256: the recorded one while its size and time are those recorded, else read now."""
    stat = file.stat()
    if recorded is not None and [stat.st_size, stat.st_mtime_ns] == recorded[:2]:
        return recorded[2]
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = file_sha256(file)
    return _HASHED[key]
