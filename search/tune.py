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

Everything is kept in ``runs/<experiment>/``: the study's journal, a readable log, the tuned config and the
report; and in MLflow. Ctrl-C (or SIGTERM) stops cleanly: unfinished trials are recorded as stopped and
queued again, so running the same command continues where this one left off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from engine.bench.fingerprint import engine_version, machine_fingerprint, model_identity
from engine.bench.probe import ENGINE_GRID, load_or_probe
from engine.bench.protocol import resident_bytes
from engine.bench.stats import median_ci, ratio_ci
from engine.checkpoint import read_json
from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.models import parse_config
from engine.paths import default_cache_dir
from engine.units import format_bytes
from search import trials as figures
from search.errors import SearchError
from search.executor import Measurement, RayExecutor
from search.experiment import Experiment, ExperimentError
from search.progress import Progress, format_duration
from search.screening import Simulation, ensure_trace
from search.study import (
    ATTR_FAILURE,
    ATTR_SOURCE,
    STOPPED,
    enqueue_warm_start,
    open_study,
    recover_stopped,
    requeue,
)
from search.tracking import REPEAT_METRICS, Tracker, default_tracking_uri
from search.trials import ATTR_BOUNDS, ATTR_CONFIG, ATTR_SUMMARY

log = logging.getLogger("autoresearch.tune")

ATTR_RUN = "mlflow_run_id"
ATTR_STOP = "stopped_early"  # why a trial ran fewer repeats than asked
TRIAL_COLUMNS = ("number", "state", "values", "params", "user_attrs", "datetime_start", "datetime_complete")
TUNED, STALE = "tuned.toml", "tuned.toml.stale"  # the exported config; an earlier run's, set aside
DRIVER_GRACE_S = 900.0  # beyond the measurement timeout: repacking and the quality reference run before it
MiB = 1 << 20
ATTR_FIDELITY = "fidelity"  # "simulator" on trials the simulator screened out (the others were measured)
SIMULATOR = "simulator"


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


@dataclass
class _Running:
    """A trial being measured."""

    trial: optuna.Trial | None  # None: a confirmation measurement
    config: EngineConfig
    run_id: str
    source: str | None
    phase: str = "measure"  # or "simulate"
    results: list[dict] = field(default_factory=list)
    submitted: float = 0.0  # when its current task was submitted (time.monotonic)
    measure_seconds: float = 0.0  # its measurements' own wall time, summed (logged to MLflow at its end)


def results_dir(runs: Path, experiment_name: str) -> Path:
    return runs / experiment_name


def tune(experiment: Experiment, options: TuneOptions = TuneOptions()) -> TuneOutcome:
    """Run ``experiment``'s study to its budget (continuing it if it exists); see the module's docstring."""
    if (experiment.model / "config.json").exists():  # refused before anything is written or started
        _check_budget(experiment, experiment.model)
    results = results_dir(options.runs, experiment.name)
    results.mkdir(parents=True, exist_ok=True)
    with _exclusive(results), _logging_to(results / "tune.log"):
        return _Tuner(experiment, options, results).run()


class _Tuner:
    def __init__(self, experiment: Experiment, options: TuneOptions, results: Path) -> None:
        self.experiment = experiment
        self.options = options
        self.results = results
        self.tracking_uri = options.tracking_uri or default_tracking_uri(options.runs)
        self.model = _ensure_model(experiment)
        _check_budget(experiment, self.model)
        config = read_json(self.model / "config.json")
        self.context = {
            "memory_budget": experiment.memory_budget,
            "model_top_k": parse_config(config, self.model / "config.json").top_k,
            "cpu_cores": os.cpu_count() or 1,
        }
        self.running: dict[Any, _Running] = {}
        self.ready: list[_Running] = []  # trials that passed screening, waiting for a measurement slot
        self.last = ""  # the last finished trial, for the status line
        self.search_started: float | None = None
        self.search_ended: float | None = None

    def run(self) -> TuneOutcome:
        experiment = self.experiment
        probe = None
        if self.options.probe:
            log.info("disk probe of %s (measured once per machine and disk, then cached)", self.model)
            probe = load_or_probe(self.model, default_cache_dir(), **ENGINE_GRID).to_dict()
        self.probe = probe
        if experiment.trace is not None:
            if probe is None and experiment.sim_bandwidth is None:
                raise ExperimentError(experiment.path, "screening needs the disk probe (drop --no-probe) or a "
                                      "bandwidth for the simulated disk", field="fidelity.bandwidth")  # fmt: skip
            if ensure_trace(experiment.trace, self.model, experiment.workload):
                log.info("recorded the routing trace %s for screening", experiment.trace)
        self.study = open_study(experiment, self.results)
        self._record_study_identity()
        self._record_bounds()
        stopped = recover_stopped(self.study)
        if stopped:
            log.info("resuming: trials %s had not finished; their configs are queued again", stopped)
        for source in enqueue_warm_start(self.study, experiment, self.context):
            log.info("warm start: %s queued", source)
        self.spent_before = self.study.user_attrs.get("search_seconds", 0.0)
        artifacts = self.options.runs / "artifacts" if self.options.tracking_uri is None else None
        self.tracker = Tracker(self.tracking_uri, experiment.name, artifacts)
        parent = self.tracker.start_study(
            self.study.user_attrs.get(ATTR_RUN), f"{experiment.name} study", self._study_tags()
        )
        self.study.set_user_attr(ATTR_RUN, parent)
        self.progress = Progress(self._budget_text)
        with RayExecutor(self.options.ray_address or experiment.ray_address) as executor, _StopSignals() as stop:
            self.executor, self.stop = executor, stop
            log.info("tuning %s: %s; %d measurement slot(s)", experiment.name, self._budget_text(), executor.slots)
            try:
                self._search()
                if stop.reason is None:
                    self._confirm()
            except BaseException as e:  # record the state before the error surfaces: nothing left RUNNING
                self._stop_running(f"error: {type(e).__name__}: {e}")
                self.progress.close()
                self.tracker.end_study("FAILED", {"error": f"{type(e).__name__}: {e}"})
                raise
            if stop.reason is not None:
                self._stop_running(stop.reason)
        self.progress.close()
        return self._finish(interrupted=stop.reason is not None)

    # The search ---------------------------------------------------------------------------------------------

    def _search(self) -> None:
        self.search_started = time.monotonic()
        try:
            while self.stop.reason is None:
                self._admit()
                if not self.running and not self.ready:
                    return
                self._collect()
                self.progress.update(self._status())
        finally:
            self.search_ended = time.monotonic()
            self._save_search_time()

    def _collect(self) -> None:
        """Handle what finished in the last second; a task silent long past its timeout is cancelled and failed
        (the child's own timeout covers the engine; this covers the work before it: repacking, the reference)."""
        now = time.monotonic()
        for ref, running in list(self.running.items()):
            if now - running.submitted > self.experiment.trial_timeout_s + DRIVER_GRACE_S:
                self.executor.cancel(ref)
                del self.running[ref]
                self._fail(running, f"timeout: the measurement gave no answer for {now - running.submitted:.0f} s")
        for ref in self.executor.wait(list(self.running), timeout_s=1.0):
            running = self.running.pop(ref)
            if running.phase == "simulate":
                self._on_simulated(running, self.executor.result(ref))
            else:
                self._on_measured(running, self.executor.result(ref))

    def _admit(self) -> None:
        """Fill the measurement slots: trials that passed screening first, then new ones (screened in bursts
        between real measurements, which hold every core of their node)."""
        slots = self.executor.slots
        if self.stop.reason is not None:
            return
        while self.ready and self._in_phase("measure") < slots:
            self._submit(self.ready.pop(0), quality=True)
        while (
            self._in_phase("measure") + len(self.ready) < slots
            and self._in_phase("simulate") < self.executor.simulation_slots
            and self._budget_left()
        ):
            self._start_trial()
            while self.ready and self._in_phase("measure") < slots:
                self._submit(self.ready.pop(0), quality=True)

    def _in_phase(self, phase: str) -> int:
        return sum(r.phase == phase for r in self.running.values())

    def _budget_left(self) -> bool:
        experiment = self.experiment
        if experiment.trials is not None and self._counted_trials() >= experiment.trials:
            return False
        if experiment.time_budget_s is not None and self._search_seconds() >= experiment.time_budget_s:
            return False
        return not (experiment.sampler == "grid" and self._grid_exhausted())

    def _counted_trials(self) -> int:
        """Trials that count against the budget: measured or being measured; not those a stop re-queued, nor
        those the simulator screened out (``max_screened`` bounds these)."""
        count = 0
        for t in self.study.get_trials(deepcopy=False):
            stopped = t.state == TrialState.FAIL and str(t.user_attrs.get(ATTR_FAILURE, "")).startswith(STOPPED)
            if t.state != TrialState.WAITING and not stopped and t.user_attrs.get(ATTR_FIDELITY) != SIMULATOR:
                count += 1
        return count

    def _screened_trials(self) -> int:
        return sum(t.user_attrs.get(ATTR_FIDELITY) == SIMULATOR for t in self.study.get_trials(deepcopy=False))

    def _grid_exhausted(self) -> bool:
        sampler = self.study.sampler
        return isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(self.study)

    def _search_seconds(self) -> float:
        """Search time over every run of this study (the time budget is the study's, not one command's); the
        probe, start-up and confirmation do not count."""
        end = self.search_ended if self.search_ended is not None else time.monotonic()
        started = self.search_started if self.search_started is not None else end
        return self.spent_before + end - started

    def _save_search_time(self) -> None:
        """Kept after every trial, so a killed driver loses at most one trial's time."""
        self.study.set_user_attr("search_seconds", self._search_seconds())

    def _start_trial(self) -> None:
        trial = self.study.ask()
        source = trial.user_attrs.get(ATTR_SOURCE)
        try:
            config = self.experiment.space.sample(trial, self.context)
        except ConfigError as e:  # a combination of values the engine refuses
            trial.set_user_attr(ATTR_FAILURE, f"invalid config: {e}")
            self.study.tell(trial, state=TrialState.FAIL)
            tags = {"trial": trial.number, "phase": "search", "source": source, "state": "FAIL", "failure": str(e)}
            self.tracker.end_trial(self.tracker.start_trial(f"trial {trial.number}", trial.params, tags), "FAILED",
                                   {}, {"failure_kind": "invalid config"}, {})  # fmt: skip
            self.progress.event(f"trial {trial.number}: invalid config ({e})")
            return
        trial.set_user_attr(ATTR_CONFIG, config.to_dict())
        tags = {"trial": trial.number, "phase": "search", "source": source}
        run_id = self.tracker.start_trial(f"trial {trial.number}", _explicit_config(config), tags)
        trial.set_user_attr(ATTR_RUN, run_id)
        running = _Running(trial, config, run_id, source)
        log.info("trial %d started%s: %s", trial.number, f" ({source})" if source else "", self._describe(config))
        experiment = self.experiment
        screening = experiment.trace is not None and source is None
        if screening and (experiment.max_screened is None or self._screened_trials() < experiment.max_screened):
            simulation = Simulation(str(experiment.trace), config.to_dict(), experiment.sim_bandwidth, self.probe)
            running.phase, running.submitted = "simulate", time.monotonic()
            self.running[self.executor.simulate(simulation)] = running
        else:
            self.ready.append(running)

    def _best_prediction(self) -> float:
        predictions = [t.user_attrs["simulation"].get("predicted_decode_tok_s", 0.0)
                       for t in self.study.get_trials(deepcopy=False) if "simulation" in t.user_attrs]  # fmt: skip
        return max(predictions, default=0.0)

    def _on_simulated(self, running: _Running, out: dict) -> None:
        """Screen a simulated trial: pruned at the simulator's fidelity, or on to a real measurement."""
        trial = running.trial
        predicted = out.get("result", {}).get("predicted_decode_tok_s")
        running.phase = "measure"
        if predicted is None:
            trial.set_user_attr("simulation", {"unsimulable": out.get("message", "no prediction")})
            self.ready.append(running)
            return
        sim = out["result"]
        simulated = {k: sim[k] for k in ("predicted_decode_tok_s", "hit_rate", "optimal_hit_rate",
                                         "bytes_read_per_token", "prefetch_precision", "io_stall_frac")}  # fmt: skip
        best = self._best_prediction()
        trial.set_user_attr("simulation", {**simulated, "best_before": best})
        self.tracker.log_metrics(running.run_id, {f"sim_{k}": v for k, v in simulated.items()})
        if predicted >= self.experiment.screen_ratio * best:
            self.ready.append(running)
            return
        trial.set_user_attr(ATTR_FIDELITY, SIMULATOR)
        self.study.tell(trial, state=TrialState.PRUNED)
        tags = {"state": "SCREENED", "fidelity": SIMULATOR}
        self.tracker.end_trial(running.run_id, "FINISHED", {}, tags, {"simulation.json": sim})
        self.last = f"#{trial.number} screened"
        self.progress.event(f"trial {trial.number}: screened out by the simulator ({predicted:.4g} tok/s predicted, "
                            f"best {best:.4g})  {self._describe(running.config)}")  # fmt: skip

    def _submit(self, running: _Running, quality: bool) -> None:
        running.submitted = time.monotonic()
        self.running[self.executor.submit(self._measurement(running.config, quality))] = running

    def _measurement(self, config: EngineConfig, quality: bool) -> Measurement:
        experiment = self.experiment
        return Measurement(
            model=str(self.model),
            config=config.to_dict(),
            workload=experiment.workload.name,
            memory_limit=experiment.memory_budget,
            warmup=experiment.warmup,
            timeout_s=experiment.trial_timeout_s,
            quality_cache=str(default_cache_dir()) if quality else None,
            probe=self.probe,
        )

    def _on_measured(self, running: _Running, out: dict) -> None:
        trial = running.trial
        running.measure_seconds += out.get("seconds", 0.0)
        if "result" not in out:
            self._fail(running, f"{out['message']}")
            return
        result = out["result"]
        running.results.append(result)
        step = len(running.results) - 1
        self.tracker.log_repeat(running.run_id, step, figures.repeat_figures(result))
        summary = figures.summarize(running.results)
        constraints = figures.constraints(self.experiment, summary)
        metric = self.experiment.objectives[0][0]
        if not self.experiment.multi_objective and metric in REPEAT_METRICS and result.get(metric) is not None:
            trial.report(result[metric], step)
        if step + 1 >= self.experiment.repeats:
            self._complete(running, summary, constraints, None)
        elif not figures.feasible({k: v for k, v in constraints.items() if k != "memory"}):
            self._complete(running, summary, constraints, "infeasible quality: the remaining repeats were skipped")
        elif running.source is None and not self.experiment.multi_objective and trial.should_prune():
            self._prune(running, summary)
        else:
            self._submit(running, quality=False)

    def _complete(self, running: _Running, summary: dict, constraints: dict, stopped: str | None) -> None:
        trial = running.trial
        for key, value in constraints.items():
            trial.set_constraint(key, value)
        trial.set_user_attr(ATTR_SUMMARY, summary)
        if stopped:
            trial.set_user_attr(ATTR_STOP, stopped)
        try:
            values = figures.objective_values(self.experiment, summary)
        except KeyError as e:
            self._fail(running, f"crashed: {e.args[0]}")
            return
        self.study.tell(trial, values)
        feasible = figures.feasible(constraints)
        tags = {"state": "COMPLETE", "feasible": feasible, "stopped_early": stopped}
        text = _values_text(self.experiment, values)
        why = "" if feasible else f" (infeasible: {_violations(constraints)})"
        self._ended(running, "FINISHED", summary, tags, text + ("" if feasible else " (infeasible)"), text + why)

    def _prune(self, running: _Running, summary: dict) -> None:
        trial = running.trial
        trial.set_user_attr(ATTR_SUMMARY, summary)
        self.study.tell(trial, state=TrialState.PRUNED)
        line = f"pruned after {len(running.results)} repeats ({summary.get('decode_tok_s', float('nan')):.2f} tok/s)"
        self._ended(running, "FINISHED", summary, {"state": "PRUNED"}, "pruned", line)

    def _fail(self, running: _Running, reason: str) -> None:
        trial = running.trial
        trial.set_user_attr(ATTR_FAILURE, reason)
        self.study.tell(trial, state=TrialState.FAIL)
        kind = reason.split(":", 1)[0]
        tags = {"state": "FAIL", "failure": reason, "failure_kind": kind}
        log.info("trial %d failed: %s", trial.number, reason)
        self._ended(running, "FAILED", {}, tags, f"failed ({kind})", f"FAILED ({kind})")

    def _ended(self, running: _Running, status: str, summary: dict, tags: dict, short: str, line: str) -> None:
        """A measured trial's end, told to Optuna already: its MLflow run closed, the console and log told."""
        artifacts = {"bench_results.json": running.results} if running.results else {}
        summary = {**summary, "measure_seconds": running.measure_seconds}
        self.tracker.end_trial(running.run_id, status, summary, {**tags, "fidelity": "engine"}, artifacts)
        self.last = f"#{running.trial.number} {short}"
        self.progress.event(f"trial {running.trial.number}: {line}  {self._describe(running.config)}")
        self._save_search_time()

    def _stop_running(self, why: str) -> None:
        """Ctrl-C: cancel what runs, record it as stopped and queue it again (a resume re-measures it)."""
        for ref in self.running:
            self.executor.cancel(ref)
        for running in [*self.running.values(), *self.ready]:
            self.tracker.end_trial(running.run_id, "KILLED", {}, {"state": "FAIL", "failure": f"{STOPPED}: {why}"}, {})
            if running.trial is not None:  # not a confirmation measurement
                requeue(self.study, running.trial.number, running.trial.params, running.source, why)
        self.running.clear()
        self.ready.clear()
        self.progress.event(f"stopped ({why}); run the same command again to continue")

    # Confirmation -------------------------------------------------------------------------------------------

    def _confirm(self) -> None:
        """The best few trials and the default config, measured again in interleaved rounds."""
        experiment = self.experiment
        candidates = _best_trials(self.study, experiment, experiment.confirm)
        finished = [t.number for t in self.study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
        last_trial = max(finished, default=-1)
        if not candidates or self.study.user_attrs.get("confirmation", {}).get("after_trial") == last_trial:
            return
        configs = {"default": EngineConfig()}
        for t in candidates:
            configs[f"trial {t.number}"] = EngineConfig.from_dict(t.user_attrs[ATTR_CONFIG])
        rounds = experiment.confirm_repeats
        self.progress.event(f"confirmation: {', '.join(list(configs)[1:])} against the default, {rounds} "
                            "interleaved rounds")  # fmt: skip
        runs = {name: self.tracker.start_trial(f"confirm {name}", _explicit_config(c), {"phase": "confirm"})
                for name, c in configs.items()}  # fmt: skip
        measured: dict[str, list[dict | None]] = {name: [] for name in configs}  # per round; None: failed
        failed: dict[str, str] = {}
        for round_ in range(rounds):
            for name, config in configs.items():
                if self.stop.reason is not None:
                    for run_id in runs.values():
                        self.tracker.end_trial(run_id, "KILLED", {}, {"failure": f"{STOPPED}: {self.stop.reason}"}, {})
                    return
                status = f"confirming: round {round_ + 1}/{rounds}, {name}"
                out = self._measure_now(config, runs[name], status) if name not in failed else None
                if out is not None and "result" not in out:
                    failed[name] = out["message"]
                result = out.get("result") if out else None
                measured[name].append(result)
                if result is not None:
                    self.tracker.log_repeat(runs[name], round_, figures.repeat_figures(result))
        confirmation = _confirmation(*experiment.objectives[0], measured, failed)
        self.study.set_user_attr("confirmation", {**confirmation, "after_trial": last_trial})
        for name in configs:
            results = [r for r in measured[name] if r is not None]
            summary = figures.summarize(results) if results else {}
            tags = {"failure": failed.get(name)}
            status = "FAILED" if name in failed else "FINISHED"
            self.tracker.end_trial(runs[name], status, summary, tags, {"bench_results.json": results})

    def _measure_now(self, config: EngineConfig, run_id: str, status: str) -> dict | None:
        """One measurement, waited for; None if a stop came meanwhile."""
        running = _Running(None, config, run_id, None, submitted=time.monotonic())
        ref = self.executor.submit(self._measurement(config, quality=False))
        self.running[ref] = running
        while not self.executor.wait([ref], timeout_s=1.0):
            self.progress.update(status)
            if self.stop.reason is not None:
                return None
        del self.running[ref]
        return self.executor.result(ref)

    # The end -----------------------------------------------------------------------------------------------

    def _finish(self, interrupted: bool) -> TuneOutcome:
        from search.export import export, no_choice, pick
        from search.report import write_report

        tuned = unmet = None
        notes: list[str] = []
        choice = pick(self.study, self.experiment.objectives, "fastest")
        if choice is not None:
            tuned = export(self.study, choice, self.results / TUNED)
        else:  # nothing that meets every constraint: no tuned.toml, and none from an earlier run left as current
            unmet = no_choice(self.study, "fastest")
            if (self.results / TUNED).exists():
                os.replace(self.results / TUNED, self.results / STALE)
                notes.append(f"The {TUNED} an earlier run exported was renamed {STALE}: no trial meets the constraints "
                             "now.")  # fmt: skip
            log.warning("nothing exported: %s", " ".join([unmet, *notes]))
        report = write_report(self.study, self.experiment.objectives, self.results / "report.md", notes)
        table = self.results / "trials.csv"
        self.study.trials_dataframe(attrs=TRIAL_COLUMNS).to_csv(table, index=False)
        artifacts = [p for p in (tuned, report, table, self.experiment.path) if p is not None]
        artifacts += sorted(self.results.glob("*.png"))
        self.tracker.log_study_artifacts(artifacts)
        states = [t.state for t in self.study.get_trials(deepcopy=False)]
        counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        self.tracker.log_metrics(self.tracker.parent_id, {f"trials_{s.name.lower()}": states.count(s) for s in counted})
        unmet = " ".join([unmet, *notes]) if unmet else None
        self.tracker.end_study("KILLED" if interrupted else "FINISHED", {"tuned_config": tuned, "unmet": unmet})
        return TuneOutcome(self.results, self.tracking_uri, interrupted, tuned, report, unmet)

    # Bookkeeping -------------------------------------------------------------------------------------------

    def _record_study_identity(self) -> None:
        """A new study records what its trials were measured on; a resumed one must match it, or its trials
        would not be comparable with the new ones (ExperimentError naming the key that changed)."""
        experiment, attrs = self.experiment, self.study.user_attrs
        model = model_identity(self.model)
        machine = machine_fingerprint(self.model)
        identity = {
            "objective": [list(o) for o in experiment.objectives],
            "experiment.memory_budget": experiment.memory_budget,
            "experiment.workload": experiment.workload.name,
            "experiment.model": {k: model.get(k) for k in ("config_sha256", "weight_files")},
            "machine": {k: machine.get(k) for k in ("cpu", "cores", "ram_bytes", "disk")},
        }
        if "identity" in attrs:
            for key, value in identity.items():
                if attrs["identity"].get(key) != value:
                    raise ExperimentError(
                        experiment.path,
                        f"differs from the study in {self.results} ({attrs['identity'].get(key)!r} there, {value!r}"
                        " now): its trials would not compare; give the experiment a new name, or move that folder",
                        field=key,
                    )
            return
        self.study.set_user_attr("identity", identity)
        self.study.set_user_attr("machine", machine)
        self.study.set_user_attr("model", model)
        self.study.set_user_attr("engine", engine_version())
        self.study.set_user_attr("experiment_file", str(experiment.path.resolve()))
        self.study.set_user_attr("workload", experiment.workload.name)
        self.study.set_user_attr("memory_budget", experiment.memory_budget)
        self.study.set_user_attr("objectives", [list(o) for o in experiment.objectives])
        self.study.set_user_attr("context", self.context)

    def _record_bounds(self) -> None:
        """The experiment's [constraints], kept in the study: every trial's quality is judged against the latest
        run's (trials.judged), so a tightened bound is never met by a trial measured under a looser one."""
        before = self.study.user_attrs.get(ATTR_BOUNDS)
        bounds = dict(self.experiment.constraints)
        if before is not None and before != bounds:
            log.info("constraints changed from %s to %s: every trial is judged against the new ones", before, bounds)
        self.study.set_user_attr(ATTR_BOUNDS, bounds)

    def _study_tags(self) -> dict[str, Any]:
        attrs = self.study.user_attrs
        machine, model = attrs["machine"], attrs["model"]
        tags = {f"machine.{k}": v for k, v in machine.items() if not isinstance(v, dict)}
        tags |= {f"model.{k}": v for k, v in model.items() if not isinstance(v, dict | list)}
        tags |= {f"engine.{k}": v for k, v in attrs["engine"].items()}
        tags |= {
            "experiment_file": attrs["experiment_file"],
            "workload": attrs["workload"],
            "memory_budget": format_bytes(attrs["memory_budget"]),
            "study_storage": str((self.results / "study.journal").resolve()),
            "sampler": self.experiment.sampler,
        }
        return tags

    def _describe(self, config: EngineConfig) -> str:
        return figures.describe(config.to_dict(), self.context)

    def _budget_text(self) -> str:
        experiment = self.experiment
        parts = []
        if experiment.trials is not None:
            parts.append(f"{experiment.trials} trials")
        if experiment.time_budget_s is not None:
            parts.append(format_duration(experiment.time_budget_s))
        return " or ".join(parts)

    def _status(self) -> str:
        experiment = self.experiment
        counted = self._counted_trials()
        parts = [f"trial {counted}" + (f"/{experiment.trials}" if experiment.trials else "")]
        time_left = None
        if experiment.time_budget_s is not None:
            time_left = max(0.0, experiment.time_budget_s - self._search_seconds())
            parts.append(f"{format_duration(time_left)} left")
        best = _best_trials(self.study, experiment, 1)
        if best:
            parts.append(f"best #{best[0].number} {_values_text(experiment, best[0].values)}")
        if self.last:
            parts.append(f"last {self.last}")
        for running in self.running.values():
            if running.trial is not None:
                parts.append(f"#{running.trial.number} repeat {len(running.results) + 1}/{experiment.repeats}")
        eta = self._eta(counted, time_left)
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)

    def _eta(self, counted: int, time_left: float | None) -> float | None:
        """Search time left: the trials left at the mean duration of the finished ones, within the time budget."""
        durations = [
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if t.user_attrs.get(ATTR_FIDELITY) != SIMULATOR
        ]
        eta = time_left
        if self.experiment.trials is not None and durations:
            by_trials = (self.experiment.trials - counted + len(self.running)) * sum(durations) / len(durations)
            eta = by_trials / self.executor.slots if eta is None else min(eta, by_trials / self.executor.slots)
        return eta


def _best_trials(study: optuna.Study, experiment: Experiment, count: int) -> list:
    """The best feasible complete trials: by value (one objective) or the Pareto front (several), at most
    ``count``, one per distinct config."""
    complete = figures.measured_feasible(study)
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


def _confirmation(metric: str, direction: str, measured: dict[str, list[dict | None]], failed: dict[str, str]) -> dict:
    """Each config's median and interval of ``metric``, and its ratio to the default's with its interval
    (> 1 is better, for either direction), over the rounds where both were measured."""
    out: dict[str, Any] = {"metric": metric, "entries": {}}

    def value(result: dict | None) -> float | None:
        return None if result is None else result.get(metric)

    base = [value(r) for r in measured["default"]]
    for name, results in measured.items():
        values = [v for v in map(value, results) if v is not None]
        entry: dict[str, Any] = {"repeats": len(values), "failure": failed.get(name)}
        if values:
            entry["median"], low, high = median_ci(values)
            entry["ci"] = [low, high]
        pairs = [(v, b) for v, b in zip(map(value, results), base, strict=True) if v is not None and b is not None]
        if name != "default" and len(pairs) >= 2:
            ours, theirs = [v for v, _ in pairs], [b for _, b in pairs]
            a, b = (ours, theirs) if direction == "maximize" else (theirs, ours)
            entry["ratio"], low, high = ratio_ci(a, b)
            entry["ratio_ci"] = [low, high]
        out["entries"][name] = entry
    return out


def _ensure_model(experiment: Experiment) -> Path:
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


def _explicit_config(config: EngineConfig) -> dict[str, Any]:
    return {k: ("model's own" if v is None else v) for k, v in dataclasses.asdict(config).items()}


def _values_text(experiment: Experiment, values: list[float] | None) -> str:
    if not values:
        return "n/a"
    return ", ".join(f"{m} {v:.4g}" for (m, _), v in zip(experiment.objectives, values, strict=True))


def _violations(constraints: dict[str, float]) -> str:
    return ", ".join(k for k, v in constraints.items() if v > 0)


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
