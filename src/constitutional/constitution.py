"""The constitution: the principles that steer critiques, revisions and AI feedback.

A constitution holds two lists of principles and the few-shot examples that show a base model
how to use them (Bai et al. 2022, sections 3 and 4):

- critique principles, each a pair of instructions: a critique request ("find what is wrong
  with the last answer") and a revision request ("rewrite it to fix that"); the `critique`
  stage samples a fresh one for each round;
- feedback principles, each a question asking which of two answers is better; the `feedback`
  stage samples one per comparison and appends the options.

It loads from three places, chosen by the config key `constitution`:

- `default`: the project's own constitution, `constitutional/assets/constitution.yaml`;
- a `.yaml`/`.yml` file in that same format (see the asset for an annotated example);
- a folder holding the paper's published JSON files (CritiqueRevisionInstructions.json,
  RLMadisonInstructions.json and, optionally, the three few-shot files), read as they are.

Whatever the source, texts come out in one normal form: no turn markers ("CritiqueRequest:",
"Revision:", "Options:"), no surrounding whitespace; renderers in `prompts.py` add the markers.

This module holds the entry points and our YAML format; the types and the normal form are in
`principles.py`, the reader of the paper's JSON files in `paper_constitution.py`.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from constitutional.errors import UserError, invalid_yaml
from constitutional.paper_constitution import from_paper_folder

# The types live in principles.py; they are re-exported here (see __all__) because stages,
# comparisons and callers outside the package import them from this module.
from constitutional.principles import (
    Constitution,
    CritiquePrinciple,
    FeedbackExample,
    FeedbackPrinciple,
    checked,
    decode_utf8,
    fewshot_transcript,
    question_text,
    request_text,
)
from constitutional.seeding import rng_for

__all__ = [
    "DEFAULT_ASSET",
    "Constitution",
    "CritiquePrinciple",
    "FeedbackExample",
    "FeedbackPrinciple",
    "load_constitution",
    "sample_principles",
]

T = TypeVar("T")

DEFAULT_ASSET = "assets/constitution.yaml"
# Our YAML format: the two principle lists are required, everything else optional.
_YAML_KEYS = {
    "name",
    "critique_principles",
    "feedback_principles",
    "helpfulness_principles",
    "critique_fewshot",
    "feedback_fewshot",
    "cot_fewshot",
}


# ----------------------------------------------------------------------------- entry points


def load_constitution(spec: str, base_dir: str | Path = ".") -> Constitution:
    """Load and validate a constitution.

    Args:
        spec: "default" (the packaged constitution), a path to a .yaml/.yml file in our format,
            or a path to a folder of the paper's JSON files.
        base_dir: where relative paths are resolved (the config file's folder, usually).

    Returns:
        The validated constitution.

    Raises:
        UserError: the path is missing or of the wrong kind, a file is not UTF-8 or not valid
            YAML/JSON, a key is unknown, a principle lacks its id or text, ids repeat, or a
            principle list is empty. The one-line message names the file and the key or index.
    """
    if spec == "default":
        data = resources.files("constitutional").joinpath(DEFAULT_ASSET).read_bytes()
        return _from_yaml(data, f"constitutional/{DEFAULT_ASSET}", source="default", default_name="default")
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if path.is_dir():
        return from_paper_folder(path)
    if not path.exists():
        raise UserError(f"constitution: no such file or folder: {path}")
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise UserError(f"constitution: {path} is neither a .yaml/.yml file nor a folder of the paper's JSON files")
    return _from_yaml(path.read_bytes(), str(path), source=str(path), default_name=path.stem)


def sample_principles(principles: Sequence[T], k: int, seed: int, key: str) -> list[T]:
    """Pick `k` principles for one item, seeded and uniform.

    The first len(principles) picks are without replacement, so every critique round of a
    prompt gets a fresh principle; beyond that, further independent shuffles of the whole list
    are appended. Every principle is equally likely at every position.

    The generator comes from `seeding.rng_for(seed, key)` and only its `random()` method is used,
    whose sequence Python guarantees across versions: the same seed and key give the same
    principles on any machine.

    Args:
        principles: the list to draw from.
        k: how many to draw (0 or more).
        seed: the run seed.
        key: what the draw is for, usually the record id.

    Returns:
        `k` principles, in draw order.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k and not principles:
        raise ValueError("cannot sample from an empty list of principles")
    rng = rng_for(seed, key)
    chosen: list[T] = []
    while len(chosen) < k:
        chosen.extend(_shuffled(principles, rng))
    return chosen[:k]


def _shuffled(items: Sequence[T], rng: random.Random) -> list[T]:
    """Fisher-Yates on `rng.random()`: `random.shuffle`'s output may change between Python versions."""
    order = list(items)
    for i in range(len(order) - 1, 0, -1):
        j = min(int(rng.random() * (i + 1)), i)
        order[i], order[j] = order[j], order[i]
    return order


# ----------------------------------------------------------------------------- our YAML format


def _from_yaml(data: bytes, where: str, source: str, default_name: str) -> Constitution:
    """Build a constitution from the bytes of a YAML file in our format.

    Args:
        data: the file's raw bytes.
        where: how error messages name the file.
        source: recorded in `Constitution.source`.
        default_name: the name used when the file has no `name:`.

    Returns:
        The validated constitution.
    """
    doc = _parse_yaml(decode_utf8(data, where), where)
    unknown = sorted(map(str, set(doc) - _YAML_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (expected one of {', '.join(sorted(_YAML_KEYS))})")
    name = doc.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{where}: name must be a non-empty string")
    constitution = Constitution(
        name=name.strip(),
        critique_principles=_yaml_critique_principles(doc, where),
        feedback_principles=_yaml_feedback_principles(doc, where),
        critique_fewshot=tuple(fewshot_transcript(text) for text in _strings(doc, "critique_fewshot", where)),
        feedback_fewshot=_yaml_feedback_examples(doc, where),
        cot_fewshot=tuple(_strings(doc, "cot_fewshot", where)),
        source=source,
        helpfulness_principles=_yaml_principles(doc, "helpfulness_principles", where)
        if "helpfulness_principles" in doc
        else (),
    )
    return checked(constitution, defaultdict(lambda: where))  # every field comes from this one file


def _yaml_critique_principles(doc: dict[str, Any], where: str) -> tuple[CritiquePrinciple, ...]:
    """`critique_principles`: entries with `id`, `critique` and `revision`."""
    principles = []
    for i, item in enumerate(_entries(doc, "critique_principles", where, {"id", "critique", "revision"})):
        at = f"critique_principles[{i}]"
        principles.append(
            CritiquePrinciple(
                id=_text(item, "id", where, at),
                critique_request=request_text(_text(item, "critique", where, at), "CritiqueRequest", "Critique"),
                revision_request=request_text(_text(item, "revision", where, at), "RevisionRequest", "Revision"),
            )
        )
    return tuple(principles)


def _yaml_feedback_principles(doc: dict[str, Any], where: str) -> tuple[FeedbackPrinciple, ...]:
    """`feedback_principles`: entries with `id` and `text` (the question)."""
    return _yaml_principles(doc, "feedback_principles", where)


def _yaml_principles(doc: dict[str, Any], key: str, where: str) -> tuple[FeedbackPrinciple, ...]:
    """Multiple-choice principles under `key`: entries with `id` and `text` (the question)."""
    return tuple(
        FeedbackPrinciple(
            id=_text(item, "id", where, f"{key}[{i}]"), text=question_text(_text(item, "text", where, f"{key}[{i}]"))
        )
        for i, item in enumerate(_entries(doc, key, where, {"id", "text"}))
    )


def _yaml_feedback_examples(doc: dict[str, Any], where: str) -> tuple[FeedbackExample, ...]:
    """`feedback_fewshot`: entries with `conversation`, `better` and `worse`."""
    fields = ("conversation", "better", "worse")
    return tuple(
        FeedbackExample(*(_text(item, field, where, f"feedback_fewshot[{i}]") for field in fields))
        for i, item in enumerate(_entries(doc, "feedback_fewshot", where, set(fields)))
    )


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    """Parse YAML into a mapping; PyYAML's multi-line messages are folded into one line (`invalid_yaml`)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise invalid_yaml(where, error) from None
    if not isinstance(doc, dict):
        raise UserError(f"{where}: expected a mapping with critique_principles and feedback_principles")
    return doc


def _entries(doc: dict[str, Any], key: str, where: str, fields: set[str]) -> list[dict[str, Any]]:
    """The list under `key` (empty when absent), each entry a mapping with only known `fields`."""
    items = doc.get(key) or []
    if not isinstance(items, list):
        raise UserError(f"{where}: {key} must be a list")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserError(f"{where}: {key}[{i}] must be a mapping with keys {', '.join(sorted(fields))}")
        unknown = sorted(map(str, set(item) - fields))
        if unknown:
            expected = ", ".join(sorted(fields))
            raise UserError(f"{where}: {key}[{i}]: unknown key {unknown[0]!r} (expected {expected})")
    return items


def _strings(doc: dict[str, Any], key: str, where: str) -> list[str]:
    """The list of non-empty strings under `key`, stripped (empty when absent)."""
    items = doc.get(key) or []
    if not isinstance(items, list):
        raise UserError(f"{where}: {key} must be a list of strings")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise UserError(f"{where}: {key}[{i}] must be a non-empty string")
    return [item.strip() for item in items]


def _text(item: dict[str, Any], field: str, where: str, at: str) -> str:
    """A required non-empty string field of one entry, stripped."""
    value = item.get(field)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {at}: missing or empty {field!r} (a non-empty string)")
    return value.strip()
