"""``autoresearch report``: a study as a markdown page a person reads the next morning, with four plots.

The page gives the machine, model and budget; when no trial meets the constraints, that nothing was exported
and why (the constraints broken, the closest trial); the trials by outcome (failures with their reasons); the
confirmation phase (each finalist's speed and its ratio to the default config, with intervals); the best
trials with the settings that differ from the defaults. Plots, as PNGs beside the page: optimisation
history, parameter importances, the speed / quality Pareto front, and speed against cache size.
"""

from __future__ import annotations

import base64
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
from optuna.trial import FrozenTrial, TrialState

from engine.units import format_bytes
from search import trials as figures
from search.export import no_choice
from search.trials import ATTR_BOUNDS, ATTR_CONFIG, ATTR_SUMMARY

TOP_TRIALS = 10
MEMORY_FIGURES = (
    "Memory peak: what the budget is judged on, the enforced limit's own peak (the cgroup's maximum usage: the "
    "process's memory and the page cache it filled) where the limit was enforced, else the peak RSS. Peak RSS: the "
    "measuring process's largest resident set (its heap and every mapped file page it touched); it can exceed the "
    "limit's peak, because file pages already in the page cache when the process started stay charged to whoever "
    "read them first (Linux memory accounting), not to the limit."
)


def write_report(study: optuna.Study, objectives: list | tuple, out: Path, notes: Sequence[str] = ()) -> Path:
    """The page; ``notes``: lines for its "Nothing exported" section (written when no trial is feasible)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    attrs = study.user_attrs
    trials = study.get_trials(deepcopy=False)
    metric, direction = objectives[0]
    lines = [f"# Tuning report: {study.study_name}", ""]
    machine, model = attrs.get("machine", {}), attrs.get("model", {})
    lines += [
        f"- experiment file: `{attrs.get('experiment_file')}`",
        f"- machine: {machine.get('cpu')}, {machine.get('cores')} cores, "
        f"{format_bytes(machine.get('ram_bytes', 0))} RAM, disk {machine.get('disk', {}).get('name')}",
        f"- model: `{model.get('path')}` ({model.get('model_type')}, {format_bytes(model.get('weight_bytes', 0))})",
        f"- workload: {attrs.get('workload')}; memory budget {format_bytes(attrs.get('memory_budget', 0))}",
        f"- objectives: {', '.join(f'{d} {m}' for m, d in objectives)}",
        f"- search time: {attrs.get('search_seconds', 0) / 60:.1f} min over {len(trials)} trials",
        "",
    ]
    if not figures.measured_feasible(study):
        why = no_choice(study, "fastest")
        lines += ["## Nothing exported", "", why[0].upper() + why[1:]]
        lines += ["", *notes, ""] if notes else [""]
    states = Counter(t.state.name for t in trials)
    lines += ["## Trials", "", ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) + ".", ""]
    failures = [t for t in trials if t.state == TrialState.FAIL]
    if failures:
        lines += ["| trial | failure |", "|---|---|"]
        lines += [f"| {t.number} | {_cell(t.user_attrs.get('failure', 'unknown'))} |" for t in failures]
        lines.append("")
    confirmation = attrs.get("confirmation")
    if confirmation:
        lines += [f"## Confirmation ({confirmation['metric']}, re-measured interleaved with the default)", ""]
        lines += ["| config | repeats | median [95% CI] | vs default [95% CI] |", "|---|---|---|---|"]
        for name, e in confirmation["entries"].items():
            median = f"{e['median']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]" if "median" in e else "failed"
            ratio = f"{e['ratio']:.3f}x [{e['ratio_ci'][0]:.3f}, {e['ratio_ci'][1]:.3f}]" if "ratio" in e else ""
            lines.append(f"| {name} | {e['repeats']} | {median} | {ratio} |")
        lines.append("")
    complete = [t for t in trials if t.state == TrialState.COMPLETE and ATTR_SUMMARY in t.user_attrs]
    sign = -1 if direction == "maximize" else 1
    bounds = attrs.get(ATTR_BOUNDS)

    def feasible(t: FrozenTrial) -> bool:
        return figures.feasible(figures.judged(t, bounds))

    best = sorted(complete, key=lambda t: (not feasible(t), sign * t.values[0]))[:TOP_TRIALS]
    if best:
        lines += [f"## Best trials (by {metric})", ""]
        lines += ["| trial | feasible | decode tok/s [95% CI] | top-1 | KL | memory peak | peak RSS | settings |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for t in best:
            s = t.user_attrs[ATTR_SUMMARY]
            ci = ""
            if "decode_tok_s_ci_low" in s:
                ci = f" [{s['decode_tok_s_ci_low']:.2f}, {s['decode_tok_s_ci_high']:.2f}]"
            lines.append(
                f"| {t.number} | {'yes' if feasible(t) else 'no'} | "
                f"{s.get('decode_tok_s', float('nan')):.2f}{ci} | {_num(s.get('quality_top1'))} | "
                f"{kl_text(s.get('quality_kl'))} | {_bytes(figures.memory_peak(s))} | "
                f"{_bytes(s.get('peak_rss_bytes'))} | "
                f"{_cell(figures.describe(t.user_attrs.get(ATTR_CONFIG, {}), attrs.get('context', {})))} |"
            )
        lines += ["", MEMORY_FIGURES, ""]
    plots = _plots(study, trials, objectives, out.parent)
    if plots:
        lines += ["## Plots", ""] + [f"![{title}]({path.name})" for title, path in plots] + [""]
    out.write_text("\n".join(lines))
    return out


def _plots(study: optuna.Study, trials: list[FrozenTrial], objectives, folder: Path) -> list[tuple[str, Path]]:
    metric, direction = objectives[0]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and ATTR_SUMMARY in t.user_attrs]
    if not complete:
        return []
    plots = []

    fig, ax = plt.subplots(figsize=(7, 4))
    bounds = study.user_attrs.get(ATTR_BOUNDS)
    feasible = [t for t in complete if figures.feasible(figures.judged(t, bounds))]
    infeasible = [t for t in complete if not figures.feasible(figures.judged(t, bounds))]
    ax.scatter([t.number for t in feasible], [t.values[0] for t in feasible], label="feasible")
    ax.scatter([t.number for t in infeasible], [t.values[0] for t in infeasible], facecolors="none",
               edgecolors="tab:red", label="infeasible")  # fmt: skip
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
               marker="x", color="grey", label="pruned (last repeat)")  # fmt: skip
    best, xs, ys = None, [], []
    for t in sorted(feasible, key=lambda t: t.number):
        if best is None or (t.values[0] > best if direction == "maximize" else t.values[0] < best):
            best = t.values[0]
        xs.append(t.number)
        ys.append(best)
    ax.step(xs, ys, where="post", color="black", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title="Optimisation history")
    ax.legend()
    plots.append(("optimisation history", _save(fig, folder / "history.png")))

    importances = _importances(study, len(objectives))
    if importances:
        fig, ax = plt.subplots(figsize=(7, 4))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel=f"importance for {metric} (fANOVA)", title="Parameter importances")
        plots.append(("parameter importances", _save(fig, folder / "importances.png")))

    front = figures.speed_quality_front(feasible)
    if front:
        plots.append(("speed against quality", _quality_plot(complete, feasible, front, folder)))

    fig, ax = plt.subplots(figsize=(7, 4))
    by_policy: dict[str, list[tuple[float, float]]] = {}
    for t in complete:
        config, speed = t.user_attrs.get(ATTR_CONFIG, {}), t.user_attrs[ATTR_SUMMARY].get("decode_tok_s")
        if speed is not None:
            by_policy.setdefault(config.get("cache_policy", "none"), []).append((config.get("cache_bytes", 0), speed))
    for policy, xy in sorted(by_policy.items()):
        ax.scatter([x / 2**20 for x, _ in xy], [y for _, y in xy], label=policy)
    ax.set(xlabel="expert cache (MiB)", ylabel="decode tok/s", title="Speed against cache size")
    ax.legend(title="cache_policy")
    plots.append(("speed against cache size", _save(fig, folder / "cache.png")))
    return plots


def write_html(markdown: Path) -> Path:
    """The page as one HTML file beside it, its plots embedded: what MLflow's artifact view renders (it shows a
    markdown file as text, its image links pointing nowhere)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown.read_text())

    def embed(match: re.Match) -> str:
        image = markdown.parent / match.group(1)
        if not image.is_file():
            return match.group(0)
        return f'<img src="data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()}"'

    body = re.sub(r'<img src="([^"/]+\.png)"', embed, body)
    out = markdown.with_suffix(".html")
    out.write_text(f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{markdown.stem}</title>"
                   f"<style>{_CSS}</style></head><body>\n{body}</body></html>\n")  # fmt: skip
    return out


_CSS = (
    "body{font-family:sans-serif;max-width:70em;margin:1em auto;padding:0 1em}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
)


def _quality_plot(
    complete: list[FrozenTrial], feasible: list[FrozenTrial], front: list[FrozenTrial], folder: Path
) -> Path:
    """Decode speed against KL and against top-1 agreement, each trial labelled with its number; the Pareto front
    (speed up, KL down) is drawn through feasible trials only, as only they can be exported."""
    fig, (by_kl, by_top1) = plt.subplots(1, 2, figsize=(11, 4.5))
    ok = {t.number for t in feasible}
    for ax, key, label in ((by_kl, "quality_kl", "KL against the original weights (nats)"),
                           (by_top1, "quality_top1", "top-1 agreement with the original weights")):  # fmt: skip
        infeasible_style = {"facecolors": "none", "edgecolors": "tab:red", "label": "infeasible"}
        for group, style in ((True, {"color": "tab:blue", "label": "feasible"}), (False, infeasible_style)):
            points = [(t.number, t.user_attrs[ATTR_SUMMARY]) for t in complete if (t.number in ok) == group]
            points = [(n, s) for n, s in points if s.get(key) is not None and s.get("decode_tok_s") is not None]
            ax.scatter([s["decode_tok_s"] for _, s in points], [s[key] for _, s in points], **style)
            for number, s in points:
                ax.annotate(str(number), (s["decode_tok_s"], s[key]), textcoords="offset points", xytext=(3, 3),
                            fontsize=7)  # fmt: skip
        ax.set(xlabel="decode tok/s", ylabel=label)
    on_front = [t.user_attrs[ATTR_SUMMARY] for t in front]
    by_kl.plot([m["decode_tok_s"] for m in on_front], [m["quality_kl"] for m in on_front], "-", color="tab:orange",
               label="Pareto front (feasible)")  # fmt: skip
    by_kl.set_title("Speed against KL")
    by_top1.set_title("Speed against top-1")
    by_kl.legend()
    return _save(fig, folder / "pareto.png")


def _importances(study: optuna.Study, n_objectives: int) -> dict[str, float]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3:
        return {}
    target = (lambda t: t.values[0]) if n_objectives > 1 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return optuna.importance.get_param_importances(study, target=target)
        except (ValueError, RuntimeError):  # too few distinct values to attribute anything
            return {}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def kl_text(value: float | None) -> str:
    """A KL for people: three significant digits; below 1e-9 in size it is float32 rounding of 0 (the sum of
    p log p/q over a vocabulary in float32), shown as 0 rather than as a signed zero."""
    if value is None:
        return "n/a"
    return "0" if abs(value) < 1e-9 else f"{value:.3g}"


def _bytes(value: float | None) -> str:
    return format_bytes(value) if value else "n/a"


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:300]
