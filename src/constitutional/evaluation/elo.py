"""Elo scores from pairwise comparisons (Bradley-Terry), with bootstrap confidence intervals.

The paper reports every model's harmlessness and helpfulness as an Elo score fitted to pairwise
preferences (Bai et al. 2022, figures 2-3): a difference of D points means the first model's answer
is preferred with probability 1 / (1 + 10^(-D/400)). Comparisons here may be soft (a judge's
probability that the first answer is better), which the Bradley-Terry likelihood takes as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ELO_PER_NAT = 400 / math.log(10)  # Elo points per unit of Bradley-Terry log-strength
PRIOR = 0.01  # a weak Gaussian prior on strengths: a model that wins every comparison stays finite


@dataclass(frozen=True)
class Comparison:
    """One judged comparison: the probability that model `first`'s answer beats model `second`'s.

    Attributes:
        group: what the comparison is about (the prompt id); the bootstrap resamples groups.
        first, second: model indices.
        p_first: in [0, 1]; 1 means the first answer is better, 0.5 a tie.
    """

    group: str
    first: int
    second: int
    p_first: float


def fit_strengths(comparisons: Sequence[Comparison], models: int) -> np.ndarray:
    """Bradley-Terry log-strengths by Newton's method (maximum a posteriori, weak prior).

    The loss is sum_c -[p log sigma(s_i - s_j) + (1 - p) log sigma(s_j - s_i)] + PRIOR/2 |s|^2:
    convex, and the prior makes it strictly so, so Newton converges in a few steps.

    Args:
        comparisons: the judged comparisons.
        models: how many models there are.

    Returns:
        [models] strengths in nats (mean zero).
    """
    first = np.array([c.first for c in comparisons], dtype=int)
    second = np.array([c.second for c in comparisons], dtype=int)
    label = np.array([c.p_first for c in comparisons], dtype=float)
    strengths = np.zeros(models)
    for _ in range(100):
        margin = strengths[first] - strengths[second]  # [comparisons]
        predicted = 1 / (1 + np.exp(-margin))
        residual = predicted - label  # d loss / d margin
        weight = predicted * (1 - predicted)  # d^2 loss / d margin^2
        gradient = PRIOR * strengths
        np.add.at(gradient, first, residual)
        np.add.at(gradient, second, -residual)
        hessian = PRIOR * np.eye(models)
        np.add.at(hessian, (first, first), weight)
        np.add.at(hessian, (second, second), weight)
        np.add.at(hessian, (first, second), -weight)
        np.add.at(hessian, (second, first), -weight)
        step = np.linalg.solve(hessian, gradient)
        strengths -= step
        if np.abs(step).max() < 1e-9:
            break
    return strengths - strengths.mean()


def elo_scores(
    comparisons: Sequence[Comparison],
    names: Sequence[str],
    anchor: int = 0,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Elo score of each model, relative to the anchor model (0), with a 95% bootstrap interval.

    The interval comes from refitting on prompts resampled with replacement (all comparisons of a
    prompt stay together), so it reflects how much the result depends on which prompts were asked.

    Args:
        comparisons: judged comparisons between the models.
        names: model names, by index.
        anchor: the model whose score is 0 (the paper anchors its plots on one model too).
        bootstrap: resamples (0: no interval).
        seed: the resampling seed.

    Returns:
        {name: {"elo", "low", "high", "comparisons"}}; models without comparisons are left out.
    """
    if not comparisons:
        return {}
    point = _relative_elo(fit_strengths(comparisons, len(names)), anchor)
    groups: dict[str, list[Comparison]] = {}
    for comparison in comparisons:
        groups.setdefault(comparison.group, []).append(comparison)
    keys = sorted(groups)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        chosen = rng.integers(0, len(keys), len(keys))
        resampled = [c for index in chosen for c in groups[keys[index]]]
        samples.append(_relative_elo(fit_strengths(resampled, len(names)), anchor))
    low, high = np.percentile(samples, [2.5, 97.5], axis=0) if samples else (point, point)
    counts = np.zeros(len(names), dtype=int)
    for comparison in comparisons:
        counts[comparison.first] += 1
        counts[comparison.second] += 1
    return {
        name: {
            "elo": round(float(point[i]), 1),
            "low": round(float(low[i]), 1),
            "high": round(float(high[i]), 1),
            "comparisons": int(counts[i]),
        }
        for i, name in enumerate(names)
        if counts[i]
    }


def _relative_elo(strengths: np.ndarray, anchor: int) -> np.ndarray:
    return (strengths - strengths[anchor]) * ELO_PER_NAT


def win_probability(elo_difference: float) -> float:
    """The probability that a model `elo_difference` points above another is preferred."""
    return 1 / (1 + 10 ** (-elo_difference / 400))
