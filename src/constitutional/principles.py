"""Principles, few-shot examples and the `Constitution` that holds them, in one normal form.

Both constitution formats (our YAML, read in `constitution.py`, and the paper's published JSON
files, read in `paper_constitution.py`) build these types and pass through the helpers below: the
turn markers the files wrap texts in are stripped ("CritiqueRequest:", "Revision:", "Options:"),
texts are stripped of surrounding whitespace, and `checked` enforces what every source must
satisfy. Renderers in `prompts.py` add the markers back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from constitutional.errors import UserError


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


# ----------------------------------------------------------------------------- shared normalisation


def decode_utf8(data: bytes, where: str) -> str:
    """UTF-8 text (a leading BOM tolerated), or a UserError naming the file and byte offset."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{where}: not UTF-8 text (invalid byte at offset {error.start})") from None


def request_text(text: str, label: str, answer_label: str) -> str:
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


def question_text(text: str) -> str:
    """A feedback question without its trailing "Options:" (the renderer lists the options)."""
    text = text.strip()
    if text.endswith("Options:"):
        text = text[: -len("Options:")].strip()
    return text


def fewshot_transcript(text: str) -> str:
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


def checked(constitution: Constitution, where: Mapping[str, str]) -> Constitution:
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
