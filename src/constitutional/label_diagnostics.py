"""How far AI labels follow the answers' position and length rather than their content.

Two known biases of a language model used as a judge (Zheng et al. 2023, "Judging LLM-as-a-Judge
with MT-Bench and Chatbot Arena": position and verbosity bias), measured on the labels of the
paper's step 6 (Bai et al. 2022, section 4.1):

- position: with `feedback.debias` every comparison is asked in both option orders, A/B and B/A.
  A judge that reads the answers prefers the same answer in both; one that follows the slot
  flips. The flip rate is the share of comparisons whose two orders disagree.
- length: how often the longer answer wins (its probability above 0.5), beside the 50% of a
  judge that ignores length.

Each figure comes with a 95% Wilson score interval (Wilson 1927; Brown, Cai and DasGupta 2001
recommend it over the normal approximation for small n and rates near 0 or 1). Pure functions:
the `feedback` stage writes their result to `eval/feedback.json` and its manifest counts, and a
report can rebuild it from `data/ai_labels.jsonl` alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from constitutional.intervals import proportion


def orders_agree(readings: Sequence[dict[str, Any]]) -> bool | None:
    """Whether the two option orders of one comparison prefer the same answer.

    Each order's `p_a` readings (one per sampled principle) are averaged, and the orders agree when
    both averages lie on the same side of 0.5 (both exactly 0.5 agree too: neither prefers).

    Args:
        readings: a label's readings, each with `order` ("ab" or "ba") and `p_a`.

    Returns:
        True or False, or None when the comparison was not asked in both orders.
    """
    sides = []
    for order in ("ab", "ba"):
        values = [reading["p_a"] for reading in readings if reading["order"] == order]
        if not values:
            return None
        mean = sum(values) / len(values)
        sides.append((mean > 0.5) - (mean < 0.5))
    return sides[0] == sides[1]


def position_flips(labels: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The share of comparisons whose two option orders disagree.

    Returns:
        {"flips", "comparisons" (those asked in both orders), "rate", "ci95"}.
    """
    verdicts = []
    for label in labels:
        agree = label.get("orders_agree")
        if agree is None and label.get("readings"):
            agree = orders_agree(label["readings"])
        if agree is not None:
            verdicts.append(bool(agree))
    flips = verdicts.count(False)
    return {"flips": flips, "comparisons": len(verdicts), **proportion(flips, len(verdicts))}


def length_bias(labels: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """How often the longer answer (characters, stripped) is preferred: P(longer) > 0.5.

    Comparisons whose answers are equally long, or labelled exactly 0.5, are left out and counted.

    Returns:
        {"longer_wins", "comparisons" (those counted), "rate", "ci95", "chance": 0.5,
        "equal_length", "undecided"}.
    """
    wins = counted = equal = undecided = 0
    for label in labels:
        length_a, length_b = len(label["response_a"].strip()), len(label["response_b"].strip())
        if length_a == length_b:
            equal += 1
            continue
        p_longer = label["p_a"] if length_a > length_b else 1.0 - label["p_a"]
        if p_longer == 0.5:
            undecided += 1
            continue
        counted += 1
        wins += p_longer > 0.5
    return {
        "longer_wins": wins,
        "comparisons": counted,
        **proportion(wins, counted),
        "chance": 0.5,
        "equal_length": equal,
        "undecided": undecided,
    }


def label_diagnostics(labels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Position-flip rate and length bias of one label file, each with a 95% Wilson interval.

    Args:
        labels: AI label records (`response_a`, `response_b`, `p_a`; `orders_agree` or `readings`).

    Returns:
        {"labels", "interval", "position_flip": position_flips(...), "length_bias": length_bias(...)}.
    """
    return {
        "labels": len(labels),
        "interval": "95% Wilson score",
        "position_flip": position_flips(labels),
        "length_bias": length_bias(labels),
    }
