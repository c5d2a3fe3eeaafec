"""What the search's machinery costs per trial: a real short ``autoresearch tune`` (a local Ray, the MLflow SQLite
store, the journal), its driver's time against the measurements' own.

The experiment is the quickstart's with a few trials and no confirmation, written under ``runs/bench-search/`` and
run from a fresh study. Each Ray task reports its measurement's own wall time (``search.executor.measure``:
``run_bench``, whose child process runs the engine), summed per trial into the MLflow metric ``measure_seconds``.
A trial's cycle is the time from its start (Optuna's ``datetime_start``, at ``ask``) to the next trial's: all the
driver does for it (ask, sampling, the MLflow run and its metrics and artifacts, journal writes, Ray's submit,
scheduling and result, pruning) plus the measurements. The overhead is the cycle less the measurements.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from search import bench_stats as stats
from search.experiment import Experiment
from search.study import journal
from search.ui import default_tracking_uri

NAME = "overhead"
TARGET = 0.03


def measure_overhead(quickstart: Experiment, runs: Path, trials: int) -> dict[str, Any]:
    """Run the short tune from scratch and return its per-trial cycles, measurements and overhead."""
    runs = runs / "bench-search"
    shutil.rmtree(runs, ignore_errors=True)  # this benchmark's own directory: a fresh study and store each time
    runs.mkdir(parents=True)
    experiment = runs / f"{NAME}.toml"
    experiment.write_text(_experiment_toml(quickstart, trials))
    command = [sys.executable, "-m", "search.cli", "tune", str(experiment), "--runs", str(runs)]
    subprocess.run(command, check=True)
    return _figures(runs)


def _experiment_toml(quickstart: Experiment, trials: int) -> str:
    constraints = "\n".join(f"{key} = {value}" for key, value in quickstart.constraints.items())
    return f"""# Written by make bench-search: the quickstart, a few trials, no confirmation.
[experiment]
model = "{quickstart.model.resolve()}"
workload = "{quickstart.workload.name}"
space = "{quickstart.space.path.resolve()}"
memory_budget = {quickstart.memory_budget}

[objective]
maximize = "decode_tok_s"

[constraints]
{constraints}

[budget]
trials = {trials}

[measure]
repeats = {quickstart.repeats}
warmup = {quickstart.warmup}
confirm = 0

[search]
sampler = "{quickstart.sampler}"
seed = 0
"""


def _figures(runs: Path) -> dict[str, Any]:
    import optuna

    study = optuna.load_study(study_name=NAME, storage=journal(runs / NAME))
    client = MlflowClient(default_tracking_uri(runs))
    experiment = client.get_experiment_by_name(NAME)
    measured: dict[int, float] = {}
    for run in client.search_runs([experiment.experiment_id]):
        if "trial" in run.data.tags and "measure_seconds" in run.data.metrics:
            measured[int(run.data.tags["trial"])] = run.data.metrics["measure_seconds"]
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    rows = []
    for trial, following in itertools.pairwise(trials):  # the last has no next start
        if trial.number not in measured or trial.datetime_start is None or following.datetime_start is None:
            continue
        cycle = (following.datetime_start - trial.datetime_start).total_seconds()
        row = {"trial": trial.number, "state": trial.state.name, "cycle_s": cycle, "measure_s": measured[trial.number]}
        rows.append(row)
    for row in rows:
        row["overhead_s"] = row["cycle_s"] - row["measure_s"]
        row["overhead"] = row["overhead_s"] / row["cycle_s"]
    total_cycle = sum(r["cycle_s"] for r in rows)
    total_overhead = sum(r["overhead_s"] for r in rows)
    return {"trials": rows, "overhead": total_overhead / total_cycle if total_cycle else None}


def overhead_section(figures: dict[str, Any]) -> str:
    rows = figures["trials"]
    shares = [r["overhead"] for r in rows]
    lines = [
        "## Overhead per trial: Optuna + Ray + MLflow against the measurement",
        "",
        "A real `autoresearch tune` of the quickstart's model and space (a local Ray, the MLflow SQLite store, the "
        "journal; no confirmation), from a fresh study. A trial's cycle runs from its start to the next trial's; "
        "the measurement is the Ray task's own `run_bench` time (its child process: load, warm-up, the measured "
        "pass, and for the first trial with quality the reference run); the overhead is the rest.",
        "",
        "| trial | state | cycle s | measurement s | overhead s | overhead |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['trial']} | {r['state']} | {r['cycle_s']:.2f} | {r['measure_s']:.2f} | "
                     f"{r['overhead_s']:.3f} | {100 * r['overhead']:.2f}% |")  # fmt: skip
    if rows:
        lines += [
            "",
            f"- overhead over all {len(rows)} trials: **{100 * figures['overhead']:.2f}%** of their time "
            f"(target: under {TARGET:.0%}); per trial median {100 * stats.quantile(shares, 0.5):.2f}% "
            f"[{100 * stats.quantile(shares, 0.25):.2f}%, {100 * stats.quantile(shares, 0.75):.2f}%], "
            f"most {100 * max(shares):.2f}%",
        ]
    return "\n".join(lines)
