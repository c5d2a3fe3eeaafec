"""``autoresearch export``: the chosen trial's EngineConfig as a TOML file, with where it came from.

The file is an engine config (its ``[engine]`` table is all ``autoresearch bench --config`` reads) followed
by a ``[provenance]`` table: the machine, model and workload it was tuned on, its measured figures with their
interval, the speedup over the engine's default config from the confirmation phase, and the study and trial.

Picks: ``fastest`` (the best first objective among feasible trials, confirmed figures first), ``knee`` (the
bend of the speed / KL Pareto front: the most speed for the least quality lost), ``min-quality=X`` (the
fastest whose top-1 agreement with the original weights is at least X). Only trials that meet every constraint
are candidates, their quality judged against the study's latest [constraints]; when none is, nothing is exported
and ``no_choice`` says why: the constraints broken, and the closest trial with its figures.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from engine.config import EngineConfig, toml_key, toml_value
from engine.units import format_bytes
from search import trials as figures
from search.trials import ATTR_BOUNDS, ATTR_CONFIG, ATTR_SUMMARY


@dataclass(frozen=True)
class Choice:
    trial: FrozenTrial
    config: EngineConfig
    how: str
    confirmed: dict | None  # the confirmation phase's entry for this trial


def parse_pick(text: str) -> tuple[str, float | None]:
    if text in ("fastest", "knee"):
        return text, None
    if text.startswith("min-quality="):
        try:
            bound = float(text.split("=", 1)[1])
        except ValueError:
            bound = -1.0
        if 0.0 <= bound <= 1.0:
            return "min-quality", bound
    raise ValueError(f"--pick must be fastest, knee or min-quality=<top-1 from 0 to 1>, got {text!r}")


def pick(study: optuna.Study, objectives: list | tuple, how: str) -> Choice | None:
    """The trial ``how`` picks among the feasible complete ones; None when there is none."""
    kind, bound = parse_pick(how)
    candidates = figures.measured_feasible(study)
    if kind == "min-quality":
        candidates = [t for t in candidates if (t.user_attrs[ATTR_SUMMARY].get("quality_top1") or 0.0) >= bound]
    if not candidates:
        return None
    confirmation = study.user_attrs.get("confirmation", {}).get("entries", {})
    if kind == "knee":
        chosen = _knee(candidates)
    else:
        sign = 1.0 if objectives[0][1] == "maximize" else -1.0

        def score(t: FrozenTrial) -> tuple[bool, float]:
            entry = confirmation.get(f"trial {t.number}", {})
            confirmed = entry.get("median") is not None
            return confirmed, sign * (entry["median"] if confirmed else t.values[0])

        chosen = max(candidates, key=score)
    config = EngineConfig.from_dict(chosen.user_attrs[ATTR_CONFIG])
    return Choice(chosen, config, how, confirmation.get(f"trial {chosen.number}"))


def no_choice(study: optuna.Study, how: str) -> str:
    """Why ``pick(study, ..., how)`` found nothing, for a person: with ``min-quality=``, the best quality the
    feasible trials reach; else the constraints broken (by how many trials) and the closest trial (the one
    whose relative excess over its bounds is least) with its figures; or, with no trial measured to the end,
    what became of the trials."""
    kind, bound = parse_pick(how)
    feasible = figures.measured_feasible(study)
    if kind == "min-quality" and feasible:
        best = max(feasible, key=lambda t: t.user_attrs[ATTR_SUMMARY].get("quality_top1") or 0.0)
        top1 = best.user_attrs[ATTR_SUMMARY].get("quality_top1")
        return (
            f"no feasible trial has quality_top1 >= {bound:g}, so nothing was exported: the highest among the "
            f"{len(feasible)} feasible trials is {_num(top1)} (trial {best.number}); pick a lower bound"
        )
    if feasible:  # pick finds one whenever a trial is feasible and the pick is not min-quality
        raise AssertionError(f"{how} picks nothing among {len(feasible)} feasible trials")
    measured = figures.measured(study)
    if not measured:
        return f"no trial was measured to the end, so nothing was exported: {_outcomes(study)}"
    bounds = study.user_attrs.get(ATTR_BOUNDS)
    budget = study.user_attrs.get("memory_budget")
    broken = {t.number: figures.violations(t, figures.judged(t, bounds), budget) for t in measured}
    counts = Counter(v.key for found in broken.values() for v in found)
    named = " and ".join(f"{n} broke {_setting(key, bounds, budget)}" for key, n in counts.most_common())
    closest = min(measured, key=lambda t: (sum(v.excess for v in broken[t.number]), t.number))
    what = " and ".join(v.text for v in broken[closest.number])
    objectives = study.user_attrs.get("objectives") or [("value", "")]
    values = ", ".join(f"{m} {v:.4g}" for (m, _), v in zip(objectives, closest.values or [], strict=False))
    settings_text = figures.describe(closest.user_attrs[ATTR_CONFIG], study.user_attrs.get("context", {}))
    which = "constraint" if len(counts) == 1 else "constraints"
    return (
        f"no trial met the constraints, so nothing was exported: of the {len(measured)} trials measured to the end, "
        f"{named}. The closest, trial {closest.number} ({values}; {settings_text}), has {what}. Loosen the "
        f"{which}, or search settings that can meet {'it' if len(counts) == 1 else 'them'}; the report lists every "
        "trial."
    )


def _setting(key: str, bounds: dict[str, float] | None, budget: int | None) -> str:
    """A constraint as the experiment file sets it: ``max_quality_kl = 0.0001``, ``memory_budget = "1 GiB"``."""
    if key == "memory_budget" and budget:
        return f'memory_budget = "{format_bytes(budget)}"'
    if bounds and key in bounds:
        return f"{key} = {bounds[key]:g}"
    return key


def _outcomes(study: optuna.Study) -> str:
    """What became of a study's trials: "3 failed (out_of_memory 2, crashed 1), 1 pruned"."""
    trials = study.get_trials(deepcopy=False)
    failed = Counter(
        str(t.user_attrs.get("failure", "unknown")).split(":", 1)[0] for t in trials if t.state == TrialState.FAIL
    )
    parts = []
    if failed:
        kinds = ", ".join(f"{kind} {n}" for kind, n in failed.most_common())
        parts.append(f"{sum(failed.values())} failed ({kinds})")
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    if pruned:
        parts.append(f"{pruned} pruned")
    if not parts:
        return "the study has no finished trial"
    text = ", ".join(parts) + "; the report lists each failure"
    budget = study.user_attrs.get("memory_budget")
    if failed.get("out_of_memory") and budget:
        text += f'. memory_budget = "{format_bytes(budget)}" may leave too little for the process and its experts'
    return text


def _num(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4g}"


def _knee(trials: list[FrozenTrial]) -> FrozenTrial:
    """On the Pareto front of (decode speed up, KL down): the point farthest from the chord between its ends
    (the fastest trial when the front has no bend, or no trial has both figures)."""
    front = figures.speed_quality_front(trials)
    if len(front) <= 2:
        return front[-1] if front else max(trials, key=lambda t: t.user_attrs[ATTR_SUMMARY].get("decode_tok_s", 0))
    xy = np.array([(t.user_attrs[ATTR_SUMMARY]["decode_tok_s"], t.user_attrs[ATTR_SUMMARY]["quality_kl"])
                   for t in front], dtype=float)  # fmt: skip
    span = np.where(np.ptp(xy, axis=0) > 0, np.ptp(xy, axis=0), 1.0)
    xy = (xy - xy.min(axis=0)) / span
    (ax, ay), (bx, by) = xy[0], xy[-1]
    distance = np.abs((bx - ax) * (xy[:, 1] - ay) - (by - ay) * (xy[:, 0] - ax))  # to the chord, unnormalised
    return front[int(np.argmax(distance))]


def export(study: optuna.Study, choice: Choice, out: Path) -> Path:
    """Write ``choice``'s config with its provenance to ``out`` (TOML)."""
    attrs = study.user_attrs
    summary = choice.trial.user_attrs[ATTR_SUMMARY]
    provenance: dict[str, Any] = {
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "pick": choice.how,
        "study": study.study_name,
        "trial": choice.trial.number,
        "experiment_file": attrs.get("experiment_file"),
        "workload": attrs.get("workload"),
        "memory_budget_bytes": attrs.get("memory_budget"),
        "engine_version": attrs.get("engine", {}).get("package"),
        "engine_commit": attrs.get("engine", {}).get("commit"),
    }
    tables = {
        "provenance": provenance,
        "provenance.metrics": summary,  # the trial's repeats: medians, and the 95% interval of decode speed
        "provenance.machine": attrs.get("machine", {}),
        "provenance.model": attrs.get("model", {}),
    }
    if choice.confirmed is not None:  # re-measured at the end, interleaved with the default config
        tables["provenance.confirmation"] = {"metric": attrs["confirmation"]["metric"], **choice.confirmed}
    lines = [choice.config.to_toml().rstrip()]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items() if v is not None]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    EngineConfig.load(out)  # the file must load as the config it claims
    return out
