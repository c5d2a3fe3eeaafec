"""``autoresearch tune``: an experiment's study, run to its budget, then confirmed, exported and reported.

Each trial is a config the sampler proposes (warm starts first), measured repeat by repeat: every repeat is
one cold run in its own child process under the experiment's enforced memory budget, executed as a Ray task.
After each repeat the trial's figure is reported to Optuna, whose Wilcoxon pruner may stop a trial that is
clearly slower than the best; a trial whose first repeat breaks a quality constraint stops there (it is
infeasible whatever its speed). A failed measurement (crash, timeout, out of memory) fails its trial with
the reason, and the study goes on. When the budget is spent, the best few are measured again, interleaved
with the engine's default config, so the exported config's speedup comes with a confidence interval.

A memory budget that cannot hold the model's dense weights is refused before anything starts. When no trial
meets the constraints, nothing is exported: the command ends with an error naming the constraints broken and
the closest trial, the report says so, and a ``tuned.toml`` left by an earlier run is renamed
``tuned.toml.stale`` (no trial meets the constraints now).

This module runs the study's life: it opens (or resumes) the study and checks it is the same experiment, runs the
search (``scheduler``), then the confirmation (``confirmation``), then exports and reports; ``session`` is what the
two share. Everything is kept in ``runs/<experiment>/``: the study's journal, a readable log, the tuned config and the
report; and in MLflow. Ctrl-C (or SIGTERM) stops cleanly: unfinished trials are recorded as stopped and
queued again, so running the same command continues where this one left off.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from engine.architectures import parse_config
from engine.bench.probe import ENGINE_GRID, load_or_probe
from engine.bench.protocol import resident_bytes
from engine.formats.checkpoint import read_json
from engine.paths import default_cache_dir
from engine.units import format_bytes
from search.confirmation import confirm
from search.errors import SearchError
from search.executor import RayExecutor
from search.experiment import Experiment, ExperimentError
from search.progress import Progress, format_duration
from search.scheduler import Scheduler
from search.screening import ensure_trace
from search.session import Session
from search.study import (
    check_space,
    enqueue_warm_start,
    open_study,
    record_bounds,
    record_identity,
    recover_stopped,
    study_params,
    study_tags,
)
from search.tracking import RUNS_FOLDER_ARTIFACTS, Tracker
from search.trials import ATTR_RUN, ATTR_SUMMARY, run_params
from search.ui import default_tracking_uri

log = logging.getLogger("autoresearch.tune")

TRIAL_COLUMNS = ("number", "state", "values", "params", "user_attrs", "datetime_start", "datetime_complete")
TUNED, STALE = "tuned.toml", "tuned.toml.stale"  # the exported config; an earlier run's, set aside
MiB = 1 << 20


@dataclass(frozen=True)
class TuneOptions:
    runs: Path = Path("runs")
    tracking_uri: str | None = None  # default: runs/mlflow.db
    ray_address: str | None = None  # default: the experiment's
    probe: bool = True  # measure (once per machine and disk) the roofline every result stands beside


@dataclass
class TuneOutcome:
    results: Path  # runs/<experiment>
    tracking_uri: str
    interrupted: bool
    tuned: Path | None  # the exported config, when a feasible trial exists
    report: Path | None
    unmet: str | None = None  # when nothing was exported: why (the constraints broken, the closest trial)


def results_dir(runs: Path, experiment_name: str) -> Path:
    return runs / experiment_name


def tune(experiment: Experiment, options: TuneOptions = TuneOptions()) -> TuneOutcome:
    """Run ``experiment``'s study to its budget (continuing it if it exists); see the module's docstring."""
    if (experiment.model / "config.json").exists():  # refused before anything is written or started
        _check_budget(experiment, experiment.model)
    results = results_dir(options.runs, experiment.name)
    results.mkdir(parents=True, exist_ok=True)
    with _exclusive(results), _logging_to(results / "tune.log"):
        return _run(experiment, options, results)


def _run(experiment: Experiment, options: TuneOptions, results: Path) -> TuneOutcome:
    """The study opened (or resumed) and checked, the search, its confirmation, then the export and the report."""
    model = ensure_model(experiment)
    _check_budget(experiment, model)
    context = {
        "memory_budget": experiment.memory_budget,
        "model_top_k": parse_config(read_json(model / "config.json"), model / "config.json").top_k,
        "cpu_cores": os.cpu_count() or 1,
    }
    probe = None
    if options.probe:
        log.info("disk probe of %s (measured once per machine and disk, then cached)", model)
        probe = load_or_probe(model, default_cache_dir(), **ENGINE_GRID).to_dict()
    if experiment.trace is not None:
        if probe is None and experiment.sim_bandwidth is None:
            raise ExperimentError(experiment.path, "screening needs the disk probe (drop --no-probe) or a "
                                  "bandwidth for the simulated disk", field="fidelity.bandwidth")  # fmt: skip
        if ensure_trace(experiment.trace, model, experiment.workload):
            log.info("recorded the routing trace %s for screening", experiment.trace)
    study = open_study(experiment, results)
    record_identity(study, experiment, model, context, results)
    check_space(study, experiment, results)
    record_bounds(study, experiment)
    stopped = recover_stopped(study)
    if stopped:
        log.info("resuming: trials %s had not finished; their configs are queued again", stopped)
    for source in enqueue_warm_start(study, experiment, context):
        log.info("warm start: %s queued", source)
    tracking_uri = options.tracking_uri or default_tracking_uri(options.runs)
    tracker = Tracker(tracking_uri, experiment.name, RUNS_FOLDER_ARTIFACTS if options.tracking_uri is None else None)
    parent = tracker.start_study(
        study.user_attrs.get(ATTR_RUN),
        f"{experiment.name} study",
        study_tags(study, experiment, results),
        study_params(experiment),
    )
    study.set_user_attr(ATTR_RUN, parent)
    progress = Progress(lambda: _budget_text(experiment))
    with RayExecutor(options.ray_address or experiment.ray_address) as executor, _StopSignals() as stop:
        session = Session(experiment, model, context, probe, study, tracker, executor, stop, progress)
        log.info("tuning %s: %s; %d measurement slot(s)", experiment.name, _budget_text(experiment), executor.slots)
        scheduler = Scheduler(session)
        try:
            scheduler.run()
            if stop.reason is None:
                confirm(session)
        except BaseException as e:  # record the state before the error surfaces: nothing left RUNNING
            scheduler.stop_running(f"error: {type(e).__name__}: {e}")
            progress.close()
            tracker.end_study("FAILED", {"error": f"{type(e).__name__}: {e}"})
            raise
        if stop.reason is not None:
            scheduler.stop_running(stop.reason)
    progress.close()
    return _finish(session, results, tracking_uri, interrupted=stop.reason is not None)


def _finish(session: Session, results: Path, tracking_uri: str, interrupted: bool) -> TuneOutcome:
    from search.export import export, no_choice, pick
    from search.report import write_html, write_report

    study, experiment, tracker = session.study, session.experiment, session.tracker
    tuned = unmet = None
    notes: list[str] = []
    choice = pick(study, experiment.objectives, "fastest")
    if choice is not None:
        tuned = export(study, choice, results / TUNED)
        summary = choice.trial.user_attrs[ATTR_SUMMARY]
        params = run_params(choice.config, session.context, choice.trial.params)
        tracker.log_best(choice.trial.number, params, {**summary, "feasible": 1.0})
    else:  # nothing that meets every constraint: no tuned.toml, and none from an earlier run left as current
        tracker.log_best(None, {}, {})
        unmet = no_choice(study, "fastest")
        if (results / TUNED).exists():
            os.replace(results / TUNED, results / STALE)
            notes.append(f"The {TUNED} an earlier run exported was renamed {STALE}: no trial meets the constraints "
                         "now.")  # fmt: skip
        log.warning("nothing exported: %s", " ".join([unmet, *notes]))
    report = write_report(study, experiment.objectives, results / "report.md", notes)
    report_html = write_html(report)
    table = results / "trials.csv"
    study.trials_dataframe(attrs=TRIAL_COLUMNS).to_csv(table, index=False)
    artifacts = [p for p in (tuned, report, report_html, table, experiment.path) if p is not None]
    artifacts += sorted(results.glob("*.png"))
    tracker.log_study_artifacts(artifacts)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    tracker.log_metrics(tracker.parent_id, {f"trials_{s.name.lower()}": states.count(s) for s in counted})
    unmet = " ".join([unmet, *notes]) if unmet else None
    tracker.end_study("KILLED" if interrupted else "FINISHED", {"tuned_config": tuned, "unmet": unmet})
    return TuneOutcome(results, tracking_uri, interrupted, tuned, report, unmet)


def _budget_text(experiment: Experiment) -> str:
    parts = []
    if experiment.trials is not None:
        parts.append(f"{experiment.trials} trials")
    if experiment.time_budget_s is not None:
        parts.append(format_duration(experiment.time_budget_s))
    return " or ".join(parts)


def ensure_model(experiment: Experiment) -> Path:
    """The experiment's checkpoint, made from its synthetic preset if missing (written aside, then moved)."""
    from engine.synth import SYNTH_FILE, SYNTH_FORMAT_VERSION

    model = experiment.model
    synth = model / SYNTH_FILE
    made_by_older = (
        experiment.synth_preset is not None
        and synth.exists()
        and (read_json(synth).get("version") != SYNTH_FORMAT_VERSION)
    )
    if (model / "config.json").exists() and not made_by_older:
        return model
    if experiment.synth_preset is None:
        raise ExperimentError(
            experiment.path, f"{model} is not a checkpoint directory (and no synth_preset to make it)",
            field="experiment.model",
        )  # fmt: skip
    from engine.synth import PRESETS, synthesize
    from engine.synth.weights import DEFAULT_KNOBS

    shape = PRESETS[experiment.synth_preset]
    partial = model.with_name(model.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log.info("making the synthetic checkpoint %s (preset %s)", model, experiment.synth_preset)
    synthesize(partial, shape, knobs=DEFAULT_KNOBS[shape.arch])
    model.parent.mkdir(parents=True, exist_ok=True)
    if made_by_older:
        shutil.rmtree(model)
    os.replace(partial, model)
    return model


def _check_budget(experiment: Experiment, model: Path) -> None:
    """A budget that cannot hold the dense weights (kept in RAM as float32 whatever the expert cache) is refused,
    naming the smallest one that can: the next whole MiB above them."""
    resident = resident_bytes(model)
    if experiment.memory_budget <= resident:
        minimum = (resident // MiB + 1) * MiB
        raise ExperimentError(
            experiment.path,
            f"{format_bytes(experiment.memory_budget)} cannot hold the model's dense weights, which the engine keeps "
            f"in RAM whatever the expert cache ({format_bytes(resident)} as float32 for {model}): the minimum is "
            f'memory_budget = "{minimum // MiB}MiB", and trials need room above it for the process and the experts '
            "they read",
            field="experiment.memory_budget",
        )


@contextlib.contextmanager
def _exclusive(results: Path) -> Iterator[None]:
    """One driver per study: a second one fails at once rather than interleaving trials with the first."""
    lock = (results / "driver.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise SearchError(f"another tune is running this experiment (pid {lock.read().strip()}, {results})") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    try:
        yield
    finally:
        lock.close()


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("autoresearch")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


class _StopSignals:
    """Ctrl-C and SIGTERM ask the loop to stop at its next step (it records the state, then returns); a second
    one stops at once. Installed after Ray starts, which sets handlers of its own."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = "interrupted" if signum == signal.SIGINT else "terminated"
