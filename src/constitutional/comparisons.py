"""Comparisons: two sampled answers per prompt, and soft AI preference labels for them.

Shared by the stages that make comparisons (`pairs`), label them (`feedback`) and, when no human
helpfulness data is given, the preference-model stage (`pm`). The labelling follows the paper's
step 6: the feedback model reads a conversation, one principle sampled from the constitution and
two answers as options (A) and (B), after a few worked examples, and the soft label is the
normalised probability of " (A)" versus " (B)" read from the model's log-probabilities (one scoring
pass per option order), never from parsing generated text. Principles are drawn from the stream
"feedback:<id>" (critique draws on the bare id), and each few-shot example gets its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from constitutional.backends import Backend, SamplingParams
from constitutional.constitution import Constitution, FeedbackPrinciple, sample_principles
from constitutional.errors import UserError, require, require_positive
from constitutional.label_diagnostics import orders_agree
from constitutional.prompts import render_plain, trim_at_turn_marker
from constitutional.records import conversation
from constitutional.seeding import seed_for

OPTIONS = (" (A)", " (B)")
ORDERS = ("ab", "ba")  # "ba": response_b is shown as option (A)
COT_STOP = ("\nHuman:", "So the answer is")
# The principle draws of AI labels have their own stream: `critique` draws on the bare record id,
# so a shared key would give a comparison's question the index of its round-0 critique principle
# whenever both lists have the same length (the paper's 16 and 16).
FEEDBACK_STREAM = "feedback"


@dataclass
class LabelOptions:
    """How the feedback model is asked (the `feedback` section extends this with its own fields)."""

    debias: bool = True  # score both option orders and average (position bias)
    principles_per_comparison: int = 1  # k > 1: ensemble over k sampled principles, averaged
    cot: bool = False  # chain-of-thought first, then read the option probabilities
    cot_max_new_tokens: int = 128
    clamp_low: float = 0.4  # with chain-of-thought, p_a is clamped to [clamp_low, clamp_high]
    clamp_high: float = 0.6
    hard_labels: bool = False  # ablation: p_a rounded to 0 or 1
    num_fewshot: int | None = None  # few-shot examples in the prompt (None: all)

    def check(self, section: str) -> None:
        """Validate, naming keys under `section` (e.g. "feedback.clamp_low")."""
        require(
            self.principles_per_comparison >= 1,
            f"{section}.principles_per_comparison: expected 1 or more, got {self.principles_per_comparison}",
        )
        require(
            0 <= self.clamp_low < 0.5 < self.clamp_high <= 1,
            f"{section}.clamp_low/clamp_high: expected 0 <= low < 0.5 < high <= 1, "
            f"got {self.clamp_low}, {self.clamp_high}",
        )
        require_positive(f"{section}.cot_max_new_tokens", self.cot_max_new_tokens)
        require(
            self.num_fewshot is None or self.num_fewshot >= 0,
            f"{section}.num_fewshot: expected 0 or more, got {self.num_fewshot}",
        )


def sample_pairs(
    backend: Backend, records: list[dict[str, Any]], params: SamplingParams, seed: int
) -> list[dict[str, Any]]:
    """Two answers per record (paper step 5) in one batched call; identical pairs are dropped.

    The policy (SL-CAI) was fine-tuned on plain `Human:`/`Assistant:` transcripts, so it is prompted
    that way, without few-shot examples. Each answer has its own seed (record id and side).

    Args:
        backend: the model that answers.
        records: dicts with `id`, `prompt` and optional `history`.
        params: sampling parameters (the paper: T = 1).
        seed: the run seed.

    Returns:
        {id, prompt, [history], response_a, response_b} per record whose two answers differ.
    """
    prompts = [render_plain(conversation(record), "assistant") for record in records]
    seeds = [seed_for(seed, record["id"], side) for record in records for side in ("a", "b")]
    texts = backend.generate([prompt for prompt in prompts for _ in ("a", "b")], params, seeds)
    answers = [trim_at_turn_marker(text) for text in texts]
    pairs = []
    for index, record in enumerate(records):
        response_a, response_b = answers[2 * index], answers[2 * index + 1]
        if response_a == response_b:
            continue
        pair = {"id": record["id"], "prompt": record["prompt"]}
        if record.get("history"):
            pair["history"] = record["history"]
        pair.update(response_a=response_a, response_b=response_b)
        pairs.append(pair)
    return pairs


def label_comparisons(
    backend: Backend,
    constitution: Constitution,
    comparisons: Sequence[dict[str, Any]],
    settings: LabelOptions,
    seed: int,
    principles: Sequence[FeedbackPrinciple] | None = None,
) -> list[dict[str, Any]]:
    """Soft AI preference labels for a batch of comparisons.

    Args:
        backend: the feedback model.
        constitution: supplies feedback principles and few-shot examples.
        comparisons: dicts with `id`, `prompt`, optional `history`, `response_a`, `response_b`.
        settings: how to ask (the `feedback` section, or LabelOptions).
        seed: the run seed (principle sampling and chain-of-thought sampling are derived from it).
        principles: the principles to sample from (default: the constitution's feedback principles).

    Returns:
        One label record per comparison, in order.
    """
    pool = constitution.feedback_principles if principles is None else principles
    readings = []  # (comparison index, principle, order, question)
    for index, comparison in enumerate(comparisons):
        principles = question_principles(pool, settings.principles_per_comparison, seed, comparison["id"])
        for principle in principles:
            for order in ORDERS if settings.debias else ORDERS[:1]:
                question = render_question(constitution, comparison, principle, order, settings, seed, pool)
                readings.append((index, principle, order, question))
    reasonings: list[str | None] = [None] * len(readings)
    scoring_prompts = [question for _, _, _, question in readings]
    if settings.cot:
        reasonings = write_reasoning(backend, readings, comparisons, settings, seed)
        scoring_prompts = [
            question + " " + reasoning + "\n\nHuman:\nSo the answer is:"
            for question, reasoning in zip(scoring_prompts, reasonings)
        ]
    try:
        scores = backend.score_options(scoring_prompts, OPTIONS)
    except ValueError as error:
        raise UserError(f"feedback options {list(OPTIONS)}: {error}") from None
    records = [new_record(comparison) for comparison in comparisons]
    for (index, principle, order, _), (score_first, score_second), reasoning in zip(readings, scores, reasonings):
        p_first = probability_first(score_first, score_second)
        p_a = p_first if order == "ab" else 1.0 - p_first
        if settings.cot:
            p_a = min(max(p_a, settings.clamp_low), settings.clamp_high)
        reading = {"principle_id": principle.id, "order": order, "p_a": p_a}
        if reasoning is not None:
            reading["reasoning"] = reasoning
        records[index]["readings"].append(reading)
    for record in records:
        finish_record(record, settings.hard_labels)
        record["scoring_method"] = backend.scoring_method  # how the option log-probs were read
    return records


def question_principles(
    pool: Sequence[FeedbackPrinciple], k: int, seed: int, comparison_id: str
) -> list[FeedbackPrinciple]:
    """The `k` principles a comparison is asked under, from the feedback stream of its id."""
    return sample_principles(pool, k, seed, f"{FEEDBACK_STREAM}:{comparison_id}")


def fewshot_principles(
    pool: Sequence[FeedbackPrinciple], count: int, seed: int, comparison_id: str, principle_id: str
) -> list[FeedbackPrinciple]:
    """One principle per few-shot example, each drawn on its own (paper section 4.1: "each
    few-shot example is formatted in the same manner as above, with an independently sampled
    principle"); neither source gives the principle an example was written for.

    The draw depends on the comparison and its question's principle but not on the option order,
    so both orders of a reading see the same examples and differ only in where the answers stand.
    """
    keys = [f"{FEEDBACK_STREAM}-fewshot:{comparison_id}:{principle_id}:{position}" for position in range(count)]
    return [sample_principles(pool, 1, seed, key)[0] for key in keys]


def write_reasoning(
    backend: Backend,
    readings: list[tuple[int, FeedbackPrinciple, str, str]],
    comparisons: Sequence[dict[str, Any]],
    settings: LabelOptions,
    seed: int,
) -> list[str]:
    """Chain-of-thought: the model's step-by-step reasoning after each question (greedy)."""
    params = SamplingParams(max_new_tokens=settings.cot_max_new_tokens, temperature=0.0, stop=COT_STOP)
    seeds = [seed_for(seed, comparisons[index]["id"], principle.id, order) for index, principle, order, _ in readings]
    texts = backend.generate([question for _, _, _, question in readings], params, seeds)
    return [" ".join(text.split()) for text in texts]


def probability_first(score_first: float, score_second: float) -> float:
    """Softmax over the two options' log-probabilities: P(first option) of the pair."""
    top = max(score_first, score_second)
    first, second = math.exp(score_first - top), math.exp(score_second - top)
    return first / (first + second)


def new_record(comparison: dict[str, Any]) -> dict[str, Any]:
    record = {"id": comparison["id"], "prompt": comparison["prompt"]}
    if comparison.get("history"):
        record["history"] = comparison["history"]
    record.update(response_a=comparison["response_a"], response_b=comparison["response_b"], readings=[])
    return record


def finish_record(record: dict[str, Any], hard_labels: bool) -> None:
    """Average the readings (orders x principles) into `p_a`; list the principle ids."""
    readings = record.pop("readings")
    principle_ids = list(dict.fromkeys(reading["principle_id"] for reading in readings))
    p_a = sum(reading["p_a"] for reading in readings) / len(readings)
    if hard_labels:
        p_a = 1.0 if p_a > 0.5 else 0.0 if p_a < 0.5 else 0.5
    record.update(principle_id=principle_ids[0], principle_ids=principle_ids, p_a=p_a)
    agree = orders_agree(readings)
    if agree is not None:  # asked in both orders (feedback.debias): did they prefer the same answer?
        record["orders_agree"] = agree
    record["readings"] = readings
    if any("reasoning" in reading for reading in readings):
        record["reasoning"] = readings[0]["reasoning"]


# ----------------------------------------------------------------------------- prompt rendering


def render_question(
    constitution: Constitution,
    comparison: dict[str, Any],
    principle: FeedbackPrinciple,
    order: str,
    settings: LabelOptions,
    seed: int = 0,
    pool: Sequence[FeedbackPrinciple] | None = None,
) -> str:
    """The multiple-choice question for one comparison, principle and option order.

    Args:
        constitution: supplies the few-shot examples.
        comparison: `id`, `prompt`, optional `history`, `response_a`, `response_b`.
        principle: the question's principle.
        order: "ab", or "ba" (response_b shown as option (A)).
        settings: how to ask.
        seed: the run seed, and `pool` (default: the constitution's feedback principles): each
            few-shot example's own principle is drawn from `pool` (`fewshot_principles`).
    """
    first, second = ("response_a", "response_b") if order == "ab" else ("response_b", "response_a")
    turns = conversation(comparison)
    pool = constitution.feedback_principles if pool is None else pool
    shots = limit(constitution.cot_fewshot if settings.cot else constitution.feedback_fewshot, settings)
    own = fewshot_principles(pool, len(shots), seed, comparison["id"], principle.id)
    if settings.cot:
        examples = [fill_cot_example(example, example_principle) for example, example_principle in zip(shots, own)]
        question = cot_question(turns, principle, comparison[first], comparison[second])
        return "\n\n".join(examples + [question])
    examples = [
        multiple_choice(
            parse_conversation(example.conversation),
            own[position],
            *((example.better, example.worse) if position % 2 == 0 else (example.worse, example.better)),
            answer="(A)" if position % 2 == 0 else "(B)",
        )
        for position, example in enumerate(shots)
    ]
    return "\n\n".join(examples + [multiple_choice(turns, principle, comparison[first], comparison[second])])


def limit(examples: Sequence[Any], settings: LabelOptions) -> list[Any]:
    return list(examples if settings.num_fewshot is None else examples[: settings.num_fewshot])


def multiple_choice(
    turns: list[tuple[str, str]], principle: FeedbackPrinciple, option_a: str, option_b: str, answer: str = ""
) -> str:
    """The paper's multiple-choice format; without `answer` it ends at "The answer is:".

    Few-shot examples alternate which position holds the better answer, so the examples
    themselves teach no position preference.
    """
    conversation = "\n\n".join(f"{'Human' if role == 'human' else 'Assistant'}: {text.strip()}" for role, text in turns)
    lines = [
        "Consider the following conversation between a human and an assistant:",
        conversation,
        principle.text,
        "Options:",
        f"(A) {option_a.strip()}",
        f"(B) {option_b.strip()}",
        f"The answer is:{' ' + answer if answer else ''}",
    ]
    return "\n".join(lines)


def cot_question(turns: list[tuple[str, str]], principle: FeedbackPrinciple, option_a: str, option_b: str) -> str:
    """The chain-of-thought form (as in the paper's published examples), ending where reasoning starts."""
    conversation = "\n\n".join(f"{'H' if role == 'human' else 'A'}: {text.strip()}" for role, text in turns)
    return (
        "Human: Consider the following conversation between a human (H) and an assistant (A):\n\n"
        f"{conversation}\n\n{principle.text}\n (A) {option_a.strip()}\n (B) {option_b.strip()}\n\n"
        "Assistant: Let's think step by step:"
    )


def fill_cot_example(example: str, principle: FeedbackPrinciple) -> str:
    """A published-style chain-of-thought example: `{}` takes the principle, `[[[...]]]` marks options."""
    return re.sub(r"\[\[\[(.*?)\]\]\]", r"\1", example.replace("{}", principle.text), flags=re.DOTALL)


def parse_conversation(transcript: str) -> list[tuple[str, str]]:
    """Turns of a few-shot conversation "Human: ...\\n\\nAssistant: ...\\n\\nAssistant:" (final empty turn dropped)."""
    turns = []
    for block in re.split(r"\n\n(?=(?:Human|Assistant):)", transcript.strip()):
        role, _, text = block.partition(":")
        if text.strip():
            turns.append(("human" if role.strip() == "Human" else "assistant", text.strip()))
    return turns
