"""Seeds derived from the run seed and a name, so that results never depend on batching or order.

Every random choice of the pipeline (a sampling seed per generated text, the principles drawn for a
record) comes from sha256 of the run seed and what the choice is for (a record id, a round, a
side). The same config and seed then give the same data whatever the batch size, the chunk size,
the number of resumes or the machine. Python's `hash()` is salted per process, so it is not used.
"""

from __future__ import annotations

import hashlib
import random


def seed_for(seed: int, *parts: str) -> int:
    """A 31-bit sampling seed for one request, e.g. `seed_for(0, record_id, "answer")`.

    Args:
        seed: the run seed.
        parts: what the request is for (record id, round, role, side, ...).

    Returns:
        A non-negative integer below 2**31 (every back end accepts it).
    """
    digest = hashlib.sha256(":".join([str(seed), *parts]).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def rng_for(seed: int, key: str) -> random.Random:
    """A generator for the draws of one item (principle sampling, data splits).

    Only its `random()` method should be used: Python guarantees that sequence across versions,
    not those of `shuffle` or `sample`.
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest, "big"))
