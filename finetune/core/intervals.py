"""Confidence intervals for a proportion, and what a sample of a given size can tell from chance.

Basic module: pure arithmetic, it imports nothing of the project. The preference data checks use it to say, before
a run, how many held-out pairs a verdict would need; the evaluation uses it on the run's results.
"""

from __future__ import annotations

import math

Z_95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def wilson_interval(successes: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion; unlike p ± z·SE it stays inside [0, 1] and works for p = 0 or 1."""
    if n <= 0:
        raise ValueError("a confidence interval needs at least one vote")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def fewest_right_beyond_chance(n: int) -> int | None:
    """The fewest right answers of ``n`` whose 95% interval lies wholly above 0.5 (None: not even all ``n``)."""
    return next((right for right in range(n + 1) if wilson_interval(right, n)[0] > 0.5), None) if n > 0 else None
