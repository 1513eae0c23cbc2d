"""The paper's published constitution: the JSON files of Bai et al. 2022, appendix C.

A folder holding CritiqueRevisionInstructions.json and RLMadisonInstructions.json (required) and,
optionally, the three few-shot files (CritiqueRevisionFewShotPrompts.json,
RLMadisonFewShotPrompts.json, RLMadisonPrecogFewShotPrompts.json), read as they are published.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from constitutional.errors import UserError
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

REQUIRED_PAPER_FILES = ("CritiqueRevisionInstructions.json", "RLMadisonInstructions.json")


def from_paper_folder(folder: Path) -> Constitution:
    """Build a constitution from the paper's published JSON files (Bai et al. 2022, appendix C).

    The two instruction files are required, the three few-shot files optional.
    """
    for name in REQUIRED_PAPER_FILES:
        if not (folder / name).is_file():
            needed = " and ".join(REQUIRED_PAPER_FILES)
            raise UserError(f"constitution: {folder / name} not found (a folder of the paper's files needs {needed})")
    files = {
        "critique_principles": folder / "CritiqueRevisionInstructions.json",
        "feedback_principles": folder / "RLMadisonInstructions.json",
        "critique_fewshot": folder / "CritiqueRevisionFewShotPrompts.json",
        "feedback_fewshot": folder / "RLMadisonFewShotPrompts.json",
        "cot_fewshot": folder / "RLMadisonPrecogFewShotPrompts.json",
    }
    return checked(
        Constitution(
            name=folder.resolve().name or "anthropic-cai-paper",
            critique_principles=_paper_critique_principles(files["critique_principles"]),
            feedback_principles=_paper_feedback_principles(files["feedback_principles"]),
            critique_fewshot=tuple(map(fewshot_transcript, _paper_prompts(files["critique_fewshot"], keyed=False))),
            feedback_fewshot=_paper_feedback_examples(files["feedback_fewshot"]),
            cot_fewshot=tuple(_paper_prompts(files["cot_fewshot"], keyed=True)),
            source=str(folder),
        ),
        {key: str(path) for key, path in files.items()},
    )


def _read_json(path: Path) -> Any:
    """Parse a JSON file, naming it and the line on failure."""
    text = decode_utf8(path.read_bytes(), str(path))
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
                critique_request=request_text(critique, "CritiqueRequest", "Critique"),
                revision_request=request_text(revision, "RevisionRequest", "Revision"),
            )
        )
    return tuple(principles)


def _paper_feedback_principles(path: Path) -> tuple[FeedbackPrinciple, ...]:
    """A list of questions, each ending in "Options:"; ids follow list position."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of strings")
    for i, text in enumerate(data):
        if not isinstance(text, str) or not question_text(text):
            raise UserError(f"{path}: [{i}]: expected a non-empty string")
    return tuple(FeedbackPrinciple(id=f"madison{i}", text=question_text(text)) for i, text in enumerate(data))


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
