"""Summaries of noisy repeated measurements: median with a bootstrap interval, paired ratios, slowest window."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 4000
CONFIDENCE = 0.95


def median_ci(values: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high): the median and its percentile-bootstrap 95% interval (Efron & Tibshirani 1993)."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("median_ci needs at least one value")
    rng = np.random.default_rng(seed)
    medians = np.median(x[rng.integers(0, x.size, (RESAMPLES, x.size))], axis=1)
    low, high = np.quantile(medians, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(np.median(x)), float(low), float(high)


def ratio_ci(a: Sequence[float], b: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """(median(a) / median(b), low, high) with pairs resampled together, as interleaved runs were paired."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.size != y.size or x.size == 0:
        raise ValueError(f"ratio_ci needs two equally long, non-empty samples, got {x.size} and {y.size}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, x.size, (RESAMPLES, x.size))
    ratios = np.median(x[picks], axis=1) / np.median(y[picks], axis=1)
    low, high = np.quantile(ratios, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(np.median(x) / np.median(y)), float(low), float(high)


def slowest_window(step_seconds: Sequence[float], windows: int = 10) -> tuple[float, float]:
    """(tokens/s of the slowest window, window length in seconds) over consecutive decode steps.

    The steps are cut into about ``windows`` spans of equal time, so a machine that throttles after a
    while shows a slow window even when the median repeat looks fine.
    """
    steps = np.asarray(step_seconds, np.float64)
    if steps.size == 0:
        raise ValueError("slowest_window needs at least one step")
    span = max(steps.sum() / windows, steps.max())
    slowest, count, elapsed = np.inf, 0, 0.0
    for step in steps:
        count += 1
        elapsed += step
        if elapsed >= span:
            slowest = min(slowest, count / elapsed)
            count, elapsed = 0, 0.0
    if not np.isfinite(slowest):  # fewer steps than one full window
        slowest = count / elapsed
    return float(slowest), float(span)
