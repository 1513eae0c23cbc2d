"""Confidence intervals for the shares the project reports (accuracies, flip rates, win rates) and means.

For shares, the Wilson score interval (Wilson 1927) rather than p -/+ 1.96 SE: Brown, Cai and DasGupta (2001)
recommend it for small n and for rates near 0 or 1, where the normal approximation leaves [0, 1]
or collapses to a point (13 of 13 correct is [0.77, 1], not [1, 1]).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion.

    Args:
        successes: how many of the n trials succeeded (0 <= successes <= n; a tie counted as half a
            success, as the PM's accuracy counts one, may make it fractional).
        n: trials, at least 1.
        z: the normal quantile (default: a two-sided 95% interval).

    Returns:
        (low, high), within [0, 1].
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"expected 0 <= successes <= n and n >= 1, got {successes} of {n}")
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, n: int) -> dict[str, Any]:
    """`rate` and its 95% Wilson interval `ci95`, both null when n is 0 (nothing to measure)."""
    if n == 0:
        return {"rate": None, "ci95": None}
    low, high = wilson_interval(successes, n)
    return {"rate": round(successes / n, 4), "ci95": [round(low, 4), round(high, 4)]}


def bootstrap_mean_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of the mean of `values` (resampled with replacement).

    For a paired comparison pass the per-item differences (RL-CAI's score minus SL-CAI's on the
    same prompt): the interval is then over items, which is where the uncertainty lies.

    Raises:
        ValueError: no values, or fewer than 40 resamples (too few for the 2.5% and 97.5% points).
    """
    if not values or resamples < 40:
        raise ValueError(f"expected values and at least 40 resamples, got {len(values)} values, {resamples} resamples")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]
