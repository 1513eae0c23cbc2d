"""The built-in human helpfulness comparisons (`data.human_preferences: builtin`): what they can teach.

A PM learns whatever separates chosen from rejected. If the chosen answer were usually the longer
one, the cheapest thing to learn would be length; if the transcripts differed before the last
reply, position in the conversation. These tests keep the set honest: length balanced in the whole
set and in the rows the quickstart reads, many multi-turn conversations (as in real assistant
data), and nothing taken from the public HH-RLHF files the project is measured on.
"""

from importlib import resources

import pytest
import yaml

from constitutional.sources import load_preference_pairs
from constitutional.stages import pm

from conftest import REPO, SHARED_DATA

HH_FILES = [SHARED_DATA / "hh-rlhf" / name for name in ("helpful-base-test.jsonl.gz", "harmless-base-test.jsonl.gz")]


def builtin():
    return load_preference_pairs("builtin", prefix="hh", builtin=pm.BUILTIN_PREFERENCES)


def chosen_longer(pairs):
    return sum(len(pair["chosen"].strip()) > len(pair["rejected"].strip()) for pair in pairs) / len(pairs)


def test_length_does_not_give_the_label_away():
    pairs = builtin()
    assert len(pairs) >= 400
    assert 0.45 <= chosen_longer(pairs) <= 0.55
    # The quickstart reads the first pm.max_human rows: they must be balanced on their own.
    quickstart = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    first = pairs[: quickstart["pm"]["max_human"]]
    assert 0.45 <= chosen_longer(first) <= 0.55
    assert sum(bool(pair["history"]) for pair in first) / len(first) >= 0.35  # multi-turn, like real assistant data


def test_each_row_differs_only_in_its_last_reply_and_every_prompt_is_distinct():
    pairs = builtin()  # load_preference_pairs skips rows whose transcripts differ earlier: none may be skipped
    lines = resources.files("constitutional").joinpath("assets", pm.BUILTIN_PREFERENCES).read_text(encoding="utf-8")
    assert len(pairs) == len(lines.strip().splitlines())
    assert len({(pair["history"], pair["prompt"]) for pair in pairs}) == len(pairs)
    assert all(pair["chosen"].strip() != pair["rejected"].strip() for pair in pairs)


@pytest.mark.skipif(not all(path.exists() for path in HH_FILES), reason=f"shared data not found: {SHARED_DATA}")
def test_nothing_is_taken_from_hh_rlhf():
    """The set is written for the project: no prompt, and no answer, of the public test splits appears in it."""
    hh_prompts, hh_answers = set(), set()
    for path in HH_FILES:
        for pair in load_preference_pairs(str(path), prefix="hh"):
            hh_prompts.add(pair["prompt"].strip().lower())
            hh_prompts.update(text.strip().lower() for role, text in pair["history"] if role == "human")
            hh_answers.update({pair["chosen"].strip(), pair["rejected"].strip()})
    pairs = builtin()
    assert not [pair["prompt"] for pair in pairs if pair["prompt"].strip().lower() in hh_prompts]
    assert not [pair["chosen"] for pair in pairs if pair["chosen"].strip() in hh_answers]
    assert not [pair["rejected"] for pair in pairs if pair["rejected"].strip() in hh_answers]


def test_every_answer_starts_as_written():
    """Each final reply starts with a capital, a digit, a quote or code, never mid-word.

    A generation slip once cut the first character off every chosen reply of 218 rows: the PM then
    only had to learn that a lower-case start means "chosen", which no real conversation teaches.
    """
    broken = [
        (index, side, pair[side][:30])
        for index, pair in enumerate(builtin())
        for side in ("chosen", "rejected")
        if not (pair[side][0].isupper() or pair[side][0].isdigit() or pair[side][0] in "\"'`")
    ]
    assert not broken
