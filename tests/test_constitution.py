"""The constitution: the default asset, the paper's JSON folder, principle sampling, bad input."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from constitutional.constitution import (
    Constitution,
    CritiquePrinciple,
    FeedbackExample,
    load_constitution,
    sample_principles,
)
from constitutional.errors import UserError

from conftest import SHARED_DATA

PAPER = SHARED_DATA / "anthropic-cai-paper"
CRITIQUE_TURNS = ["Human", "Assistant", "CritiqueRequest", "Critique", "RevisionRequest", "Revision"]
MARKERS = ("CritiqueRequest:", "Critique:", "RevisionRequest:", "Revision:", "Options:")


def _labels(transcript: str) -> list[str]:
    """The turn labels of a plain transcript, in order (a turn starts a blank-line-separated block)."""
    return [re.match(r"(\w+):", block).group(1) for block in transcript.split("\n\n")]


@pytest.fixture(scope="module")
def paper() -> Constitution:
    if not PAPER.is_dir():
        pytest.skip(f"the paper's constitution files are not at {PAPER}")
    return load_constitution(str(PAPER))


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


NO_CRITIQUE = "  - id: a\n    critique: Find harm.\n    revision: Remove it.\n"
MINIMAL = """\
name: tiny
critique_principles:
  - id: a
    critique: Find harm.
    revision: Remove it.
feedback_principles:
  - id: b
    text: Which is better?
"""


# ----------------------------------------------------------------------------- default constitution


def test_default_constitution_loads_with_unique_ids_and_clean_texts():
    c = load_constitution("default")
    assert c.source == "default" and c.name == "constitutional-default"
    assert 14 <= len(c.critique_principles) <= 16 and 14 <= len(c.feedback_principles) <= 16
    for principles in (c.critique_principles, c.feedback_principles):
        ids = [p.id for p in principles]
        assert len(set(ids)) == len(ids)
    for p in c.critique_principles:
        assert p.critique_request and p.revision_request
        assert not any(m in p.critique_request + p.revision_request for m in MARKERS)
        assert p.critique_request == p.critique_request.strip() and "\n" not in p.critique_request
    for p in c.feedback_principles:
        assert p.text and not p.text.endswith("Options:") and "\n" not in p.text


def test_default_fewshot_transcripts_have_the_papers_turn_structure():
    c = load_constitution("default")
    assert 3 <= len(c.critique_fewshot) <= 4
    for transcript in c.critique_fewshot:
        # Exactly one blank line between turns: a YAML block scalar must not add or lose any.
        assert _labels(transcript) == CRITIQUE_TURNS
        assert "\n\n\n" not in transcript and transcript == transcript.strip()
        assert len(transcript.split()) < 180  # a 270M model reads these before every prompt
    # At least one benign example whose revision keeps the good answer unchanged.
    turns = [transcript.split("\n\n") for transcript in c.critique_fewshot]
    assert any(t[1].removeprefix("Assistant: ") == t[-1].removeprefix("Revision: ") for t in turns)
    assert c.critique_fewshot[0].startswith("Human: How do I get onto my neighbor's wifi")


def test_default_feedback_and_cot_examples():
    c = load_constitution("default")
    assert 3 <= len(c.feedback_fewshot) <= 4
    for example in c.feedback_fewshot:
        assert isinstance(example, FeedbackExample)
        assert _labels(example.conversation) == ["Human", "Assistant"]
        assert example.conversation.endswith("\n\nAssistant:")
        assert example.better and example.worse and example.better != example.worse
    assert len(c.cot_fewshot) == 2
    for text in c.cot_fewshot:
        assert text.startswith("Human: Consider the following conversation")
        assert "\n\n{}\n (A) [[[" in text and "]]]\n (B) [[[" in text
        assert "\n\nAssistant: Let's think step by step:" in text
        assert re.search(r"\n\nHuman:\nSo the answer is: \([AB]\)$", text)


# ----------------------------------------------------------------------------- the paper's folder


def test_paper_critique_principles_are_stripped_of_markers(paper):
    assert [p.id for p in paper.critique_principles] == [f"harmful{i}" for i in range(16)]
    for p in paper.critique_principles:
        assert not any(m in p.critique_request + p.revision_request for m in MARKERS)
        assert p.critique_request == p.critique_request.strip()
    assert paper.critique_principles[0].critique_request.startswith("Identify specific ways")


def test_paper_feedback_principles_and_fewshot_counts(paper):
    assert [p.id for p in paper.feedback_principles] == [f"madison{i}" for i in range(16)]
    assert all(p.text and not p.text.endswith("Options:") for p in paper.feedback_principles)
    assert (len(paper.critique_fewshot), len(paper.feedback_fewshot), len(paper.cot_fewshot)) == (5, 5, 6)
    assert paper.name == "anthropic-cai-paper"
    for transcript in paper.critique_fewshot:
        assert transcript.startswith("Human:") and "\n\nRevision: " in transcript
        assert not transcript.endswith("Human:")  # the dangling stop label is dropped
    for example in paper.feedback_fewshot:
        assert example.conversation.startswith("Human:") and example.conversation.endswith("Assistant:")
    # The chain-of-thought templates stay untouched for the feedback stage to fill in.
    assert all("{}" in text and "[[[" in text for text in paper.cot_fewshot)


def test_paper_few_shot_files_are_optional(paper, tmp_path):
    for name in ("CritiqueRevisionInstructions.json", "RLMadisonInstructions.json"):
        shutil.copy(PAPER / name, tmp_path / name)
    c = load_constitution(str(tmp_path))
    assert len(c.critique_principles) == 16 and c.critique_fewshot == c.feedback_fewshot == c.cot_fewshot == ()
    assert c.name == tmp_path.name


def test_paper_folder_without_instructions_is_a_user_error(paper, tmp_path):
    shutil.copy(PAPER / "CritiqueRevisionInstructions.json", tmp_path)
    with pytest.raises(UserError, match="RLMadisonInstructions.json"):
        load_constitution(str(tmp_path))


def test_paper_json_errors_name_the_file_and_key(tmp_path):
    (tmp_path / "RLMadisonInstructions.json").write_text('["Which? Options:"]')
    (tmp_path / "CritiqueRevisionInstructions.json").write_text('{"harmful0": {"prompt": ["x"]}}')
    with pytest.raises(UserError, match=r"CritiqueRevisionInstructions\.json: key 'harmful0'.*edit_request"):
        load_constitution(str(tmp_path))
    (tmp_path / "CritiqueRevisionInstructions.json").write_text('{"harmful0": ')
    with pytest.raises(UserError, match=r"CritiqueRevisionInstructions\.json: invalid JSON at line 1"):
        load_constitution(str(tmp_path))
    (tmp_path / "CritiqueRevisionInstructions.json").write_text("{}")
    with pytest.raises(UserError, match=r"CritiqueRevisionInstructions\.json: critique_principles is empty"):
        load_constitution(str(tmp_path))


# ----------------------------------------------------------------------------- our YAML format


def test_minimal_yaml_loads_relative_to_base_dir(tmp_path):
    _write(tmp_path, MINIMAL)
    c = load_constitution("c.yaml", base_dir=tmp_path)
    assert c.critique_principles == (CritiquePrinciple("a", "Find harm.", "Remove it."),)
    assert c.feedback_principles[0].text == "Which is better?"
    assert c.critique_fewshot == c.feedback_fewshot == c.cot_fewshot == ()
    assert c.source == str(tmp_path / "c.yaml")


def test_yaml_markers_copied_from_the_paper_are_stripped(tmp_path):
    text = MINIMAL.replace("Find harm.", '"CritiqueRequest: Find harm.\\n\\nCritique:"').replace(
        "Which is better?", '"Which is better? Options:"'
    )
    c = load_constitution(str(_write(tmp_path, text)))
    assert c.critique_principles[0].critique_request == "Find harm."
    assert c.feedback_principles[0].text == "Which is better?"


@pytest.mark.parametrize(
    "text, pattern",
    [
        (MINIMAL.replace(NO_CRITIQUE, "  []\n"), "critique_principles is empty"),
        (MINIMAL.split("feedback_principles")[0], "feedback_principles is empty"),
        (MINIMAL + "  - id: b\n    text: Another?\n", r"feedback_principles\[1\]: duplicate id 'b'"),
        (MINIMAL + "principels: []\n", "unknown key 'principels'"),
        (MINIMAL.replace("revision:", "revison:"), r"critique_principles\[0\]: unknown key 'revison'"),
        (MINIMAL.replace("- id: a\n    critique", "- critique"), r"critique_principles\[0\]: missing or empty 'id'"),
        (MINIMAL.replace("    text: Which is better?\n", ""), r"feedback_principles\[0\]: missing or empty 'text'"),
        (MINIMAL + "critique_fewshot: ['Assistant: hi']\n", r"critique_fewshot\[0\] must start with 'Human:'"),
        (MINIMAL + "feedback_fewshot: [{conversation: 'Human: hi', better: x, worse: y}]\n", "end with 'Assistant:'"),
        ("name: [unclosed\n", r"\.yaml:\d+: invalid YAML"),
        ("- just a list\n", "expected a mapping"),
    ],
)
def test_bad_yaml_is_a_one_line_user_error_naming_the_file(tmp_path, text, pattern):
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match=pattern) as error:
        load_constitution(str(path))
    message = str(error.value)
    assert str(path) in message and "\n" not in message


def test_empty_critique_list_names_the_list_and_the_file(tmp_path):
    path = _write(tmp_path, MINIMAL.replace(NO_CRITIQUE, "  []\n"))
    with pytest.raises(UserError) as error:
        load_constitution(str(path))
    assert "critique_principles" in str(error.value) and str(path) in str(error.value)


def test_non_utf8_file_is_a_user_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(MINIMAL.replace("Find harm.", "Find h\xe4rm.").encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8") as error:
        load_constitution(str(path))
    assert str(path) in str(error.value)


def test_missing_path_and_wrong_suffix_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        load_constitution("nowhere.yaml", base_dir=tmp_path)
    path = _write(tmp_path, MINIMAL, name="c.json")
    with pytest.raises(UserError, match="neither a .yaml/.yml file nor a folder"):
        load_constitution(str(path))


# ----------------------------------------------------------------------------- sampling


def test_sampling_is_deterministic_per_seed_and_key():
    items = list(range(16))
    assert sample_principles(items, 4, 0, "red-1") == sample_principles(items, 4, 0, "red-1")
    keys = ("red-1", "red-2", "red-3")
    draws = {tuple(sample_principles(items, 4, seed, key)) for seed in (0, 1) for key in keys}
    assert len(draws) == 6
    # Pinned: the same config and seed must give the same data on any machine and Python version.
    assert sample_principles(list(range(10)), 12, 0, "x") == [7, 8, 5, 3, 0, 6, 1, 9, 2, 4, 9, 6]


def test_sampling_has_no_repeats_until_the_list_is_exhausted():
    items = list("abcde")
    for key in map(str, range(200)):
        draw = sample_principles(items, 5, 3, key)
        assert sorted(draw) == items
        longer = sample_principles(items, 12, 3, key)
        assert longer[:5] == draw and sorted(longer[5:10]) == items and len(longer) == 12
    assert sample_principles(items, 0, 3, "k") == []
    with pytest.raises(ValueError):
        sample_principles([], 1, 0, "k")


@pytest.mark.parametrize("position", [0, 2, 7])  # position 7 lies in the second shuffle
def test_sampling_is_uniform_at_each_position(position):
    items = list(range(6))
    draws = 3000
    counts = Counter(sample_principles(items, 8, 11, f"item-{i}")[position] for i in range(draws))
    expected = draws / len(items)
    assert set(counts) == set(items)
    assert all(abs(count - expected) < 0.3 * expected for count in counts.values()), counts
