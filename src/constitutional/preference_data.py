"""The preference model's training comparisons: one row format, a held-out split by conversation, the mix.

A row is one comparison of two answers in a conversation: `id`, `source` (one of `SOURCES`), `prompt`,
`history` if any, `response_a`, `response_b` and the soft label `p_a`, the probability that A is the
better answer. AI labels (`data/ai_labels.jsonl`, `data/ai_helpfulness.jsonl`) become rows as they
are; a human comparison (chosen/rejected) puts the chosen answer at A or B at random, so its `p_a`
is exactly 1 or 0. Stage `pm` writes the rows to `data/pm_train.jsonl` and `data/pm_eval.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import Any

from constitutional.errors import UserError
from constitutional.records import conversation
from constitutional.seeding import rng_for

SOURCES = ("ai_harmlessness", "human_helpfulness", "ai_helpfulness")


def ai_row(label: dict[str, Any], source: str) -> dict[str, Any]:
    """An AI label (a record of `read_ai_labels`) as a row tagged `source`."""
    row = {"id": label["id"], "source": source, "prompt": label["prompt"]}
    if label.get("history"):
        row["history"] = label["history"]
    row.update(response_a=label["response_a"], response_b=label["response_b"], p_a=float(label["p_a"]))
    return row


def human_row(pair: dict[str, Any], seed: int) -> dict[str, Any]:
    """A human comparison with the chosen answer at A or B at random (seeded by its id): p_a is 1 or 0."""
    chosen_first = rng_for(seed, "pm-order:" + pair["id"]).random() < 0.5
    first, second = (pair["chosen"], pair["rejected"]) if chosen_first else (pair["rejected"], pair["chosen"])
    row = {"id": pair["id"], "source": "human_helpfulness", "prompt": pair["prompt"]}
    if pair["history"]:
        row["history"] = [{"role": role, "text": text} for role, text in pair["history"]]
    row.update(response_a=first, response_b=second, p_a=1.0 if chosen_first else 0.0)
    return row


def split_by_conversation(
    rows: list[dict[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out ceil(eval_fraction x conversations) conversations of each source, chosen by a seeded hash.

    All comparisons of one conversation land in the same split, so the held-out accuracy measures
    conversations the PM never saw.

    Raises:
        UserError: a source with fewer than two conversations (one split would be empty).
    """
    held_out: set[tuple[str, str]] = set()
    for source in SOURCES:
        keys = sorted({conversation_key(row) for row in rows if row["source"] == source})
        if not keys:
            continue
        if len(keys) < 2:
            raise UserError(
                f"pm: only {len(keys)} {source} conversation(s): a held-out split and a training split need at "
                "least two (add prompts or comparisons)"
            )
        keys.sort(key=lambda key: rng_for(seed, "pm-split:" + key).random())
        wanted = min(len(keys) - 1, max(1, math.ceil(eval_fraction * len(keys))))
        held_out.update((source, key) for key in keys[:wanted])
    train = [row for row in rows if (row["source"], conversation_key(row)) not in held_out]
    evaluation = [row for row in rows if (row["source"], conversation_key(row)) in held_out]
    return train, evaluation


def conversation_key(row: dict[str, Any]) -> str:
    """A hash of a row's conversation (history and prompt): equal for two answers to the same conversation."""
    return hashlib.sha256(json.dumps(conversation(row), ensure_ascii=False).encode()).hexdigest()


def mix(rows: list[dict[str, Any]], helpful_fraction: float | None, seed: int) -> list[dict[str, Any]]:
    """Subsample helpfulness rows so they are `helpful_fraction` of the mix (None: keep all), then shuffle.

    With h harmlessness rows, k helpfulness rows make a share k / (h + k) = f when k = f h / (1 - f).
    """
    rng = random.Random(seed)
    harmless = [row for row in rows if row["source"] == "ai_harmlessness"]
    helpful = [row for row in rows if row["source"] != "ai_harmlessness"]
    if helpful_fraction is not None:
        helpful = rng.sample(
            helpful, min(len(helpful), round(helpful_fraction * len(harmless) / (1 - helpful_fraction)))
        )
    mixed = harmless + helpful
    rng.shuffle(mixed)
    return mixed


def count_by_source(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Rows per source, in the order of `SOURCES`, leaving out sources without rows."""
    return {
        source: sum(row["source"] == source for row in rows)
        for source in SOURCES
        if any(row["source"] == source for row in rows)
    }
