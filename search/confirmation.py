"""Confirmation: the best few trials and the engine's default config, measured again in interleaved rounds, so
that the exported config's speedup comes with a confidence interval. Every round runs on the node that measured
the best trial (on a cluster, speeds from different machines are not compared)."""

from __future__ import annotations

from typing import Any

from optuna.trial import FrozenTrial, TrialState

from engine.bench.stats import median_ci, ratio_ci
from engine.config import EngineConfig
from search import trials as figures
from search.session import Session
from search.study import STOPPED
from search.trials import ATTR_CONFIG, ATTR_NODE


def confirm(session: Session) -> None:
    """The best few trials and the default config, measured again in interleaved rounds."""
    experiment = session.experiment
    candidates = figures.best_trials(session.study, experiment, experiment.confirm)
    finished = [t.number for t in session.study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    last_trial = max(finished, default=-1)
    if not candidates or session.study.user_attrs.get("confirmation", {}).get("after_trial") == last_trial:
        return
    configs = {"default": EngineConfig()}
    for t in candidates:
        configs[f"trial {t.number}"] = EngineConfig.from_dict(t.user_attrs[ATTR_CONFIG])
    rounds = experiment.confirm_repeats
    node = _node(session, candidates[0])
    where = f" on {node['host']} (node {node['id'][:8]})" if node else ""
    session.progress.event(f"confirmation: {', '.join(list(configs)[1:])} against the default, {rounds} "
                           f"interleaved rounds{where}")  # fmt: skip
    tags = {"phase": "confirm", **figures.node_tags(node)}
    runs = {name: session.tracker.start_trial(f"confirm {name}", figures.run_params(c, session.context), tags)
            for name, c in configs.items()}  # fmt: skip
    measured: dict[str, list[dict | None]] = {name: [] for name in configs}  # per round; None: failed
    failed: dict[str, str] = {}
    for round_ in range(rounds):
        for name, config in configs.items():
            if session.stop.reason is not None:
                stopped = {"failure": f"{STOPPED}: {session.stop.reason}"}
                for run_id in runs.values():
                    session.tracker.end_trial(run_id, "KILLED", {}, stopped, {})
                return
            status = f"confirming: round {round_ + 1}/{rounds}, {name}"
            out = _measure_now(session, config, status, node) if name not in failed else None
            if out is not None and "result" not in out:
                failed[name] = out["message"]
            result = out.get("result") if out else None
            measured[name].append(result)
            if result is not None:
                session.tracker.log_repeat(runs[name], round_, figures.repeat_figures(result))
    confirmation = _confirmation(*experiment.objectives[0], measured, failed)
    session.study.set_user_attr("confirmation", {**confirmation, "after_trial": last_trial, ATTR_NODE: node})
    for name in configs:
        results = [r for r in measured[name] if r is not None]
        summary = figures.summarize(results) if results else {}
        tags = {"failure": failed.get(name)}
        status = "FAILED" if name in failed else "FINISHED"
        session.tracker.end_trial(runs[name], status, summary, tags, {"bench_results.json": results})


def _node(session: Session, best: FrozenTrial) -> dict | None:
    """The node that measured the best trial (or another on its machine); None if its machine left the cluster
    (then any node: the rounds are interleaved, so a candidate and the default still run close in time)."""
    measured = best.user_attrs.get(ATTR_NODE)
    node = session.executor.find(measured) if measured else None
    if measured is None or node is not None:
        return node
    session.progress.event(f"the node that measured trial {best.number} ({measured['host']}) has left the cluster: "
                           "the confirmation runs wherever a slot is free")  # fmt: skip
    return None


def _measure_now(session: Session, config: EngineConfig, status: str, node: dict | None) -> dict | None:
    """One measurement (on ``node`` if given), waited for; None (the task cancelled) if a stop came meanwhile."""
    ref = session.executor.submit(session.measurement(config, quality=False), node["id"] if node else None)
    while not session.executor.wait([ref], timeout_s=1.0):
        session.progress.update(status)
        if session.stop.reason is not None:
            session.executor.cancel(ref)
            return None
    return session.executor.result(ref)


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
