"""A caching wrapper around any back end: a re-run pays nothing twice.

Keys are the model's identity, the prompt, the sampling parameters and the seed (for scoring:
the prompt and the options). Values live in SQLite, committed after every batch, so an
interrupted stage keeps everything it had finished computing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from constitutional.backends.base import Backend, SamplingParams


class CachingBackend(Backend):
    """Wraps `inner`; answers from the cache where it can and asks `inner` only for the rest."""

    def __init__(self, inner: Backend, path: Path):
        self.inner = inner
        self.model_id = inner.model_id
        self.hits = 0
        self.misses = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()

    @property
    def scoring_method(self) -> str | None:
        return self.inner.scoring_method

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        return self.inner.apply_chat_template(messages)

    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None) -> list[str]:
        seeds = list(seeds) if seeds is not None else [0] * len(prompts)
        sampling = dataclasses.asdict(params)
        keys = [self._key("generate", prompt, sampling, seed) for prompt, seed in zip(prompts, seeds)]
        return self._through_cache(
            keys,
            lambda missing: self.inner.generate([prompts[i] for i in missing], params, [seeds[i] for i in missing]),
        )

    def score_options(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        keys = [self._key("score", prompt, list(options)) for prompt in prompts]
        return self._through_cache(
            keys, lambda missing: self.inner.score_options([prompts[i] for i in missing], options)
        )

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            self.inner.close()  # the engine is freed even if the database was not

    def _through_cache(self, keys: list[str], compute: Any) -> list[Any]:
        """Look every key up; compute the misses in one batch call; store them; return in order."""
        found = self._lookup(keys)
        missing = [index for index, key in enumerate(keys) if key not in found]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            values = compute(missing)
            new_entries = {keys[index]: value for index, value in zip(missing, values)}
            self._store(new_entries)
            found.update(new_entries)
        return [found[key] for key in keys]

    def _key(self, *parts: Any) -> str:
        payload = json.dumps([self.model_id, *parts], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _lookup(self, keys: list[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # SQLite limits the number of bound parameters
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT key, value FROM entries WHERE key IN ({marks})", chunk)
                found.update((key, json.loads(value)) for key, value in rows)
        return found

    def _store(self, entries: dict[str, Any]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO entries (key, value) VALUES (?, ?)",
                [(key, json.dumps(value, ensure_ascii=False)) for key, value in entries.items()],
            )
            self._db.commit()
