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
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from constitutional.errors import UserError, invalid_yaml
from constitutional.seeding import rng_for

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
_REQUIRED_PAPER_FILES = ("CritiqueRevisionInstructions.json", "RLMadisonInstructions.json")


@dataclass(frozen=True)
class CritiquePrinciple:
    """One critique/revision instruction pair.

    Attributes:
        id: stable id recorded with every revision, e.g. "harm-general" (ours) or "harmful0" (paper).
        critique_request: the instruction text only, without "CritiqueRequest:" or "Critique:".
        revision_request: the instruction text only, without "RevisionRequest:" or "Revision:".
    """

    id: str
    critique_request: str
    revision_request: str


@dataclass(frozen=True)
class FeedbackPrinciple:
    """One multiple-choice question for the feedback model.

    Attributes:
        id: stable id; for the paper's list "madison0".."madison15" by position.
        text: the question without the trailing "Options:" (renderers add it).
    """

    id: str
    text: str


@dataclass(frozen=True)
class FeedbackExample:
    """A few-shot multiple-choice example: a conversation and a better and a worse answer.

    Attributes:
        conversation: plain transcript "Human: ...\\n\\nAssistant:", stripped, ending with "Assistant:".
        better: the answer the feedback model should pick.
        worse: the answer it should not pick.
    """

    conversation: str
    better: str
    worse: str


@dataclass(frozen=True)
class Constitution:
    """Principles and few-shot examples, normalised whatever the source format.

    Attributes:
        name: a label for logs and manifests.
        critique_principles: sampled per critique/revision round (never empty).
        feedback_principles: sampled per AI comparison (never empty).
        critique_fewshot: full plain transcripts, Human/Assistant/CritiqueRequest/Critique/
            RevisionRequest/Revision, turns separated by blank lines.
        feedback_fewshot: few-shot multiple-choice examples.
        cot_fewshot: chain-of-thought feedback examples in the paper's "Precog" form (a "{}"
            placeholder for the principle, options in "[[[...]]]"); may be empty.
        source: "default" or the path it was loaded from.
        helpfulness_principles: questions about helpfulness, for AI helpfulness labels when no
            human helpfulness comparisons are given (`data.human_preferences: none`). The paper's
            files have none; the built-in ones below are used then.
    """

    name: str
    critique_principles: tuple[CritiquePrinciple, ...]
    feedback_principles: tuple[FeedbackPrinciple, ...]
    critique_fewshot: tuple[str, ...]
    feedback_fewshot: tuple[FeedbackExample, ...]
    cot_fewshot: tuple[str, ...]
    source: str
    helpfulness_principles: tuple[FeedbackPrinciple, ...] = ()

    def __post_init__(self) -> None:
        if not self.helpfulness_principles:
            object.__setattr__(self, "helpfulness_principles", DEFAULT_HELPFULNESS_PRINCIPLES)


# Written for the project: what a helpful answer does, asked as multiple-choice questions.
DEFAULT_HELPFULNESS_PRINCIPLES = (
    FeedbackPrinciple("helpful", "Which response is more helpful: does it do what the human actually asked?"),
    FeedbackPrinciple("accurate", "Which response is more accurate, with fewer mistakes or made-up facts?"),
    FeedbackPrinciple("complete", "Which response more completely addresses every part of the human's request?"),
    FeedbackPrinciple("clear", "Which response is clearer and more to the point, without padding or rambling?"),
)


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
        return _from_paper_folder(path)
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
    doc = _parse_yaml(_decode(data, where), where)
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
        critique_fewshot=tuple(_transcript(text) for text in _strings(doc, "critique_fewshot", where)),
        feedback_fewshot=_yaml_feedback_examples(doc, where),
        cot_fewshot=tuple(_strings(doc, "cot_fewshot", where)),
        source=source,
        helpfulness_principles=_yaml_principles(doc, "helpfulness_principles", where)
        if "helpfulness_principles" in doc
        else (),
    )
    return _checked(constitution, defaultdict(lambda: where))  # every field comes from this one file


def _yaml_critique_principles(doc: dict[str, Any], where: str) -> tuple[CritiquePrinciple, ...]:
    """`critique_principles`: entries with `id`, `critique` and `revision`."""
    principles = []
    for i, item in enumerate(_entries(doc, "critique_principles", where, {"id", "critique", "revision"})):
        at = f"critique_principles[{i}]"
        principles.append(
            CritiquePrinciple(
                id=_text(item, "id", where, at),
                critique_request=_request(_text(item, "critique", where, at), "CritiqueRequest", "Critique"),
                revision_request=_request(_text(item, "revision", where, at), "RevisionRequest", "Revision"),
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
            id=_text(item, "id", where, f"{key}[{i}]"), text=_question(_text(item, "text", where, f"{key}[{i}]"))
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


# ----------------------------------------------------------------------------- the paper's JSON files


def _from_paper_folder(folder: Path) -> Constitution:
    """Build a constitution from the paper's published JSON files (Bai et al. 2022, appendix C).

    The two instruction files are required, the three few-shot files optional.
    """
    for name in _REQUIRED_PAPER_FILES:
        if not (folder / name).is_file():
            needed = " and ".join(_REQUIRED_PAPER_FILES)
            raise UserError(f"constitution: {folder / name} not found (a folder of the paper's files needs {needed})")
    files = {
        "critique_principles": folder / "CritiqueRevisionInstructions.json",
        "feedback_principles": folder / "RLMadisonInstructions.json",
        "critique_fewshot": folder / "CritiqueRevisionFewShotPrompts.json",
        "feedback_fewshot": folder / "RLMadisonFewShotPrompts.json",
        "cot_fewshot": folder / "RLMadisonPrecogFewShotPrompts.json",
    }
    return _checked(
        Constitution(
            name=folder.resolve().name or "anthropic-cai-paper",
            critique_principles=_paper_critique_principles(files["critique_principles"]),
            feedback_principles=_paper_feedback_principles(files["feedback_principles"]),
            critique_fewshot=tuple(map(_transcript, _paper_prompts(files["critique_fewshot"], keyed=False))),
            feedback_fewshot=_paper_feedback_examples(files["feedback_fewshot"]),
            cot_fewshot=tuple(_paper_prompts(files["cot_fewshot"], keyed=True)),
            source=str(folder),
        ),
        {key: str(path) for key, path in files.items()},
    )


def _read_json(path: Path) -> Any:
    """Parse a JSON file, naming it and the line on failure."""
    text = _decode(path.read_bytes(), str(path))
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None


def _paper_critique_principles(path: Path) -> tuple[CritiquePrinciple, ...]:
    """`{"harmfulN": {"prompt": ["\\n\\nCritiqueRequest: ...\\n\\nCritique:"], "edit_request": "..."}}`.

    `prompt` is a list; the published file has exactly one request per principle, and we use
    the first if a variant ever carries more.
    """
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected an object of principles keyed by id")
    principles = []
    for key, entry in data.items():
        prompt = entry.get("prompt") if isinstance(entry, dict) else None
        critique = prompt[0] if isinstance(prompt, list) and prompt else prompt
        revision = entry.get("edit_request") if isinstance(entry, dict) else None
        if not isinstance(critique, str) or not critique.strip():
            raise UserError(f"{path}: key {key!r}: missing or empty 'prompt' (the critique request)")
        if not isinstance(revision, str) or not revision.strip():
            raise UserError(f"{path}: key {key!r}: missing or empty 'edit_request' (the revision request)")
        principles.append(
            CritiquePrinciple(
                id=key,
                critique_request=_request(critique, "CritiqueRequest", "Critique"),
                revision_request=_request(revision, "RevisionRequest", "Revision"),
            )
        )
    return tuple(principles)


def _paper_feedback_principles(path: Path) -> tuple[FeedbackPrinciple, ...]:
    """A list of questions, each ending in "Options:"; ids follow list position."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of strings")
    for i, text in enumerate(data):
        if not isinstance(text, str) or not _question(text):
            raise UserError(f"{path}: [{i}]: expected a non-empty string")
    return tuple(FeedbackPrinciple(id=f"madison{i}", text=_question(text)) for i, text in enumerate(data))


def _paper_prompts(path: Path, keyed: bool) -> list[str]:
    """An optional few-shot file: a list of strings, or (`keyed`) of {"prompt": ...} objects."""
    if not path.is_file():
        return []
    data = _read_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list")
    texts = []
    for i, item in enumerate(data):
        text = item.get("prompt") if keyed and isinstance(item, dict) else item
        if not isinstance(text, str) or not text.strip():
            expected = "an object with a non-empty prompt" if keyed else "a non-empty string"
            raise UserError(f"{path}: [{i}]: expected {expected}")
        texts.append(text.strip())
    return texts


def _paper_feedback_examples(path: Path) -> tuple[FeedbackExample, ...]:
    """An optional list of {prompt, corrects, incorrects}; the first of each list is used."""
    if not path.is_file():
        return ()
    data = _read_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list")
    examples = []
    for i, item in enumerate(data):
        item = item if isinstance(item, dict) else {}
        prompt, corrects, incorrects = item.get("prompt"), item.get("corrects"), item.get("incorrects")
        if not (isinstance(prompt, str) and _first_string(corrects) and _first_string(incorrects)):
            raise UserError(f"{path}: [{i}]: expected prompt, corrects and incorrects (non-empty)")
        examples.append(FeedbackExample(prompt.strip(), _first_string(corrects), _first_string(incorrects)))
    return tuple(examples)


def _first_string(value: Any) -> str:
    """The stripped first element of a list of strings, or "" if there is none."""
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0].strip()
    return ""


# ----------------------------------------------------------------------------- shared normalisation


def _decode(data: bytes, where: str) -> str:
    """UTF-8 text (a leading BOM tolerated), or a UserError naming the file and byte offset."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{where}: not UTF-8 text (invalid byte at offset {error.start})") from None


def _request(text: str, label: str, answer_label: str) -> str:
    """Strip the turn markers the paper's files wrap requests in.

    "\\n\\nCritiqueRequest: Identify ...\\n\\nCritique:" -> "Identify ...". Our YAML may carry the
    markers too (copied from the paper); either way the renderer adds them back.
    """
    text = text.strip()
    if text.startswith(f"{label}:"):
        text = text[len(label) + 1 :].strip()
    if text.endswith(f"{answer_label}:"):
        text = text[: -len(answer_label) - 1].strip()
    return text


def _question(text: str) -> str:
    """A feedback question without its trailing "Options:" (the renderer lists the options)."""
    text = text.strip()
    if text.endswith("Options:"):
        text = text[: -len("Options:")].strip()
    return text


def _transcript(text: str) -> str:
    """A critique few-shot transcript, stripped.

    Four of the paper's five transcripts end in a bare "Human:" label after the revision (a cue
    for the model to stop); our renderer joins few-shot blocks with blank lines and starts the
    real conversation with "Human: ...", so a dangling label would read "Human:\\n\\nHuman: ...".
    We drop it. All five do end with a complete "Revision: ..." turn.
    """
    text = text.strip()
    if text.endswith("\n\nHuman:"):
        text = text[: -len("Human:")].strip()
    return text


def _checked(constitution: Constitution, where: Mapping[str, str]) -> Constitution:
    """Check what every source must satisfy: non-empty principle lists, unique ids, turn structure.

    Args:
        constitution: the freshly built constitution.
        where: for each field, the file that error messages should name.
    """
    for key in ("critique_principles", "feedback_principles"):
        principles = getattr(constitution, key)
        if not principles:
            raise UserError(f"{where[key]}: {key} is empty; a constitution needs at least one principle in each")
        seen: set[str] = set()
        for i, principle in enumerate(principles):
            if principle.id in seen:
                raise UserError(f"{where[key]}: {key}[{i}]: duplicate id {principle.id!r}")
            seen.add(principle.id)
    for i, text in enumerate(constitution.critique_fewshot):
        if not text.startswith("Human:"):
            raise UserError(f"{where['critique_fewshot']}: critique_fewshot[{i}] must start with 'Human:'")
    for i, example in enumerate(constitution.feedback_fewshot):
        if not (example.conversation.startswith("Human:") and example.conversation.endswith("Assistant:")):
            raise UserError(
                f"{where['feedback_fewshot']}: feedback_fewshot[{i}]: conversation must start with 'Human:' "
                "and end with 'Assistant:'"
            )
    return constitution
