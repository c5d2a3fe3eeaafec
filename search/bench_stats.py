"""The search benchmark's statistics: how many trials a sampler needs to come close to the best known value.

A run is the sequence of its trials' figures (the best feasible value so far after each trial, or the hypervolume
of the feasible front so far); ``trials_to_reach`` is the first trial (counted from 1) at which it reaches the
target, or None when it never does. Quartiles over seeds count a run that never reaches it as infinitely long, so
a median of "never" means more than half the seeds missed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

NEVER = math.inf


def trials_to_reach(progress: Sequence[float], target: float) -> int | None:
    """The first trial (1-based) whose running figure is at least ``target``; None if none is."""
    for number, value in enumerate(progress, start=1):
        if value >= target:
            return number
    return None


def running_best(values: Sequence[float | None]) -> list[float]:
    """After each trial, the best value so far among the feasible ones (None: infeasible or failed); -inf before
    the first feasible trial."""
    best, out = -math.inf, []
    for value in values:
        if value is not None and value > best:
            best = value
        out.append(best)
    return out


def quantile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) with linear interpolation between order statistics; an infinite neighbour makes it
    infinite."""
    if not samples:
        raise ValueError("quantile of no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be between 0 and 1 but got {q}")
    ordered = sorted(samples)
    at = q * (len(ordered) - 1)
    low, high = ordered[math.floor(at)], ordered[math.ceil(at)]
    if math.isinf(low) or math.isinf(high):
        return max(low, high)
    return low + (high - low) * (at - math.floor(at))


def geometric_quantile(p: float, q: float) -> float:
    """The ``q`` quantile of the trials random sampling needs for a first success of probability ``p`` each (the
    share of a random sweep that reaches the target): the least n with 1 - (1 - p)^n >= q."""
    if not 0.0 <= q < 1.0:
        raise ValueError(f"q must be in [0, 1) but got {q}")
    if p <= 0.0:
        return NEVER
    if p >= 1.0 or q == 0.0:
        return 1.0
    return float(max(1, math.ceil(math.log1p(-q) / math.log1p(-p) - 1e-9)))


def hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """The area dominated by ``points`` (speed up, KL down) and bounded by ``reference`` (the least speed and the
    most KL that count); points outside it add nothing."""
    inside = sorted((s, k) for s, k in points if s > reference[0] and k < reference[1])
    area, best_kl = 0.0, reference[1]
    for speed, kl in reversed(inside):  # fastest first: each point adds the strip below the best KL so far
        if kl < best_kl:
            area += (speed - reference[0]) * (best_kl - kl)
            best_kl = kl
    return area
