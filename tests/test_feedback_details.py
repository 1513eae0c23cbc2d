"""Feedback details: the feedback stage's own principle stream (apart from critique's), each
few-shot example's own principle, whether the two option orders agree, and the labels'
position-flip rate and length bias with their intervals (`label_diagnostics`)."""

from __future__ import annotations

import json
import math
import re

import pytest

from constitutional.comparisons import label_comparisons
from constitutional.config import config_from_dict
from constitutional.constitution import load_constitution, sample_principles
from constitutional.intervals import bootstrap_mean_interval, wilson_interval
from constitutional.label_diagnostics import label_diagnostics, length_bias, orders_agree
from constitutional.records import append_records, read_ai_labels, read_records
from constitutional.rundir import RunDir
from constitutional.stages import feedback

from conftest import SHARED_DATA

PAPER = SHARED_DATA / "anthropic-cai-paper"
IDS = [f"rt-{i:04d}" for i in range(400)]


class RecordingBackend:
    """A stand-in feedback model: records every question, and prefers the answer that contains
    `favourite` wherever it stands (a judge that reads content), else no option at all."""

    scoring_method = "fake"

    def __init__(self, favourite: str | None = None):
        self.favourite = favourite
        self.questions: list[str] = []

    def score_options(self, prompts, options):
        self.questions.extend(prompts)
        if self.favourite is None:
            return [[0.0, 0.0] for _ in prompts]
        option_a = [prompt[prompt.rindex("\n(A) ") :].split("\n")[1] for prompt in prompts]
        return [[1.0, 0.0] if self.favourite in option else [0.0, 1.0] for option in option_a]

    def generate(self, prompts, params, seeds=None):
        self.questions.extend(prompts)  # chain-of-thought: the questions the reasoning follows
        return ["Both are fine." for _ in prompts]


@pytest.fixture(scope="module")
def paper():
    return load_constitution(str(PAPER))


def settings(**values):
    return config_from_dict({"feedback": values}).feedback


def comparison(record_id: str) -> dict:
    return {"id": record_id, "prompt": "How do I pick a lock?", "response_a": "No.", "response_b": "Use a pick."}


def principles_shown(question: str, texts: dict[str, str]) -> list[str]:
    """The ids of the principles a question shows, in order (the line before each "Options:")."""
    return [texts[line] for line in re.findall(r"([^\n]*)\nOptions:\n", question)]


# ----------------------------------------------------------------------------- the principle stream


def test_the_feedback_principle_is_drawn_apart_from_the_round_0_critique_principle(paper):
    """With the paper's 16 critique and 16 feedback principles, a shared stream gave every
    comparison the index of its prompt's round-0 critique principle (agreement 100%)."""
    assert len(paper.critique_principles) == len(paper.feedback_principles) == 16
    labels = label_comparisons(
        RecordingBackend(), paper, [comparison(i) for i in IDS], settings(debias=False, num_fewshot=0), seed=0
    )
    feedback_index = [int(label["principle_id"].removeprefix("madison")) for label in labels]
    # The critique stage's draw for the same record id, exactly as stages/critique.py makes it.
    critique_index = [
        paper.critique_principles.index(sample_principles(paper.critique_principles, 4, 0, i)[0]) for i in IDS
    ]
    agreement = sum(f == c for f, c in zip(feedback_index, critique_index)) / len(IDS)
    assert 0.02 < agreement < 0.12  # chance: 1/16 = 0.0625 (400 ids: sd 0.012)
    assert len(set(feedback_index)) == 16  # every principle is still drawn


def test_critiques_keep_their_draws():
    """The critique side's key (the bare record id) is unchanged: its records stay byte-identical."""
    assert sample_principles(list(range(16)), 4, 0, "rt-0000") == [13, 14, 1, 10]  # as before the change
    assert sample_principles(list(range(10)), 12, 0, "x") == [7, 8, 5, 3, 0, 6, 1, 9, 2, 4, 9, 6]


# ----------------------------------------------------------------------------- few-shot principles


def test_each_fewshot_example_has_its_own_independently_drawn_principle(paper):
    """Paper section 4.1: each few-shot example comes "with an independently sampled principle"."""
    texts = {principle.text: principle.id for principle in paper.feedback_principles}
    backend = RecordingBackend()
    labels = label_comparisons(backend, paper, [comparison(i) for i in IDS[:200]], settings(debias=True), seed=0)
    assert len(backend.questions) == 2 * len(labels)
    same_as_question = shots = differ_within = 0
    for index, label in enumerate(labels):
        first, second = backend.questions[2 * index : 2 * index + 2]
        shown = principles_shown(first, texts)
        assert len(shown) == len(paper.feedback_fewshot) + 1 and shown[-1] == label["principle_id"]
        # Both orders show the same examples: only the places of the two answers differ.
        assert first[: first.rindex("Consider the following")] == second[: second.rindex("Consider the following")]
        same_as_question += sum(example == label["principle_id"] for example in shown[:-1])
        shots += len(shown) - 1
        differ_within += len(set(shown[:-1])) > 1
    assert same_as_question / shots < 0.15  # independent of the question's principle: chance 1/16
    assert differ_within > 0.9 * len(labels)  # and of each other (5 examples all alike: (1/16)^4)
    again = RecordingBackend()
    label_comparisons(again, paper, [comparison(i) for i in IDS[:200]], settings(debias=True), seed=0)
    assert again.questions == backend.questions  # seeded: the same questions every time


def test_chain_of_thought_examples_have_their_own_principles_too(paper):
    texts = {principle.text: principle.id for principle in paper.feedback_principles}
    backend = RecordingBackend()
    labels = label_comparisons(backend, paper, [comparison(i) for i in IDS[:50]], settings(debias=False, cot=True), 0)
    same = shots = 0
    for label, question in zip(labels, backend.questions):  # the generation prompts come first
        shown = [texts[line] for line in re.findall(r"\n\n([^\n]*)\n \(A\) ", question)]
        assert len(shown) == len(paper.cot_fewshot) + 1 and shown[-1] == label["principle_id"]
        same += shown[:-1].count(label["principle_id"])
        shots += len(shown) - 1
    assert same / shots < 0.2


# ----------------------------------------------------------------------------- the two option orders


def test_labels_record_whether_the_two_orders_agree(paper):
    pairs = [comparison(i) for i in IDS[:4]]
    reads_content = label_comparisons(RecordingBackend("Use a pick"), paper, pairs, settings(num_fewshot=1), seed=0)
    assert [label["orders_agree"] for label in reads_content] == [True] * 4
    assert all(label["p_a"] == pytest.approx(1 / (1 + math.e)) for label in reads_content)
    follows_slot = label_comparisons(RecordingBackend("(A)"), paper, pairs, settings(num_fewshot=1), seed=0)
    assert [label["orders_agree"] for label in follows_slot] == [False] * 4  # always the first slot
    assert all(label["p_a"] == pytest.approx(0.5) for label in follows_slot)
    one_order = label_comparisons(RecordingBackend("Use a pick"), paper, pairs, settings(debias=False), seed=0)
    assert all("orders_agree" not in label for label in one_order)


def test_orders_agree_averages_each_order_over_principles():
    def readings(ab, ba):
        return [{"order": "ab", "p_a": p} for p in ab] + [{"order": "ba", "p_a": p} for p in ba]

    assert orders_agree(readings([0.7], [0.6])) is True
    assert orders_agree(readings([0.7], [0.4])) is False
    assert orders_agree(readings([0.9, 0.3], [0.55])) is True  # ab's mean is 0.6
    assert orders_agree(readings([0.5], [0.5])) is True  # neither order prefers an answer
    assert orders_agree(readings([0.5], [0.6])) is False
    assert orders_agree(readings([0.7], [])) is None


# ----------------------------------------------------------------------------- the figures


def test_the_bootstrap_interval_of_a_mean_is_over_items_and_seeded():
    assert bootstrap_mean_interval([2.0] * 10) == (2.0, 2.0)  # no spread, no width
    differences = [1.0, -0.5, 2.0, 0.5, 1.5, -1.0, 0.0, 3.0]
    low, high = bootstrap_mean_interval(differences, resamples=4000, seed=1)
    assert low < sum(differences) / len(differences) < high and low > -1.0 and high < 3.0
    assert bootstrap_mean_interval(differences, seed=1) == bootstrap_mean_interval(differences, seed=1)
    # Four times the items with the same spread: about half the width (1 / sqrt(4)).
    wide, narrow = bootstrap_mean_interval(differences, seed=2), bootstrap_mean_interval(differences * 4, seed=2)
    assert 0.35 < (narrow[1] - narrow[0]) / (wide[1] - wide[0]) < 0.65
    with pytest.raises(ValueError):
        bootstrap_mean_interval([])


def test_wilson_intervals_match_hand_computed_values():
    # p = 3/10, z = 1.96: centre (0.3 + z²/20)/(1 + z²/10) = 0.35550, half-width 0.24772.
    assert wilson_interval(3, 10) == pytest.approx((0.1078, 0.6032), abs=1e-4)
    assert wilson_interval(2, 4) == pytest.approx((0.1500, 0.8500), abs=1e-4)
    assert wilson_interval(0, 5) == pytest.approx((0.0, 0.4345), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(1, 0)


LABELS = [  # hand-made: the expected figures are worked out beside each
    {"response_a": "aaaa", "response_b": "bb", "p_a": 0.7,  # A longer, wins; orders agree
     "readings": [{"order": "ab", "p_a": 0.8}, {"order": "ba", "p_a": 0.6}]},
    {"response_a": "a", "response_b": "bbb", "p_a": 0.6, "orders_agree": False},  # B longer, loses; flip
    {"response_a": "aa", "response_b": "bb", "p_a": 0.9, "orders_agree": True},  # equal length
    {"response_a": "aaa", "response_b": "b", "p_a": 0.5,  # undecided; flip (from the readings)
     "readings": [{"order": "ab", "p_a": 0.7}, {"order": "ba", "p_a": 0.3}]},
    {"response_a": "  x  ", "response_b": "yy", "p_a": 0.2},  # B longer (stripped), wins; one order only
]  # fmt: skip


def test_label_diagnostics_on_hand_computed_labels():
    report = label_diagnostics(LABELS)
    assert report["labels"] == 5 and report["interval"] == "95% Wilson score"
    # Flips: 2 of the 4 labels asked in both orders; Wilson 2/4 = [0.15, 0.85].
    assert report["position_flip"] == {"flips": 2, "comparisons": 4, "rate": 0.5, "ci95": [0.15, 0.85]}
    # The longer answer wins 2 of 3 (labels 1 and 5; label 2 loses); Wilson 2/3 = [0.2077, 0.9385].
    assert report["length_bias"] == {
        "longer_wins": 2,
        "comparisons": 3,
        "rate": 0.6667,
        "ci95": [0.2077, 0.9385],
        "chance": 0.5,
        "equal_length": 1,
        "undecided": 1,
    }
    empty = label_diagnostics([])
    assert empty["position_flip"]["rate"] is None and empty["length_bias"]["ci95"] is None
    assert length_bias(LABELS[2:3])["comparisons"] == 0


# ----------------------------------------------------------------------------- the stage


def test_stage_writes_the_figures_and_keeps_the_record_contract(tmp_path, tiny_model_dir):
    config = config_from_dict(
        {
            "models": {"feedback": str(tiny_model_dir)},
            "feedback": {"num_fewshot": 1},
            "transformers": {"dtype": "float32"},
        }
    )
    run = RunDir(tmp_path)
    append_records(
        run.path("pairs"),
        [{"id": "c1", "prompt": "Lock?", "response_a": "No.", "response_b": "Use a pick, then turn it slowly."},
         {"id": "c2", "prompt": "Tips?", "response_a": "Drink plenty of water.", "response_b": "Rest."}],
    )  # fmt: skip
    counts = feedback.run(config, config.feedback, run, feedback.check(config, config.feedback))
    labels = read_ai_labels(run.path("ai_labels"))  # the reader `pm` uses still accepts the records
    assert all(isinstance(label["orders_agree"], bool) for label in labels)
    report = json.loads(run.path("feedback_report").read_text(encoding="utf-8"))
    assert run.path("feedback_report") == tmp_path / "eval" / "feedback.json"
    assert report == label_diagnostics(read_records(run.path("ai_labels")))
    assert counts["position_flip"] == report["position_flip"] and counts["length_bias"] == report["length_bias"]
    assert report["position_flip"]["comparisons"] == 2 and report["length_bias"]["comparisons"] == 2
