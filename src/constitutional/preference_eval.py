"""How well a preference model predicts held-out comparisons: accuracy and calibration.

Accuracy is the share of comparisons where the PM's sigma(r_A - r_B) picks the labelled winner,
with a 95% Wilson interval, reported beside chance and a length-only baseline (the longer answer
wins), and with how often the PM itself picks the longer answer (a PM near 1.0 there has learnt
length, not content); `verdict` puts the comparison in words. Calibration compares the PM's
probability that A is better with the labels: the expected calibration error and a reliability
diagram, as in the paper's PM calibration figure. Stage `pm` writes them to
`eval/pm.json` and `eval/pm_calibration.png`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from constitutional.intervals import wilson_interval
from constitutional.preference import PreferenceModel
from constitutional.records import conversation


def held_out_figures(
    pm: PreferenceModel, rows: list[dict[str, Any]], bins: int
) -> tuple[dict[str, Any], dict[str, Any], tuple[list[float], list[float]]]:
    """Accuracy and calibration of `pm` on comparison rows (`response_a`, `response_b`, label `p_a`).

    Args:
        pm: the preference model.
        rows: comparisons of one source.
        bins: calibration bins on [0, 1].

    Returns:
        The accuracy entry (comparisons, pm, pm_ci95, length_baseline, chance, pm_prefers_longer),
        the calibration entry (ece, bins) and the points of the reliability diagram: the PM's
        P(A better) and the labels.
    """
    margins = score_margins(pm, rows)
    labels = [float(row["p_a"]) for row in rows]
    predicted = [1 / (1 + math.exp(-margin)) for margin in margins]
    longer = [_longer_first(row) for row in rows]
    accuracy = agreement(predicted, labels)
    decided = sum(label != 0.5 for label in labels)
    entry = {
        "comparisons": len(rows),
        "pm": round(accuracy, 4),
        "pm_ci95": [round(bound, 4) for bound in wilson_interval(accuracy * decided, decided)] if decided else None,
        "length_baseline": round(agreement(longer, labels), 4),
        "chance": 0.5,
        # The length baseline's question asked of the PM: a PM at 1.0 here is a length detector.
        "pm_prefers_longer": round(agreement(predicted, longer), 4),
    }
    return entry, calibration(predicted, labels, bins), (predicted, labels)


def verdict(entry: dict[str, Any]) -> str:
    """Whether a PM's accuracy beats chance and the length baseline, in words, from its 95% interval.

    A PM "beats" a reference when the whole interval lies above it and is "below" it when the
    whole interval lies beneath; otherwise it is "within noise of" it.
    """
    if entry.get("pm_ci95") is None:
        return "no comparison has a winner: nothing to measure"
    low, high = entry["pm_ci95"]

    def against(reference: float, name: str) -> str:
        if low > reference:
            return f"beats {name}"
        if high < reference:
            return f"is below {name}"
        return f"is within noise of {name}"

    return (
        f"{against(entry['chance'], 'chance')} and {against(entry['length_baseline'], 'the length baseline')} "
        f"(95% interval {low:.0%}-{high:.0%})"
    )


def score_margins(pm: PreferenceModel, rows: list[dict[str, Any]]) -> list[float]:
    """r_A - r_B for each comparison (one batched scoring call for all 2N transcripts)."""
    conversations = [conversation(row) for row in rows]
    scores = pm.score(conversations * 2, [row["response_a"] for row in rows] + [row["response_b"] for row in rows])
    return [scores[index] - scores[index + len(rows)] for index in range(len(rows))]


def agreement(predicted: Sequence[float], labels: Sequence[float]) -> float:
    """Share of comparisons where the prediction picks the labelled winner; ties count half.

    Both are probabilities that A is better; comparisons labelled exactly 0.5 have no winner and
    are left out.
    """
    scored = [(p, label) for p, label in zip(predicted, labels) if label != 0.5]
    if not scored:
        return float("nan")
    return sum(0.5 if p == 0.5 else float((p > 0.5) == (label > 0.5)) for p, label in scored) / len(scored)


def _longer_first(row: dict[str, Any]) -> float:
    """The length-only baseline: the longer answer wins (1.0 if A is longer, 0.0 if B, 0.5 if equal)."""
    a, b = len(row["response_a"].strip()), len(row["response_b"].strip())
    return 1.0 if a > b else 0.0 if b > a else 0.5


def calibration(predicted: Sequence[float], labels: Sequence[float], bins: int) -> dict[str, Any]:
    """Expected calibration error and the reliability table of P(A better) against the labels.

    Predictions are binned on [0, 1]; in each bin the mean prediction is compared with the mean
    label (the observed frequency for 0/1 labels). ECE = sum_b (n_b / N) |mean label_b - mean prediction_b|.
    """
    table = []
    error = 0.0
    for b in range(bins):
        members = [
            (p, y) for p, y in zip(predicted, labels) if b / bins <= p < (b + 1) / bins or (b == bins - 1 and p == 1.0)
        ]
        if not members:
            continue
        confidence = sum(p for p, _ in members) / len(members)
        frequency = sum(y for _, y in members) / len(members)
        error += len(members) / len(predicted) * abs(frequency - confidence)
        table.append({"bin": [b / bins, (b + 1) / bins], "count": len(members), "mean_predicted": round(confidence, 4),
                      "mean_label": round(frequency, 4)})  # fmt: skip
    return {"ece": round(error, 4), "bins": table}


def plot_calibration(points: dict[str, tuple[list[float], list[float]]], bins: int, path: Path) -> None:
    """A reliability diagram, one line per source (as in the paper's PM calibration figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for source, (predicted, labels) in points.items():
        table = calibration(predicted, labels, bins)["bins"]
        axis.plot(
            [row["mean_predicted"] for row in table], [row["mean_label"] for row in table], marker="o",
            label=f"{source} (n={len(predicted)})",
        )  # fmt: skip
    axis.set_xlabel("PM probability that A is better")
    axis.set_ylabel("label: frequency (or mean probability) that A is better")
    axis.set_title("Preference model calibration (held out)")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
