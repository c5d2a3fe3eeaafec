"""The search: trials proposed by the sampler, screened by the simulator, measured repeat by repeat.

``Scheduler.run`` keeps the measurement slots full until the budget (trials or time) is spent: trials that passed
screening first, then new ones, screened in bursts between real measurements (which hold every core of their
node). After each repeat the trial's figure is reported to Optuna, whose Wilcoxon pruner may stop a trial that is
clearly slower than the best; a trial whose first repeat breaks a quality constraint stops there. A failed
measurement (crash, timeout, out of memory) fails its trial with the reason, and the search goes on. A stop
(Ctrl-C) cancels what runs, records it as stopped and queues it again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from engine.config import EngineConfig
from engine.errors import ConfigError
from search import trials as figures
from search.progress import format_duration
from search.screening import Simulation
from search.session import Session
from search.study import ATTR_FAILURE, ATTR_SOURCE, STOPPED, requeue
from search.tracking import REPEAT_METRICS, STOPPED_EARLY
from search.trials import ATTR_CONFIG, ATTR_FIDELITY, ATTR_NODE, ATTR_RUN, ATTR_STOP, ATTR_SUMMARY, SIMULATOR

log = logging.getLogger("autoresearch.tune")

DRIVER_GRACE_S = 900.0  # beyond the measurement timeout: repacking and the quality reference run before it


@dataclass
class _Running:
    """A trial being measured."""

    trial: optuna.Trial
    config: EngineConfig
    run_id: str
    source: str | None
    phase: str = "measure"  # or "simulate"
    results: list[dict] = field(default_factory=list)
    submitted: float = 0.0  # when its current task was submitted (time.monotonic)
    measure_seconds: float = 0.0  # its measurements' own wall time, summed (logged to MLflow at its end)
    node: dict | None = None  # the node its first repeat ran on (this_node()); the later ones are pinned there


class Scheduler:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.experiment, self.study, self.tracker = session.experiment, session.study, session.tracker
        self.executor, self.stop, self.progress = session.executor, session.stop, session.progress
        self.running: dict[Any, _Running] = {}
        self.ready: list[_Running] = []  # trials that passed screening, waiting for a measurement slot
        self.last = ""  # the last finished trial, for the status line
        self.spent_before = self.study.user_attrs.get("search_seconds", 0.0)
        self.search_started: float | None = None
        self.search_ended: float | None = None

    def run(self) -> None:
        """The search, to its budget or a stop (then what runs is recorded as stopped and queued again)."""
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
        if experiment.time_budget_s is not None and self.search_seconds() >= experiment.time_budget_s:
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

    def search_seconds(self) -> float:
        """Search time over every run of this study (the time budget is the study's, not one command's); the
        probe, start-up and confirmation do not count."""
        end = self.search_ended if self.search_ended is not None else time.monotonic()
        started = self.search_started if self.search_started is not None else end
        return self.spent_before + end - started

    def _save_search_time(self) -> None:
        """Kept after every trial, so a killed driver loses at most one trial's time."""
        self.study.set_user_attr("search_seconds", self.search_seconds())

    def _start_trial(self) -> None:
        trial = self.study.ask()
        source = trial.user_attrs.get(ATTR_SOURCE)
        try:
            config = self.experiment.space.sample(trial, self.session.context)
        except ConfigError as e:  # a combination of values the engine refuses
            trial.set_user_attr(ATTR_FAILURE, f"invalid config: {e}")
            self.study.tell(trial, state=TrialState.FAIL)
            tags = {"trial": trial.number, "phase": "search", "source": source, "state": "FAIL", "failure": str(e)}
            run_id = self.tracker.start_trial(f"trial {trial.number}", figures.search_params(trial.params), tags)
            self.tracker.end_trial(run_id, "FAILED", {}, {"failure_kind": "invalid config"}, {})
            self.progress.event(f"trial {trial.number}: invalid config ({e})")
            return
        trial.set_user_attr(ATTR_CONFIG, config.to_dict())
        params = figures.run_params(config, self.session.context, trial.params)
        for name in trial.params:  # beside each searched parameter, the engine's value it gave
            trial.set_user_attr(f"engine.{name}", params.get(f"{name}_readable", params[name]))
        tags = {"trial": trial.number, "phase": "search", "source": source}
        run_id = self.tracker.start_trial(f"trial {trial.number}", params, tags)
        trial.set_user_attr(ATTR_RUN, run_id)
        running = _Running(trial, config, run_id, source)
        started = f" ({source})" if source else ""
        log.info("trial %d started%s: %s", trial.number, started, self.session.describe(config))
        experiment = self.experiment
        screening = experiment.trace is not None and source is None
        if screening and (experiment.max_screened is None or self._screened_trials() < experiment.max_screened):
            probe = self.session.probe
            simulation = Simulation(str(experiment.trace), config.to_dict(), experiment.sim_bandwidth, probe)
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
        self.tracker.end_trial(running.run_id, STOPPED_EARLY, {}, tags, {"simulation.json": sim})
        self.last = f"#{trial.number} screened"
        self.progress.event(f"trial {trial.number}: screened out by the simulator ({predicted:.4g} tok/s predicted, "
                            f"best {best:.4g})  {self.session.describe(running.config)}")  # fmt: skip

    def _submit(self, running: _Running, quality: bool) -> None:
        running.submitted = time.monotonic()
        node = running.node["id"] if running.node else None
        self.running[self.executor.submit(self.session.measurement(running.config, quality), node)] = running

    def _on_measured(self, running: _Running, out: dict) -> None:
        trial = running.trial
        running.measure_seconds += out.get("seconds", 0.0)
        if "result" not in out:
            self._fail(running, f"{out['message']}")
            return
        result = out["result"]
        running.results.append(result)
        if running.node is None:
            running.node = result["node"]
            trial.set_user_attr(ATTR_NODE, running.node)
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
        figures.set_constraints(trial, constraints)
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
        text = figures.values_text(self.experiment, values)
        why = "" if feasible else f" (infeasible: {_violations(constraints)})"
        short = text + ("" if feasible else " (infeasible)")
        self._ended(running, "FINISHED", {**summary, "feasible": float(feasible)}, tags, short, text + why)

    def _prune(self, running: _Running, summary: dict) -> None:
        trial = running.trial
        trial.set_user_attr(ATTR_SUMMARY, summary)
        self.study.tell(trial, state=TrialState.PRUNED)
        line = f"pruned after {len(running.results)} repeats ({summary.get('decode_tok_s', float('nan')):.2f} tok/s)"
        self._ended(running, STOPPED_EARLY, summary, {"state": "PRUNED"}, "pruned", line)

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
        tags = {**tags, "fidelity": "engine", **figures.node_tags(running.node)}
        self.tracker.end_trial(running.run_id, status, summary, tags, artifacts)
        self.last = f"#{running.trial.number} {short}"
        self.progress.event(f"trial {running.trial.number}: {line}  {self.session.describe(running.config)}")
        self._save_search_time()

    def stop_running(self, why: str) -> None:
        """Ctrl-C: cancel what runs, record it as stopped and queue it again (a resume re-measures it)."""
        for ref in self.running:
            self.executor.cancel(ref)
        for running in [*self.running.values(), *self.ready]:
            self.tracker.end_trial(running.run_id, "KILLED", {}, {"state": "FAIL", "failure": f"{STOPPED}: {why}"}, {})
            requeue(self.study, running.trial.number, running.trial.params, running.source, why)
        self.running.clear()
        self.ready.clear()
        self.progress.event(f"stopped ({why}); run the same command again to continue")

    def _status(self) -> str:
        experiment = self.experiment
        counted = self._counted_trials()
        parts = [f"trial {counted}" + (f"/{experiment.trials}" if experiment.trials else "")]
        time_left = None
        if experiment.time_budget_s is not None:
            time_left = max(0.0, experiment.time_budget_s - self.search_seconds())
            parts.append(f"{format_duration(time_left)} left")
        best = figures.best_trials(self.study, experiment, 1)
        if best:
            parts.append(f"best #{best[0].number} {figures.values_text(experiment, best[0].values)}")
        if self.last:
            parts.append(f"last {self.last}")
        for running in self.running.values():
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


def _violations(constraints: dict[str, float]) -> str:
    return ", ".join(k for k, v in constraints.items() if v > 0)
