"""Routing statistics that decide how well caching and prefetching can work, measured like the published ones.

Calibration targets (``../shared/REFERENCE.md``, from Mixtral's paper and real routing traces):
adjacent-token reuse 1.3-1.7x the random rate, the busiest expert's share 1.3-2x uniform, a per-layer LRU
hit rate 3-10 points above random with 25% and 50% of experts cached, and the next layer's router applied
to the current hidden state predicting 50-95% of the next layer's experts.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from engine.bench.workloads import Workload
from engine.model.decoder import Decoder, Routing
from engine.model.load import Model

REFERENCE_RANGES = {
    "adjacent_reuse_ratio": (1.3, 1.7),
    "busiest_share_ratio": (1.3, 2.0),
    "lru_gain_points_25": (3.0, 10.0),
    "lru_gain_points_50": (3.0, 10.0),
    "lookahead_accuracy": (0.5, 0.95),
}


class RoutingRecorder:
    """Records, while attached to a decoder, each MoE layer's experts and the previous MoE layer's guess of them.

    The guess is the layer's router applied to the previous MoE layer's input (``gate_lookahead``).
    """

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.moe_layers = decoder.spec.moe_layers
        self.next_moe = dict(zip(self.moe_layers, self.moe_layers[1:], strict=False))
        self.experts: dict[int, list[np.ndarray]] = {i: [] for i in self.moe_layers}  # [T, k] per call
        self.guesses: dict[int, list[np.ndarray]] = {i: [] for i in self.moe_layers[1:]}

    def __enter__(self) -> RoutingRecorder:
        self.decoder.route_observer = self.observe
        return self

    def __exit__(self, *exc: object) -> None:
        self.decoder.route_observer = None

    def observe(self, layer: int, h: np.ndarray, routing: Routing) -> None:
        self.experts[layer].append(routing.experts)
        nxt = self.next_moe.get(layer)
        if nxt is not None:
            self.guesses[nxt].append(self.decoder.route(nxt, h).experts)

    def routing(self) -> dict[int, np.ndarray]:
        """Per MoE layer, the experts [tokens, k] of every token seen, in order."""
        return {i: np.concatenate(calls) for i, calls in self.experts.items() if calls}

    def stats(self, num_experts: int) -> RoutingStats:
        guesses = {i: np.concatenate(g) for i, g in self.guesses.items() if g}
        return routing_stats(self.routing(), guesses, num_experts)


@dataclass(frozen=True)
class RoutingStats:
    """Means over MoE layers, with the (min, max) over layers beside each."""

    tokens: int
    adjacent_reuse_ratio: float  # share of a token's experts the previous token also used, over k / E
    busiest_share_ratio: float  # the busiest expert's share of all selections, over 1 / E
    lru_gain_points_25: float  # LRU hit rate minus 0.25, in points, with a quarter of a layer's experts cached
    lru_gain_points_50: float
    lookahead_accuracy: float | None  # share of a layer's experts its router picks from the previous layer's input
    ranges: dict[str, tuple[float, float]]

    def to_dict(self) -> dict:
        return asdict(self)

    def outside_reference(self) -> dict[str, float]:
        """The statistics outside REFERENCE_RANGES, with their values."""
        values = asdict(self)
        return {
            name: values[name]
            for name, (low, high) in REFERENCE_RANGES.items()
            if values[name] is not None and not low <= values[name] <= high
        }


def routing_stats(routing: dict[int, np.ndarray], guesses: dict[int, np.ndarray], num_experts: int) -> RoutingStats:
    per_layer: dict[str, list[float]] = {name: [] for name in REFERENCE_RANGES}
    tokens = 0
    for layer, experts in routing.items():
        tokens, k = experts.shape
        per_layer["adjacent_reuse_ratio"].append(adjacent_reuse(experts) / (k / num_experts))
        per_layer["busiest_share_ratio"].append(
            np.bincount(experts.ravel(), minlength=num_experts).max() / experts.size * num_experts
        )
        for frac, name in ((0.25, "lru_gain_points_25"), (0.5, "lru_gain_points_50")):
            per_layer[name].append(100 * (lru_hit_rate(experts, round(frac * num_experts)) - frac))
        if layer in guesses:
            per_layer["lookahead_accuracy"].append(overlap(guesses[layer], experts))
    means = {name: float(np.mean(v)) if v else None for name, v in per_layer.items()}
    ranges = {name: (float(min(v)), float(max(v))) for name, v in per_layer.items() if v}
    return RoutingStats(tokens=tokens, **means, ranges=ranges)  # type: ignore[arg-type]


def adjacent_reuse(experts: np.ndarray) -> float:
    """Mean share of token t's experts that token t-1 also used (experts [T, k])."""
    return overlap(experts[1:], experts[:-1])


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of |a_t ∩ b_t| / k."""
    shared = (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)
    return float(shared.mean() / a.shape[1])


def lru_hit_rate(experts: np.ndarray, capacity: int) -> float:
    """Hit rate of one layer's LRU cache holding ``capacity`` experts; a token's k experts are looked up together."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for row in experts.tolist():
        hits += sum(e in cache for e in row)
        for e in row:
            cache[e] = None
            cache.move_to_end(e)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits / experts.size


def measure(model: Model, workload: Workload) -> tuple[RoutingStats, np.ndarray]:
    """Routing statistics of ``model`` over a workload's tokens (a generate workload's generated ones too), and
    the next-token logits [T, V] at those tokens, teacher-forced."""
    from engine.model.generate import generate, score

    tokens = workload.tokens(model)
    with RoutingRecorder(model.decoder) as recorder:
        if workload.kind == "score":
            logits = score(model, tokens)
        else:
            tokens += generate(model, tokens, workload.new_tokens, workload.sampler(model), stop_at_eos=False).tokens
    stats = recorder.stats(model.decoder.spec.num_experts)
    return stats, logits if workload.kind == "score" else score(model, tokens)


def format_table(stats: RoutingStats) -> str:
    """Markdown: each statistic, its range over layers, and the range real models show."""
    values = stats.to_dict()
    lines = ["| statistic | mean over layers | min-max over layers | real models |", "|---|---|---|---|"]
    for name, (low, high) in REFERENCE_RANGES.items():
        if values[name] is None:
            continue
        layer_low, layer_high = stats.ranges[name]
        lines.append(f"| {name} | {values[name]:.3f} | {layer_low:.3f}-{layer_high:.3f} | {low:g}-{high:g} |")
    return "\n".join(lines)
