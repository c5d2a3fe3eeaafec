"""Experiment files (``experiments/*.toml``): what a tuning run measures, under which budget, towards what.

::

    [experiment]
    model = "data/quickstart-model"   # a checkpoint directory (relative: from the working directory)
    synth_preset = "quickstart"       # optional: made with `autoresearch synth --preset` when missing
    workload = "decode-short"
    space = "default"                 # a name in spaces/, or a .toml path (relative: from this file's folder)
    memory_budget = "1GiB"            # enforced on every measurement

    [objective]
    maximize = ["decode_tok_s"]       # one metric, or several for a Pareto front
    minimize = []

    [constraints]                     # optional; quality is measured against the original weights
    min_quality_top1 = 0.95
    max_quality_kl = 0.05

    [budget]                          # trials, wall time, or both (whichever ends first)
    trials = 20
    time = "10m"

    [measure]
    repeats = 3
    warmup = 1
    timeout = "10m"                   # per trial, after which it is recorded as failed

    [search]
    sampler = "tpe"                   # tpe | gp | cmaes | random | grid | nsga2
    seed = 0

Every table and key is checked when the file is loaded, with the file and the key in the message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import read_toml
from engine.errors import FileError
from engine.synth import PRESETS
from engine.units import parse_bytes
from engine.workloads import Workload, get_workload
from search.space import Space, load_space

SAMPLERS = ("tpe", "gp", "cmaes", "random", "grid", "nsga2")
METRICS = {  # BenchResult fields an objective may name, and the direction that is better
    "decode_tok_s": "maximize",
    "prefill_tok_s": "maximize",
    "ttft_s": "minimize",
    "quality_top1": "maximize",
    "quality_kl": "minimize",
    "memory_peak_bytes": "minimize",
}
CONSTRAINTS = {"min_quality_top1": "quality_top1", "max_quality_kl": "quality_kl"}
TABLES = {
    "experiment": {"model", "synth_preset", "workload", "space", "memory_budget"},
    "objective": {"maximize", "minimize"},
    "constraints": set(CONSTRAINTS),
    "budget": {"trials", "time"},
    "measure": {"repeats", "warmup", "timeout"},
    "search": {"sampler", "seed"},
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ExperimentError(FileError):
    """An experiment file that cannot be run."""


@dataclass(frozen=True)
class Experiment:
    path: Path
    name: str  # the file's stem: the MLflow experiment and the study are named after it
    model: Path
    synth_preset: str | None
    workload: Workload
    space: Space
    memory_budget: int
    objectives: tuple[tuple[str, str], ...]  # (metric, "maximize" | "minimize")
    constraints: dict[str, float]
    trials: int | None
    time_budget_s: float | None
    repeats: int
    warmup: int
    trial_timeout_s: float | None
    sampler: str
    seed: int

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    document = read_toml(path, ExperimentError, "no such experiment file")
    for table, values in document.items():
        if table not in TABLES:
            raise ExperimentError(path, f"unknown table; an experiment has {', '.join(TABLES)}", field=table)
        if not isinstance(values, dict):
            raise ExperimentError(path, "expected a table", field=table)
        for key in values:
            if key not in TABLES[table]:
                raise ExperimentError(path, f"unknown key; [{table}] takes {', '.join(sorted(TABLES[table]))}",
                                      field=f"{table}.{key}")  # fmt: skip
    get = _Getter(path, document)
    experiment = get.table("experiment")
    model = get.required(experiment, "experiment.model", str)
    workload_name = get.required(experiment, "experiment.workload", str)
    try:
        workload = get_workload(workload_name)
    except ValueError as e:
        raise ExperimentError(path, str(e), field="experiment.workload") from None
    space_name = get.required(experiment, "experiment.space", str)
    space_path = Path(space_name) if space_name.endswith(".toml") else space_name
    if isinstance(space_path, Path) and not space_path.is_absolute():
        space_path = path.parent / space_path
    space = load_space(space_path)
    budget_text = get.required(experiment, "experiment.memory_budget", str | int)
    try:
        memory_budget = parse_bytes(budget_text, "experiment.memory_budget")
    except ValueError as e:
        raise ExperimentError(path, str(e), field="experiment.memory_budget") from None
    objectives = _objectives(path, get.table("objective"))
    constraints = {}
    for key, value in get.table("constraints").items():
        constraints[key] = get.number(value, f"constraints.{key}", 0.0, 1.0 if key == "min_quality_top1" else None)
    budget = get.table("budget")
    trials = budget.get("trials")
    if trials is not None:
        trials = int(get.number(trials, "budget.trials", 1, None, integer=True))
    time_budget = _duration(path, "budget.time", budget["time"]) if "time" in budget else None
    if trials is None and time_budget is None:
        raise ExperimentError(path, "give trials, time, or both", field="budget")
    measure = get.table("measure")
    search = get.table("search")
    sampler = search.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise ExperimentError(path, f"must be one of {', '.join(SAMPLERS)}, got {sampler!r}", field="search.sampler")
    if len(objectives) > 1 and sampler not in ("nsga2", "random", "tpe", "gp"):
        raise ExperimentError(path, f"{sampler} optimises one objective; this experiment has {len(objectives)}",
                              field="search.sampler")  # fmt: skip
    return Experiment(
        path=path,
        name=path.stem,
        model=Path(model),
        synth_preset=_preset(path, get.optional(experiment, "experiment.synth_preset", str)),
        workload=workload,
        space=space,
        memory_budget=memory_budget,
        objectives=objectives,
        constraints=constraints,
        trials=trials,
        time_budget_s=time_budget,
        repeats=int(get.number(measure.get("repeats", 3), "measure.repeats", 1, None, integer=True)),
        warmup=int(get.number(measure.get("warmup", 1), "measure.warmup", 0, None, integer=True)),
        trial_timeout_s=_duration(path, "measure.timeout", measure["timeout"]) if "timeout" in measure else None,
        sampler=sampler,
        seed=int(get.number(search.get("seed", 0), "search.seed", 0, None, integer=True)),
    )


def _objectives(path: Path, table: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    objectives = []
    for direction in ("maximize", "minimize"):
        metrics = table.get(direction, [])
        if isinstance(metrics, str):
            metrics = [metrics]
        if not isinstance(metrics, list):
            raise ExperimentError(path, "expected a metric name or a list of them", field=f"objective.{direction}")
        for metric in metrics:
            if metric not in METRICS:
                raise ExperimentError(path, f"unknown metric {metric!r}; one of {', '.join(METRICS)}",
                                      field=f"objective.{direction}")  # fmt: skip
            if METRICS[metric] != direction:
                raise ExperimentError(path, f"{metric} is better {METRICS[metric][:-1]}ed, not {direction[:-1]}ed",
                                      field=f"objective.{direction}")  # fmt: skip
            objectives.append((metric, direction))
    if not objectives:
        return (("decode_tok_s", "maximize"),)
    if len({m for m, _ in objectives}) != len(objectives):
        raise ExperimentError(path, "names a metric twice", field="objective")
    return tuple(objectives)


def _preset(path: Path, name: str | None) -> str | None:
    if name is not None and name not in PRESETS:
        raise ExperimentError(
            path, f"must be one of {', '.join(PRESETS)}, got {name!r}", field="experiment.synth_preset"
        )
    return name


def _duration(path: Path, key: str, value: object) -> float:
    """Seconds from ``"8h"``, ``"30m"``, ``"90s"``, ``"1d"`` or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ExperimentError(path, f"expected a duration such as 8h, 30m or 90s, got {value!r}", field=key)
    return float(match.group(1)) * _SECONDS[match.group(2)]


class _Getter:
    def __init__(self, path: Path, document: dict[str, Any]) -> None:
        self.path, self.document = path, document

    def table(self, name: str) -> dict[str, Any]:
        return self.document.get(name, {})

    def required(self, table: dict[str, Any], key: str, kind: Any) -> Any:
        if key.split(".", 1)[1] not in table:
            raise ExperimentError(self.path, "missing", field=key)
        return self.optional(table, key, kind)

    def optional(self, table: dict[str, Any], key: str, kind: Any) -> Any:
        value = table.get(key.split(".", 1)[1])
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise ExperimentError(self.path, f"has the wrong type: {value!r}", field=key)
        return value

    def number(self, value: object, key: str, low: float, high: float | None, integer: bool = False) -> float:
        kind = int if integer else int | float
        if isinstance(value, bool) or not isinstance(value, kind) or value < low or (high is not None and value > high):
            expected = "an integer" if integer else "a number"
            bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise ExperimentError(self.path, f"expected {expected} {bounds}, got {value!r}", field=key)
        return value
