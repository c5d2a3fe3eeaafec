"""The search benchmark's studies: the tuner's sampler, space and constraints, one seed at a time, on the cheap
objective (``search.bench_objective``), in worker processes that each load the objective once.

A study here is the tuner's minus the measuring: ``make_sampler`` and ``enqueue_warm_start`` as ``search.study``
has them, ``Space.sample`` for the config, the experiment's constraints set on the trial (``trial.set_constraint``,
which Optuna 5's TPE, GP and NSGA-II samplers learn from; CMA-ES ignores them) and its objective values told.
Deterministic given the seed: the samplers are seeded and the objective is a function of the config.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from engine.errors import ConfigError
from search import bench_stats as stats
from search import trials as figures
from search.bench_fixtures import Fixtures
from search.bench_objective import Objective
from search.experiment import Experiment
from search.space import Space
from search.study import enqueue_warm_start, make_sampler

# Samplers the tuner does not offer, for comparison: TPE as the tuner built it before this benchmark chose otherwise.
VARIANTS = {"tpe (group)": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)}
# Knobs that change the output: a lossless phase leaves them at the model's own (original weights, every expert).
LOSSY = ("weights", "group_size", "resident_weights", "top_k", "cache_routing_tolerance", "activations")
PARETO = (("decode_tok_s", "maximize"), ("quality_kl", "minimize"))


@dataclass(frozen=True)
class Setup:
    """How a study starts: which configs are queued first, and how many trials leave the lossy knobs out."""

    name: str
    warm_start: bool = True  # the tuner's warm starts (enqueue_warm_start) first
    recipes: bool = False  # with the engine's recipes among them (experiment.recipes)
    lossless_first: int = 0


@dataclass(frozen=True)
class Task:
    setup: Setup
    sampler: str
    seed: int
    trials: int
    pareto: bool = False
    # stop once the best feasible value (Pareto: the front's hypervolume) reaches this: the rest of the study cannot
    # change its trials to the target, and GP's sampling takes seconds a trial
    target: float | None = None
    max_kl: float = 0.05  # the Pareto case's reference point: no speed, this much KL


# Per trial: (decode tok/s, KL, feasible), or None for a config the engine refuses.
Trial = tuple[float, float, bool] | None

_objective: Objective | None = None


def run_tasks(
    tasks: list[Task], fixtures: Fixtures, experiment: Experiment, context: dict[str, int], jobs: int
) -> list[tuple[list[Trial], float]]:
    """Every task's trials and wall seconds, in order; ``jobs`` worker processes."""
    # spawned, not forked: a fork of this process (BLAS, numba and tokenizer threads) can inherit a held lock
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=spawn, initializer=_load, initargs=(fixtures,)) as pool:
        futures = [pool.submit(_timed, task, experiment, context) for task in tasks]
        return [f.result() for f in futures]


def _timed(task: Task, experiment: Experiment, context: dict[str, int]) -> tuple[list[Trial], float]:
    began = time.perf_counter()
    trials = run_task(task, experiment, context)
    return trials, time.perf_counter() - began


def _load(fixtures: Fixtures) -> None:
    global _objective
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # GP's torch: one thread per worker, the workers share the cores
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    _objective = Objective(fixtures)


def run_task(task: Task, experiment: Experiment, context: dict[str, int]) -> list[Trial]:
    """One study of ``task.trials`` trials, as the tuner runs it (see the module's docstring)."""
    assert _objective is not None, "run_task runs in a worker that _load prepared"
    objectives = PARETO if task.pareto else experiment.objectives[:1]
    experiment = dataclasses.replace(experiment, sampler=task.sampler, seed=task.seed, objectives=objectives,
                                     warm_start=(), recipes=task.setup.recipes)  # fmt: skip
    with warnings.catch_warnings():  # experimental features; CMA-ES warning that it ignores constraints
        warnings.simplefilter("ignore")
        sampler = VARIANTS[task.sampler](task.seed) if task.sampler in VARIANTS else make_sampler(experiment)
        study = optuna.create_study(directions=[d for _, d in objectives], sampler=sampler)
        if task.setup.warm_start:
            enqueue_warm_start(study, experiment, context)
        lossless = lossless_space(experiment.space)
        out: list[Trial] = []
        for number in range(task.trials):
            space = lossless if number < task.setup.lossless_first else experiment.space
            out.append(_trial(study, space, experiment, context))
            if task.target is not None and progress(out, task.pareto, task.max_kl) >= task.target:
                break
    return out


def progress(trials: list[Trial], pareto: bool, max_kl: float) -> float:
    """The study's figure so far: the best feasible decode speed, or the feasible front's hypervolume."""
    feasible = [t for t in trials if t is not None and t[2]]
    if pareto:
        return stats.hypervolume_2d([(speed, kl) for speed, kl, _ in feasible], (0.0, max_kl))
    return max((speed for speed, _, _ in feasible), default=-math.inf)


def _trial(study: optuna.Study, space: Space, experiment: Experiment, context: dict[str, int]) -> Trial:
    trial = study.ask()
    try:
        config = space.sample(trial, context)
    except ConfigError:
        study.tell(trial, state=TrialState.FAIL)
        return None
    assert _objective is not None
    outcome = _objective(config)
    summary: dict[str, Any] = dataclasses.asdict(outcome)
    constraints = figures.constraints(experiment, summary)
    for key, value in constraints.items():
        trial.set_constraint(key, value)
    study.tell(trial, figures.objective_values(experiment, summary))
    return outcome.decode_tok_s, outcome.quality_kl, figures.feasible(constraints)


def lossless_space(space: Space) -> Space:
    """``space`` without the knobs that change the output (they keep the engine's defaults)."""
    return dataclasses.replace(space, params=tuple(p for p in space.params if p.name not in LOSSY))
