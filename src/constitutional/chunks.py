"""The resumable chunk loop every generating stage shares: skip what is on disk, make the rest in chunks.

It lives apart from `records.py` so that reading records needs no back end; this is the one place
where a stage's records and the model that makes them meet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from constitutional.backends.base import Backend
from constitutional.records import append_records, read_records

log = logging.getLogger(__name__)

Item = TypeVar("Item")


def append_in_chunks(
    output: Path,
    items: Sequence[Item],
    item_id: Callable[[Item], str],
    open_model: Callable[[], Backend],
    process: Callable[[Backend, list[Item], Callable[[int], Any]], list[dict[str, Any]]],
    *,
    chunk_size: int,
    desc: str,
    unit: str = "record",
    units: Callable[[Item], int] = lambda item: 1,
    shard: Any = None,
) -> int:
    """Make one record file resumably: skip finished items, open the model, process the rest in chunks.

    Every generating stage runs through here. Records already in `output` (a partial last line
    from a crash is repaired away) are not made again, and the model is not even loaded when
    nothing is left; each chunk's records are appended and fsync'd before the next chunk starts,
    so an interruption loses at most the chunk in flight (and the generation cache makes redoing
    it cheap).

    Args:
        output: the record file.
        items: everything the file should hold a record for, in order.
        item_id: the record id an item turns into.
        open_model: loads the back end (called once, only if there is work; closed at the end).
        process: makes the records of one chunk from (back end, chunk, progress callback taking a
            number of `unit`s done; optional: what it leaves unreported is counted when the chunk
            is finished). It may return fewer records than items: a dropped item is tried again
            on resume.
        chunk_size: items per chunk.
        desc, unit: progress bar label and unit.
        units: how many progress units an item is worth (e.g. generated turns).
        shard: a `sharding.Shard`: only the items whose ids it holds are made (`--shard i/n`).

    Returns:
        The number of items that were still to do.
    """
    if shard is not None:
        items = [item for item in items if shard.holds(item_id(item))]
    done = {record["id"] for record in read_records(output, repair=True)}
    todo = [item for item in items if item_id(item) not in done]
    log.info("%s: %d items, %d already done, %d to go", desc, len(items), len(items) - len(todo), len(todo))
    if not todo:
        return 0
    backend = open_model()
    try:
        _make_chunks(output, todo, backend, process, chunk_size, desc, unit, units)
    finally:
        backend.close()
    return len(todo)


def _make_chunks(
    output: Path, todo: list[Item], backend: Backend, process: Callable[..., list[dict[str, Any]]], chunk_size: int,
    desc: str, unit: str, units: Callable[[Item], int],
) -> None:  # fmt: skip
    """Process `todo` chunk by chunk, appending (and fsyncing) each chunk's records before the next."""
    with tqdm(total=sum(units(item) for item in todo), desc=desc, unit=unit) as bar:
        reported = 0

        def advance(count: int) -> None:
            nonlocal reported
            reported += count
            bar.update(count)

        for start in range(0, len(todo), chunk_size):
            chunk, before = list(todo[start : start + chunk_size]), reported
            append_records(output, process(backend, chunk, advance))
            bar.update(sum(units(item) for item in chunk) - (reported - before))  # what `process` left unsaid
