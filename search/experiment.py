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
    repeats = 3                       # one cold measurement each, in its own child process
    warmup = 1                        # passes each measurement runs first and does not count
    timeout = "30m"                   # per measurement, after which the trial is recorded as failed (default 30m)
    confirm = 3                       # at the end, the best few re-measured interleaved with the default config
    confirm_repeats = 5

    [search]
    sampler = "tpe"                   # tpe | gp | cmaes | random | grid | nsga2
    seed = 0
    pruner = "wilcoxon"               # wilcoxon (stops trials clearly slower than the best, repeat by repeat) | none
    prune_p = 0.1                     # the pruner's significance threshold
    warm_start = []                   # exported configs (paths or globs, relative to this file), measured first
    recipes = true                    # the engine's best recipes (search/study.py) measured first too

    [executor]
    ray_address = "local"             # a local Ray instance started for the run, or an existing cluster's address

    [fidelity]                        # optional: screen configs in the trace simulator first
    trace = "data/m-trace.npz"        # recorded from the model and workload on first use if missing
    screen_ratio = 0.8                # measure for real only predictions >= this x the best prediction so far
    max_screened = 200                # screened-out trials allowed (default: 10 x budget.trials, else no cap)
    bandwidth = "2GB"                 # bytes/s the simulated disk serves (default: the probe's, per config)

Every table and key is checked when the file is loaded, with the file and the key in the message.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.bench.workloads import Workload, get_workload
from engine.config import read_toml
from engine.errors import FileError
from engine.synth import PRESETS
from engine.units import parse_bytes
from search.space import Space, load_space

SAMPLERS = ("tpe", "gp", "cmaes", "random", "grid", "nsga2")
DEFAULT_SAMPLER = "tpe"  # the fewest trials to 95% of the best on docs/benchmarks/search.md's objective
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
    "measure": {"repeats", "warmup", "timeout", "confirm", "confirm_repeats"},
    "search": {"sampler", "seed", "pruner", "prune_p", "warm_start", "recipes"},
    "executor": {"ray_address"},
    "fidelity": {"trace", "screen_ratio", "max_screened", "bandwidth"},
}
PRUNERS = ("wilcoxon", "none")
DEFAULT_TIMEOUT = "30m"
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
    trial_timeout_s: float  # per measurement
    confirm: int
    confirm_repeats: int
    sampler: str
    seed: int
    pruner: str
    prune_p: float
    warm_start: tuple[Path, ...]  # exported config files, enqueued after the engine's default
    ray_address: str  # "local": a Ray instance of the run's own
    trace: Path | None = None  # the low fidelity's routing trace
    screen_ratio: float = 0.8
    max_screened: int | None = None
    sim_bandwidth: float | None = None  # None: the probe's
    recipes: bool = True  # the engine's best recipes queued beside its default config (study.engine_recipes)

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
    sampler = search.get("sampler", DEFAULT_SAMPLER)
    if sampler not in SAMPLERS:
        raise ExperimentError(path, f"must be one of {', '.join(SAMPLERS)}, got {sampler!r}", field="search.sampler")
    if len(objectives) > 1 and sampler not in ("nsga2", "random", "tpe", "gp"):
        raise ExperimentError(path, f"{sampler} optimises one objective; this experiment has {len(objectives)}",
                              field="search.sampler")  # fmt: skip
    _check_sampler_needs(path, sampler, space)
    repeats = int(get.number(measure.get("repeats", 3), "measure.repeats", 1, None, integer=True))
    prune_p = get.number(search.get("prune_p", 0.1), "search.prune_p", 0.0, 1.0)
    pruner = _pruner(path, search.get("pruner"), repeats, prune_p, len(objectives))
    executor = get.table("executor")
    fidelity = _fidelity(path, get, trials)
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
        repeats=repeats,
        warmup=int(get.number(measure.get("warmup", 1), "measure.warmup", 0, None, integer=True)),
        trial_timeout_s=_duration(path, "measure.timeout", measure.get("timeout", DEFAULT_TIMEOUT)),
        confirm=int(get.number(measure.get("confirm", 3), "measure.confirm", 0, None, integer=True)),
        confirm_repeats=int(get.number(measure.get("confirm_repeats", 5), "measure.confirm_repeats", 2, None, True)),
        sampler=sampler,
        seed=int(get.number(search.get("seed", 0), "search.seed", 0, None, integer=True)),
        pruner=pruner,
        prune_p=prune_p,
        warm_start=_warm_start(path, search.get("warm_start", [])),
        recipes=_flag(path, search, "search.recipes", True),
        ray_address=get.optional(executor, "executor.ray_address", str) or "local",
        **fidelity,
    )


def _flag(path: Path, table: dict[str, Any], key: str, default: bool) -> bool:
    value = table.get(key.split(".", 1)[1], default)
    if not isinstance(value, bool):
        raise ExperimentError(path, f"must be true or false, got {value!r}", field=key)
    return value


def _objectives(path: Path, table: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    objectives = []
    for direction in ("maximize", "minimize"):
        metrics = table.get(direction, [])
        if isinstance(metrics, str):
            metrics = [metrics]
        if not isinstance(metrics, list):
            raise ExperimentError(path, "expected a metric name or a list of them", field=f"objective.{direction}")
        for metric in metrics:
            if not isinstance(metric, str) or metric not in METRICS:
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


def _pruner(path: Path, name: object, repeats: int, prune_p: float, objectives: int) -> str:
    """The pruner: Wilcoxon where it can stop a trial before its last repeat, else none. The test's smallest
    p-value with n paired repeats is 0.5**n, and a trial can be stopped after repeats - 1 of them; asked for
    where it could never stop anything, it is an error rather than a pruner that silently does nothing."""
    can_prune = 0.5 ** (repeats - 1) < prune_p and objectives == 1
    if name is None:
        return "wilcoxon" if can_prune else "none"
    if name not in PRUNERS:
        raise ExperimentError(path, f"must be one of {', '.join(PRUNERS)}, got {name!r}", field="search.pruner")
    if name == "wilcoxon" and objectives > 1:
        raise ExperimentError(path, "Optuna prunes single-objective studies only", field="search.pruner")
    if name == "wilcoxon" and not can_prune:
        smallest = next(n for n in range(2, 64) if 0.5 ** (n - 1) < prune_p)
        raise ExperimentError(path, f"the Wilcoxon pruner needs at least {smallest} repeats to stop a trial at "
                              f"prune_p {prune_p}", field="measure.repeats")  # fmt: skip
    return name


def _fidelity(path: Path, get: _Getter, trials: int | None) -> dict[str, Any]:
    table = get.table("fidelity")
    if not table:
        return {}
    trace = get.required(table, "fidelity.trace", str)
    max_screened = table.get("max_screened", 10 * trials if trials else None)
    bandwidth = table.get("bandwidth")
    if bandwidth is not None:
        try:
            bandwidth = float(parse_bytes(bandwidth, "fidelity.bandwidth"))
        except ValueError as e:
            raise ExperimentError(path, str(e), field="fidelity.bandwidth") from None
    return {
        "trace": Path(trace),
        "screen_ratio": get.number(table.get("screen_ratio", 0.8), "fidelity.screen_ratio", 0.0, 1.0),
        "max_screened": None
        if max_screened is None
        else int(get.number(max_screened, "fidelity.max_screened", 0, None, integer=True)),
        "sim_bandwidth": bandwidth,
    }


def _check_sampler_needs(path: Path, sampler: str, space: Space) -> None:
    """What a sampler needs beyond Optuna: a discrete space for grid, torch for gp."""
    if sampler == "grid":
        for param in space.params:
            if param.choices is None and not param.is_int and param.step is None:
                raise ExperimentError(
                    space.path, "the grid sampler needs a step for a float range", field=f"params.{param.name}"
                )
    if sampler == "gp" and importlib.util.find_spec("torch") is None:
        raise ExperimentError(
            path,
            "the gp sampler needs torch, which is not installed; install the CPU build "
            "(pip install torch --index-url https://download.pytorch.org/whl/cpu) or pick another sampler",
            field="search.sampler",
        )


def _warm_start(path: Path, patterns: object) -> tuple[Path, ...]:
    """The exported config files ``patterns`` name (relative to the experiment's folder); each must match."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ExperimentError(path, "expected a list of paths or globs", field="search.warm_start")
    files: list[Path] = []
    for pattern in patterns:
        base = Path(pattern) if Path(pattern).is_absolute() else path.parent / pattern
        matches = sorted(Path(base.anchor).glob(str(base.relative_to(base.anchor))))
        if not matches:
            raise ExperimentError(path, f"{pattern!r} matches no file", field="search.warm_start")
        files += [m for m in matches if m not in files]
    return tuple(files)


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
