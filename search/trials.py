"""From a trial's measurements (one BenchResult per repeat) to what the study is told: objective values and
constraints, and the summary kept with the trial (in Optuna's user attributes and in MLflow)."""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from engine.bench.stats import median_ci
from engine.config import EngineConfig
from engine.units import format_bytes
from search.experiment import Experiment
from search.tracking import REPEAT_METRICS

PEAK_METRICS = ("memory_peak_bytes", "peak_rss_bytes")  # summarised by their maximum, not their median
ATTR_CONFIG = "config"  # a trial's user attribute: the full EngineConfig it measured
ATTR_SUMMARY = "summary"  # its figures over the repeats (summarize)


def repeat_figures(result: dict) -> dict[str, Any]:
    """One repeat's figures (a BenchResult of one repeat)."""
    return {k: result.get(k) for k in REPEAT_METRICS}


def summarize(results: list[dict]) -> dict[str, Any]:
    """The trial's figures over its repeats: medians (peaks: maxima), the decode speed's interval, quality."""
    summary: dict[str, Any] = {"repeats": len(results)}
    for key in REPEAT_METRICS:
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            summary[key] = float(max(values) if key in PEAK_METRICS else np.median(values))
    speeds = [r["decode_tok_s"] for r in results if r.get("decode_tok_s") is not None]
    if len(speeds) >= 2:
        _, low, high = median_ci(speeds)
        summary["decode_tok_s_ci_low"], summary["decode_tok_s_ci_high"] = low, high
    quality = next((r for r in results if r.get("quality_top1") is not None), None)
    if quality is not None:
        for key in ("quality_top1", "quality_kl", "quality_ppl_delta"):
            summary[key] = quality[key]
    summary["memory_enforced"] = bool(results and results[0]["memory_limit"]["enforced"])
    return summary


def objective_values(experiment: Experiment, summary: dict[str, Any]) -> list[float]:
    """The study's values, in the experiment's order; KeyError naming a metric that was not measured."""
    values = []
    for metric, _ in experiment.objectives:
        value = memory_peak(summary) if metric == "memory_peak_bytes" else summary.get(metric)
        if value is None:
            raise KeyError(f"{metric} was not measured")
        values.append(float(value))
    return values


def constraints(experiment: Experiment, summary: dict[str, Any]) -> dict[str, float]:
    """Optuna constraints (feasible when <= 0): quality against the experiment's bounds, memory against the
    budget (the limit's own peak where it was enforced, else the process's peak RSS). Unmeasured quality
    counts as infeasible."""
    values = {}
    bounds = experiment.constraints
    if "min_quality_top1" in bounds:
        top1 = summary.get("quality_top1")
        values["quality_top1"] = 1.0 if top1 is None else bounds["min_quality_top1"] - top1
    if "max_quality_kl" in bounds:
        kl = summary.get("quality_kl")
        values["quality_kl"] = 1.0 if kl is None else kl - bounds["max_quality_kl"]
    peak = memory_peak(summary)
    if peak is not None:
        values["memory"] = (peak - experiment.memory_budget) / experiment.memory_budget
    return values


def feasible(constraint_values: dict[str, float]) -> bool:
    return all(v <= 0 for v in constraint_values.values())


def memory_peak(summary: dict[str, Any]) -> float | None:
    """The budget's own peak where the limit was enforced, else the process's peak RSS."""
    return summary.get("memory_peak_bytes") or summary.get("peak_rss_bytes")


def measured_feasible(study: optuna.Study) -> list[FrozenTrial]:
    """The trials measured to the end that meet every constraint."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if feasible(t.constraints) and ATTR_SUMMARY in t.user_attrs and ATTR_CONFIG in t.user_attrs
    ]


def speed_quality_front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials no other beats on both decode speed (up) and KL against the original weights (down), by
    speed; trials missing either figure are left out."""
    points = [(t.user_attrs[ATTR_SUMMARY].get("decode_tok_s"), t.user_attrs[ATTR_SUMMARY].get("quality_kl"), t)
              for t in trials]  # fmt: skip
    points = [p for p in points if p[0] is not None and p[1] is not None]
    front = [p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and q[:2] != p[:2] for q in points)]
    return [p[2] for p in sorted(front, key=lambda p: p[0])]


def describe(config: dict[str, Any], context: dict[str, int]) -> str:
    """The settings that differ from the engine's defaults (the model's own top-k and every core count as
    defaults), short enough for a log line."""
    default = EngineConfig().to_dict()
    default |= {"top_k": context.get("model_top_k"), "compute_threads": context.get("cpu_cores")}
    parts = []
    for key, value in config.items():
        if default.get(key) == value:
            continue
        if key.endswith("bytes"):
            value = format_bytes(value)
        elif isinstance(value, float):
            value = f"{value:.3g}"
        parts.append(f"{key}={value}")
    return " ".join(parts) or "(defaults)"
