"""``autoresearch report-trace``: a trace's routing as a markdown page with PNG plots.

- hit rate against cache size for each policy, replayed by the simulator, beside Belady's optimal bound;
- reuse distance: decode tokens since the same expert of the same layer was last used;
- per-layer expert load: each expert's share of its layer's selections;
- adjacent-token reuse per layer, beside the rate random routing would give;
- predictor accuracy per layer: the share of a layer's experts that ``gate_lookahead`` (from 1 to D layers
  before) and ``previous_token`` had among their top-k;
- each predictor's prefetch precision and recall through the simulator's replay (``coactivation`` learning
  online as the tokens pass), one layer ahead, top-k proposals.

Figures are over the decode tokens (the calls of one token after the prompt), as the benchmark's are.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from engine.analysis.routing_stats import adjacent_reuse, overlap
from engine.analysis.simulator import simulate
from engine.analysis.trace import Trace
from engine.config import CACHE_POLICIES, PREDICTORS, EngineConfig
from engine.streaming.predictors import READS_LOOKAHEAD

CACHE_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75)  # of all experts


def write_report(trace: Trace, out_dir: str | Path, name: str = "trace") -> Path:
    """Write ``name``.md and its plots into ``out_dir``; returns the markdown's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    decode = _decode_rows(trace)
    experts = trace.top_ids[decode, :, : trace.top_k].astype(np.intp)  # [T, L, k]
    meta = trace.meta
    weights = meta["recorded_with"].get("weights", "original")
    layers, num_experts, k = len(trace.moe_layers), trace.num_experts, trace.top_k
    sections = [
        f"# Routing trace: {Path(meta['model']).name} on {meta['workload']['name']}",
        "",
        f"Recorded {meta['recorded_at']} from `{meta['model']}` (weights `{weights}`): "
        f"{len(trace.token_ids)} tokens in {len(trace.call_tokens)} forward calls, of which {len(experts)} decode "
        f"tokens; {layers} MoE layers of {num_experts} experts, top-{k}. Written by `autoresearch report-trace`.",
    ]
    curve = _hit_rates(trace)
    sections += _section(out, name, "hit-rate", "Hit rate against cache size", _plot_hit_rates(curve), _table(curve))
    distances = _reuse_distances(experts)
    sections += _section(
        out,
        name,
        "reuse-distance",
        "Reuse distance",
        _plot_histogram(distances),
        [f"Median {np.median(distances):.0f} tokens over {len(distances)} reuses." if len(distances) else ""],
    )
    load = _expert_load(experts, num_experts)
    sections += _section(
        out,
        name,
        "expert-load",
        "Per-layer expert load",
        _plot_load(load),
        [f"Busiest expert's share of its layer, over uniform: {load.max(axis=1).mean() * num_experts:.2f}x."],
    )
    reuse = _adjacent_reuse(experts)
    sections += _section(
        out,
        name,
        "adjacent-reuse",
        "Adjacent-token reuse",
        _plot_per_layer({"measured": reuse}, k / num_experts, "random"),
        [f"Mean {reuse.mean():.2f} against {k / num_experts:.2f} for random routing."],
    )
    accuracy = _predictor_accuracy(trace, decode, experts)
    sections += _section(
        out,
        name,
        "predictors",
        "Predictor accuracy",
        _plot_per_layer(accuracy, None, None),
        [f"{label}: mean {np.nanmean(values):.2f}" for label, values in accuracy.items()],
    )
    sections += ["", "## Prefetch", "", *_prefetch_table(trace)]
    path = out / f"{name}.md"
    path.write_text("\n".join(sections) + "\n")
    return path


def _decode_rows(trace: Trace) -> np.ndarray:
    rows = [a for c, (a, b) in enumerate(trace.call_bounds()) if c > 0 and b - a == 1]
    if not rows:
        raise ValueError("the trace has no decode tokens (record a generate workload)")
    return np.asarray(rows)


def _section(out: Path, name: str, slug: str, title: str, figure, lines: list[str]) -> list[str]:
    image = f"{name}-{slug}.png"
    figure.savefig(out / image, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return ["", f"## {title}", "", f"![{title}]({image})", "", *lines]


def _hit_rates(trace: Trace) -> dict[str, list[tuple[float, float, float]]]:
    """Per policy: (fraction of experts cached, hit rate, optimal hit rate)."""
    entry = 3 * trace.meta["hidden_size"] * trace.meta["intermediate_size"] * 4
    total = len(trace.moe_layers) * trace.num_experts
    curve: dict[str, list[tuple[float, float, float]]] = {}
    for policy in (p for p in CACHE_POLICIES if p != "none"):
        for fraction in CACHE_FRACTIONS:
            config = _replay_config(trace, cache_policy=policy, cache_bytes=max(1, round(fraction * total)) * entry)
            result = simulate(trace, config)
            curve.setdefault(policy, []).append((fraction, result.hit_rate, result.optimal_hit_rate))
    return curve


def _plot_hit_rates(curve: dict[str, list[tuple[float, float, float]]]):
    figure, axes = plt.subplots(figsize=(6, 4))
    for policy, points in curve.items():
        axes.plot([100 * f for f, _, _ in points], [100 * h for _, h, _ in points], marker="o", label=policy)
    optimal = next(iter(curve.values()))
    axes.plot([100 * f for f, _, _ in optimal], [100 * o for _, _, o in optimal], "k--", label="optimal (Belady)")
    axes.set(xlabel="cache size (% of all experts)", ylabel="hit rate (%)", ylim=(0, 100))
    axes.legend()
    return figure


def _table(curve: dict[str, list[tuple[float, float, float]]]) -> list[str]:
    fractions = [f for f, _, _ in next(iter(curve.values()))]
    lines = [
        "Hit rate over the decode tokens after one warm-up pass (the optimal bound in brackets):",
        "",
        "| policy | " + " | ".join(f"{100 * f:.0f}% cached" for f in fractions) + " |",
        "|---" * (len(fractions) + 1) + "|",
    ]
    for policy, points in curve.items():
        lines.append(f"| {policy} | " + " | ".join(f"{100 * h:.1f} ({100 * o:.1f})" for _, h, o in points) + " |")
    return lines


def _reuse_distances(experts: np.ndarray) -> np.ndarray:
    last: dict[tuple[int, int], int] = {}
    distances = []
    for t, row in enumerate(experts):
        for layer, chosen in enumerate(row):
            for expert in chosen.tolist():
                before = last.get((layer, expert))
                if before is not None:
                    distances.append(t - before)
                last[(layer, expert)] = t
    return np.asarray(distances)


def _plot_histogram(distances: np.ndarray):
    figure, axes = plt.subplots(figsize=(6, 3.5))
    if len(distances):
        axes.hist(distances, bins=np.arange(1, max(distances.max(), 2) + 2) - 0.5)
    axes.set(xlabel="tokens since the expert was last used in its layer", ylabel="reuses")
    return figure


def _expert_load(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] each expert's share of its layer's selections."""
    layers = experts.shape[1]
    counts = np.zeros((layers, num_experts))
    for layer in range(layers):
        counts[layer] = np.bincount(experts[:, layer].reshape(-1), minlength=num_experts)
    return counts / counts.sum(axis=1, keepdims=True)


def _plot_load(load: np.ndarray):
    figure, axes = plt.subplots(figsize=(7, 3.5))
    image = axes.imshow(load, aspect="auto", interpolation="nearest", cmap="viridis")
    axes.set(xlabel="expert", ylabel="MoE layer")
    figure.colorbar(image, ax=axes, label="share of the layer's selections")
    return figure


def _adjacent_reuse(experts: np.ndarray) -> np.ndarray:
    """Per layer, the mean share of a token's experts that the previous token also used."""
    return np.asarray([adjacent_reuse(experts[:, li]) for li in range(experts.shape[1])])


def _predictor_accuracy(trace: Trace, decode: np.ndarray, experts: np.ndarray) -> dict[str, np.ndarray]:
    """Per layer, the share of its experts each predictor had in its top-k (NaN where it cannot say)."""
    layers, k = experts.shape[1], trace.top_k
    accuracy: dict[str, np.ndarray] = {}
    for depth in range(1, trace.depth + 1):
        values = np.full(layers, np.nan)
        for li in range(depth, layers):
            guesses = trace.lookahead_ids[decode, li - depth, depth - 1, :k]
            values[li] = overlap(guesses, experts[:, li])
        if not np.isnan(values).all():
            accuracy[f"gate_lookahead, {depth} layer(s) before"] = values
    accuracy["previous_token"] = _adjacent_reuse(experts)
    return accuracy


def _prefetch_table(trace: Trace) -> list[str]:
    """Each predictor the trace can replay: its prefetch precision and recall, one layer ahead, no cache."""
    lines = [
        "Through the simulator's replay over the decode tokens after one warm-up pass: one layer ahead, each token's"
        " top-k proposed, no cache. Precision: the share of prefetched experts used; recall: the share of misses"
        " prefetched.",
        "",
        "| predictor | precision | recall |",
        "|---|---|---|",
    ]
    for predictor in (p for p in PREDICTORS if p != "none"):
        if predictor in READS_LOOKAHEAD and trace.depth == 0:
            lines.append(f"| {predictor} | n/a: the trace has no lookahead | |")
            continue
        result = simulate(trace, _replay_config(trace, predictor=predictor), optimal=False)
        lines.append(f"| {predictor} | {_share(result.prefetch_precision)} | {_share(result.prefetch_recall)} |")
    return lines


def _replay_config(trace: Trace, **knobs: object) -> EngineConfig:
    """``knobs`` over the weights the trace was recorded with (the stored format decides the routing)."""
    recorded = trace.meta["recorded_with"]
    return EngineConfig(weights=recorded.get("weights", "original"), group_size=recorded.get("group_size"), **knobs)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _plot_per_layer(series: dict[str, np.ndarray], baseline: float | None, baseline_label: str | None):
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for label, values in series.items():
        axes.plot(np.arange(len(values)), values, marker="o", label=label)
    if baseline is not None:
        axes.axhline(baseline, color="k", linestyle="--", label=baseline_label)
    axes.set(xlabel="MoE layer", ylabel="share of the layer's experts", ylim=(0, 1))
    axes.legend(fontsize="small")
    return figure
