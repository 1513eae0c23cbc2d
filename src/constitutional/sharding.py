"""Sharded generation: one stage split across machines (`--shard i/n`), and the merge that checks it.

A generating stage run with `--shard i/n` makes the records of the items whose id hashes to `i`
(of `n`), in its own run directory (each machine has a copy of the run so far). `cai merge`
gathers the shards' record files into one run directory, and merges only when the set is whole:
every shard 0..n-1 present exactly once, each finished with the same settings and inputs, each
record file as long as its manifest says and holding only its own shard's ids, no id twice.
Anything else is named in a one-line error and nothing is merged.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from constitutional.errors import UserError
from constitutional.records import read_records, write_records_atomic
from constitutional.registry import FINISHED_AFTER_MERGE, RECORD_FILES, SHARDABLE, SHARED_FILES, artefacts_made_by
from constitutional.rundir import RunDir, now


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, item_id: str) -> bool:
        """Whether the item with this id belongs to this shard (a stable hash of the id)."""
        return int(hashlib.sha256(item_id.encode("utf-8")).hexdigest()[:12], 16) % self.count == self.index


def parse_shard(text: str) -> Shard:
    """`"2/8"` -> Shard(2, 8).

    Raises:
        UserError: not of the form i/n with 0 <= i < n.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise UserError(f"--shard: expected i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


def merge_shards(target: RunDir, shards: list[RunDir], stage: str) -> dict[str, Any]:
    """Merge `stage`'s record files from `shards` into `target`, after checking the set is whole.

    Args:
        target: the run directory that receives the merged records (may be one of the shards' copies
            of the run, or a new folder).
        shards: the shards' run directories, in any order.
        stage: the stage to merge (one of SHARDABLE).

    Returns:
        The merged stage's counts.

    Raises:
        UserError: naming the missing, doubled, unfinished or inconsistent shard, or the record that
            is out of place; nothing is written then.
    """
    if stage not in SHARDABLE:
        raise UserError(f"cai merge: stage {stage!r} is not sharded (sharded stages: {', '.join(SHARDABLE)})")
    entries = [(run, run.stage_entry(stage)) for run in shards]
    by_index = _check_shard_set(entries, stage)
    first = entries[0][1]
    for run, entry in entries:
        if (entry.get("settings"), entry.get("inputs")) != (first.get("settings"), first.get("inputs")):
            raise UserError(
                f"{run.root}: shard {entry['shard']} of {stage} ran with other settings or inputs than "
                f"{entries[0][0].root}; rerun it with the same config and upstream outputs"
            )
    merged = {artefact: _gathered_records(by_index, artefact) for artefact in _record_artefacts(stage)}
    shared = {artefact: _agreed_file(by_index, artefact, stage) for artefact in SHARED_FILES.get(stage, ())}
    if target.stage_status(stage) == "done":
        raise UserError(f"{target.root}: stage {stage} is already done there; merge into another run directory")
    for artefact, records in {**shared, **merged}.items():
        target.path(artefact).parent.mkdir(parents=True, exist_ok=True)
        write_records_atomic(target.path(artefact), records)
    counts = {
        "records": {artefact: len(records) for artefact, records in merged.items()},
        "merged_from": [str(run.root) for _, (run, _) in sorted(by_index.items())],
    }
    if stage in FINISHED_AFTER_MERGE:
        return counts  # the stage itself finishes on the merged records: `cai run --stages eval`
    target.update_stage(
        stage,
        status="done",
        started=first.get("started"),
        ended=now(),
        settings=first.get("settings"),
        inputs=first.get("inputs"),
        versions=first.get("versions"),
        counts=counts,
        error=None,
    )
    return counts


def _gathered_records(by_index: dict[int, tuple[RunDir, dict]], artefact: str) -> list[dict[str, Any]]:
    """One record file gathered from every shard, in shard order, after checking each record.

    Raises:
        UserError: a file whose length is not what its shard finished with, a record that belongs
            to another shard, or a record id in two files.
    """
    records, seen = [], {}
    for index in sorted(by_index):
        run, entry = by_index[index]
        shard = Shard(index, len(by_index))
        path = run.path(artefact)
        rows = read_records(path) if path.exists() else []
        expected = entry.get("records", {}).get(artefact)
        if expected is not None and len(rows) != expected:
            raise UserError(
                f"{path}: {len(rows)} records, but shard {shard} finished with {expected}: "
                "the file was changed or cut short"
            )
        for row in rows:
            if not shard.holds(shard_key(row)):
                raise UserError(f"{path}: record {row['id']!r} belongs to another shard than {shard}")
            if row["id"] in seen:
                raise UserError(f"{path}: record {row['id']!r} is also in {seen[row['id']]}")
            seen[row["id"]] = str(path)
            records.append(row)
    return records


def _agreed_file(by_index: dict[int, tuple[RunDir, dict]], artefact: str, stage: str) -> list[dict[str, Any]]:
    """The records of a file every shard wrote whole, after checking that all shards wrote the same."""
    first_run = by_index[min(by_index)][0]
    records = read_records(first_run.path(artefact))
    for run, _ in by_index.values():
        if read_records(run.path(artefact)) != records:
            raise UserError(
                f"{run.path(artefact)} differs from {first_run.path(artefact)}: the shards of {stage} "
                "did not start from the same run"
            )
    return records


def _check_shard_set(entries: list[tuple[RunDir, dict[str, Any]]], stage: str) -> dict[int, tuple[RunDir, dict]]:
    """Every shard 0..n-1 exactly once, all of the same n, each done."""
    if not entries:
        raise UserError("cai merge: no shard run directories given")
    by_index: dict[int, tuple[RunDir, dict]] = {}
    counts = set()
    for run, entry in entries:
        if "shard" not in entry:
            raise UserError(f"{run.root}: stage {stage} there was not run with --shard")
        shard = parse_shard(entry["shard"])
        counts.add(shard.count)
        if entry.get("status") != "done":
            raise UserError(f"{run.root}: shard {shard} of {stage} is {entry.get('status')}; run it to the end first")
        if shard.index in by_index:
            raise UserError(f"shard {shard} of {stage} is given twice: {by_index[shard.index][0].root} and {run.root}")
        by_index[shard.index] = (run, entry)
    if len(counts) > 1:
        raise UserError(f"cai merge: the shards of {stage} were split different ways: n = {sorted(counts)}")
    (count,) = counts
    missing = [f"{index}/{count}" for index in range(count) if index not in by_index]
    if missing:
        raise UserError(f"cai merge: shard {', '.join(missing)} of {stage} is missing; nothing merged")
    return by_index


def _record_artefacts(stage: str) -> list[str]:
    """The record files (JSONL) a stage writes."""
    return [name for name in artefacts_made_by(stage) if name in RECORD_FILES]


def shard_key(record: dict[str, Any]) -> str:
    """What decides a record's shard: its `item` (eval: the prompt or MC row it belongs to), else its id."""
    return record.get("item", record["id"])
