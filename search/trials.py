"""From a trial's measurements (one BenchResult per repeat) to what the study is told: objective values and
constraints, and the summary kept with the trial (in Optuna's user attributes and in MLflow)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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
ATTR_BOUNDS = "constraints"  # a study's user attribute: the [constraints] table of its latest run
ATTR_RUN = "mlflow_run_id"  # a trial's (and the study's) MLflow run
ATTR_STOP = "stopped_early"  # why a trial ran fewer repeats than asked
ATTR_FIDELITY = "fidelity"  # "simulator" on trials the simulator screened out (the others were measured)
SIMULATOR = "simulator"
ATTR_NODE = "node"  # the Ray node that measured it ({"id", "host"}): its repeats all ran there
DASHBOARD_CONSTRAINTS = "constraints"  # a trial's system attribute: its constraints as optuna-dashboard reads them
# KL differences below this are float32 rounding: the original weights against themselves measure 1e-9 to 2e-9
# nats on the synthetic checkpoints, the sum over a vocabulary of terms that are 0 in exact arithmetic.
KL_ROUNDING = 1e-8
FILE_KEYS = {"quality_top1": "min_quality_top1", "quality_kl": "max_quality_kl", "memory": "memory_budget"}


def repeat_figures(result: dict) -> dict[str, Any]:
    """One repeat's figures (a BenchResult of one repeat)."""
    return {k: result.get(k) for k in REPEAT_METRICS}


def node_tags(node: dict | None) -> dict[str, str]:
    """The MLflow tags that name the node a run was measured on."""
    return {"node": node["host"], "node_id": node["id"]} if node else {}


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
    quality = next((r for r in results if r.get("quality_kl") is not None), None)
    if quality is not None:
        for key in ("quality_top1", "quality_top1_excluded", "quality_kl", "quality_ppl_delta"):
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
    values = quality_constraints(experiment.constraints, summary)
    peak = memory_peak(summary)
    if peak is not None:
        values["memory"] = (peak - experiment.memory_budget) / experiment.memory_budget
    return values


def quality_constraints(bounds: dict[str, float], summary: dict[str, Any]) -> dict[str, float]:
    """The quality constraints of a trial's figures against a [constraints] table (unmeasured: infeasible)."""
    values = {}
    if "min_quality_top1" in bounds:
        top1 = summary.get("quality_top1")
        values["quality_top1"] = 1.0 if top1 is None else bounds["min_quality_top1"] - top1
    if "max_quality_kl" in bounds:
        kl = summary.get("quality_kl")
        values["quality_kl"] = 1.0 if kl is None else kl - bounds["max_quality_kl"]
    return values


def set_constraints(trial: optuna.Trial, values: dict[str, float]) -> None:
    """Optuna 5's named constraints, and the same values as the unnamed list optuna-dashboard 0.21 reads (the
    system attribute ``constraints``, Optuna's older form), by which its plots tell infeasible trials apart.
    Optuna reads that list back under the keys "0", "1", ...: ``named`` leaves them out."""
    for key, value in values.items():
        trial.set_constraint(key, value)
    trial.storage.set_trial_system_attr(trial._trial_id, DASHBOARD_CONSTRAINTS, list(values.values()))


def named(constraint_values: dict[str, float]) -> dict[str, float]:
    """A trial's constraints by name, without the unnamed copies ``set_constraints`` writes for the dashboard."""
    return {k: v for k, v in constraint_values.items() if not k.isdigit()}


def judged(trial: FrozenTrial, bounds: dict[str, float] | None) -> dict[str, float]:
    """A trial's constraints as the study's latest run sees them: its quality judged again against ``bounds``
    (that run's [constraints] table, when the study records one), so trials measured under other bounds are
    neither exported nor reported against the current ones; its memory as stored (the budget cannot change)."""
    if bounds is None or ATTR_SUMMARY not in trial.user_attrs:
        return named(trial.constraints)
    kept = {k: v for k, v in named(trial.constraints).items() if k not in ("quality_top1", "quality_kl")}
    return kept | quality_constraints(bounds, trial.user_attrs[ATTR_SUMMARY])


def feasible(constraint_values: dict[str, float]) -> bool:
    return all(v <= 0 for v in constraint_values.values())


def memory_peak(summary: dict[str, Any]) -> float | None:
    """The budget's own peak where the limit was enforced, else the process's peak RSS."""
    return summary.get("memory_peak_bytes") or summary.get("peak_rss_bytes")


def measured(study: optuna.Study) -> list[FrozenTrial]:
    """The trials measured to the end (complete, with their figures and config), feasible or not."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if ATTR_SUMMARY in t.user_attrs and ATTR_CONFIG in t.user_attrs
    ]


def measured_feasible(study: optuna.Study) -> list[FrozenTrial]:
    """The trials measured to the end that meet every constraint (quality judged against the latest run's)."""
    bounds = study.user_attrs.get(ATTR_BOUNDS)
    return [t for t in measured(study) if feasible(judged(t, bounds))]


@dataclass(frozen=True)
class Violation:
    key: str  # the experiment file's key: min_quality_top1, max_quality_kl or memory_budget
    text: str  # the figure against its bound, e.g. "quality_top1 0.91 < 0.95"
    excess: float  # by how much, relative to the bound (how "closest" is judged)


def violations(trial: FrozenTrial, constraint_values: dict[str, float], budget: int | None) -> list[Violation]:
    """The constraints a measured trial breaks, each with its figure (bounds are recovered from the stored
    differences, so this reads any study)."""
    summary = trial.user_attrs.get(ATTR_SUMMARY, {})
    found = []
    for key, value in constraint_values.items():
        if value <= 0:
            continue
        figure = memory_peak(summary) if key == "memory" else summary.get(key)
        if figure is None:
            found.append(Violation(FILE_KEYS.get(key, key), f"{key} not measured", value))
        elif key == "quality_top1":
            bound = figure + value
            found.append(Violation(FILE_KEYS[key], f"quality_top1 {figure:.4g} < {bound:.4g}", value / (bound or 1.0)))
        elif key == "quality_kl":
            bound = figure - value
            found.append(Violation(FILE_KEYS[key], f"quality_kl {figure:.4g} > {bound:.4g}", value / (bound or 1.0)))
        elif key == "memory":
            budget = budget or figure / (1.0 + value)
            text = f"memory peak {format_bytes(figure)} > memory_budget {format_bytes(budget)}"
            found.append(Violation(FILE_KEYS[key], text, value))
        else:
            found.append(Violation(key, f"{key} {value:+.4g} over its bound", value))
    return found


def speed_quality_front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials no other beats on both decode speed (up) and KL against the original weights (down), by
    speed; trials missing either figure are left out. KLs within ``KL_ROUNDING`` of each other count as equal, so
    a lossless trial is not kept beside a faster lossless one by float32 rounding alone."""
    points = [(t.user_attrs[ATTR_SUMMARY].get("decode_tok_s"), t.user_attrs[ATTR_SUMMARY].get("quality_kl"), t)
              for t in trials]  # fmt: skip
    points = [p for p in points if p[0] is not None and p[1] is not None]

    def beats(q: tuple, p: tuple) -> bool:
        no_worse = q[0] >= p[0] and q[1] <= p[1] + KL_ROUNDING
        return no_worse and (q[0] > p[0] or q[1] < p[1] - KL_ROUNDING)

    front = [p for p in points if not any(beats(q, p) for q in points)]
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


def best_trials(study: optuna.Study, experiment: Experiment, count: int) -> list:
    """The best feasible complete trials: by value (one objective) or the Pareto front (several), at most
    ``count``, one per distinct config."""
    complete = measured_feasible(study)
    if experiment.multi_objective:
        front = {t.number for t in study.best_trials}
        complete = [t for t in complete if t.number in front]
    sign = -1.0 if experiment.objectives[0][1] == "maximize" else 1.0
    complete.sort(key=lambda t: sign * t.values[0])
    chosen, seen = [], set()
    for t in complete:
        key = repr(sorted(t.user_attrs[ATTR_CONFIG].items()))
        if key not in seen:
            seen.add(key)
            chosen.append(t)
    return chosen[:count]


def explicit(config: EngineConfig, context: dict[str, int]) -> dict[str, Any]:
    """``config``'s settings with the model's own top-k and every core made explicit numbers, so that a default and
    the same value spelled out compare (and read) alike."""
    values = dataclasses.asdict(config)
    values["top_k"] = config.top_k or context["model_top_k"]
    values["compute_threads"] = config.compute_threads or context["cpu_cores"]
    return values


def run_params(config: EngineConfig, context: dict[str, int], search: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config as every MLflow run logs it: ``explicit`` values, each byte count also readable
    (``cache_bytes_readable`` = "1.5 GiB"), and the search's own encoding of them, when there is one, as
    ``search.<param>`` (a cache size as a fraction of the budget, say): what Optuna stores."""
    values = explicit(config, context)
    readable = {f"{k}_readable": format_bytes(v) for k, v in values.items() if k.endswith("_bytes") and v}
    return values | readable | search_params(search or {})


def search_params(params: dict[str, Any]) -> dict[str, Any]:
    return {f"search.{k}": v for k, v in params.items()}


def values_text(experiment: Experiment, values: list[float] | None) -> str:
    if not values:
        return "n/a"
    return ", ".join(f"{m} {v:.4g}" for (m, _), v in zip(experiment.objectives, values, strict=True))
