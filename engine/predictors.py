"""Expert predictors: which experts of a later MoE layer the current tokens will need, best first.

``propose`` gives, for a call of T tokens, each token's ``count`` best experts of the target layer merged into
one list, rank by rank (every token's first choice before any token's second). They are plain logic over router
outputs (no I/O), so the trace simulator runs them unchanged, and cheap per call, since it calls them once per
layer for every replayed token.

- ``previous_token``: the target layer's experts ranked by the previous token's router probabilities (routing
  is sticky: adjacent tokens share experts 1.3-1.7x more often than chance).
- ``gate_lookahead``: the target layer's router applied to the current layer's input (the residual stream
  changes little from one layer to the next).
- ``coactivation``: learned online, how often expert j of the next MoE layer followed expert i of this one for
  the same token; several layers ahead, the row-normalised counts are chained.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
from numba import njit

from engine.config import PREDICTORS


class Predictor(ABC):
    """``moe_layers``: the model's MoE layer indices, ascending; ``num_experts``: E."""

    name: str

    def __init__(self, moe_layers: list[int], num_experts: int) -> None:
        self.moe_layers = moe_layers
        self.num_experts = num_experts

    def observe(self, layer: int, h: np.ndarray, experts: np.ndarray, probs: np.ndarray) -> None:  # noqa: B027
        """Learn from ``layer``'s routing of this call: its input h [T, H], chosen experts [T, k], probs [T, E]."""

    @abstractmethod
    def propose(self, layer: int, h: np.ndarray, experts: np.ndarray, target: int, count: int) -> list[int]:
        """The ``count`` best experts of ``target`` for each token, merged into one list, best first; empty when
        the predictor cannot tell yet."""


def merge_ranks(best: np.ndarray) -> list[int]:
    """Per-token rankings [T, count] merged rank by rank into one list without repeats."""
    if best.shape[0] == 1:
        return best[0].tolist()
    return list(dict.fromkeys(best.T.reshape(-1).tolist()))


class PreviousToken(Predictor):
    name = "previous_token"

    def __init__(self, moe_layers: list[int], num_experts: int) -> None:
        super().__init__(moe_layers, num_experts)
        self._ranked: dict[int, list[int]] = {}  # layer -> its experts by the last token's probability, best first

    def observe(self, layer: int, h: np.ndarray, experts: np.ndarray, probs: np.ndarray) -> None:
        self._ranked[layer] = np.argsort(-probs[-1], kind="stable").tolist()

    def propose(self, layer: int, h: np.ndarray, experts: np.ndarray, target: int, count: int) -> list[int]:
        ranked = self._ranked.get(target)
        return [] if ranked is None or count <= 0 else ranked[:count]


RouterScores = Callable[[int, np.ndarray], np.ndarray]  # (layer, inputs [T, H]) -> that router's scores [T, E]


class GateLookahead(Predictor):
    name = "gate_lookahead"

    def __init__(self, moe_layers: list[int], num_experts: int, router_scores: RouterScores) -> None:
        super().__init__(moe_layers, num_experts)
        self.router_scores = router_scores  # the decoder's own ranking of a layer's experts

    def propose(self, layer: int, h: np.ndarray, experts: np.ndarray, target: int, count: int) -> list[int]:
        if count <= 0:
            return []
        scores = self.router_scores(target, h)
        return merge_ranks(np.argsort(-scores, axis=1, kind="stable")[:, :count])


class Coactivation(Predictor):
    name = "coactivation"

    def __init__(self, moe_layers: list[int], num_experts: int) -> None:
        super().__init__(moe_layers, num_experts)
        self._position = {layer: n for n, layer in enumerate(moe_layers)}
        # counts[n, i, j]: tokens that chose expert i at MoE layer n and j at layer n + 1; totals: its row sums
        self.counts = np.zeros((max(len(moe_layers) - 1, 0), num_experts, num_experts))
        self.totals = np.zeros(self.counts.shape[:2])
        self._previous: tuple[int, np.ndarray] | None = None  # the last observed MoE position and its choice

    def observe(self, layer: int, h: np.ndarray, experts: np.ndarray, probs: np.ndarray) -> None:
        position = self._position[layer]
        if self._previous is not None:
            before, chosen = self._previous
            if before + 1 == position and len(chosen) == len(experts):
                _count_pairs(self.counts[before], self.totals[before], chosen, experts)
        self._previous = (position, np.ascontiguousarray(experts, dtype=np.intp))

    def propose(self, layer: int, h: np.ndarray, experts: np.ndarray, target: int, count: int) -> list[int]:
        start, stop = self._position[layer], self._position[target]
        if count <= 0 or not self.totals[start:stop].any(axis=1).all():
            return []
        chosen = np.ascontiguousarray(experts, dtype=np.intp)
        return merge_ranks(_chained_best(self.counts, self.totals, chosen, start, stop, min(count, self.num_experts)))


@njit(cache=True)
def _count_pairs(counts: np.ndarray, totals: np.ndarray, chosen: np.ndarray, experts: np.ndarray) -> None:
    for t in range(chosen.shape[0]):
        for i in chosen[t]:
            totals[i] += experts.shape[1]
            for j in experts[t]:
                counts[i, j] += 1.0


@njit(cache=True)
def _chained_best(
    counts: np.ndarray, totals: np.ndarray, chosen: np.ndarray, start: int, stop: int, count: int
) -> np.ndarray:
    """Each token's ``count`` best experts at MoE position ``stop``: its choice at ``start`` (one-hot) times the
    row-normalised counts of positions start .. stop - 1, ranked (stable: ties by expert id)."""
    tokens, experts = chosen.shape[0], counts.shape[1]
    best = np.empty((tokens, count), np.intp)
    for t in range(tokens):
        scores = np.zeros(experts)
        for i in chosen[t]:
            scores[i] = 1.0
        for n in range(start, stop):
            following = np.zeros(experts)
            for i in range(experts):
                if scores[i] != 0.0 and totals[n, i] > 0.0:
                    share = scores[i] / totals[n, i]
                    for j in range(experts):
                        following[j] += share * counts[n, i, j]
            scores = following
        best[t] = np.argsort(-scores, kind="mergesort")[:count]
    return best


def make_predictor(name: str, moe_layers: list[int], num_experts: int, router_scores: RouterScores) -> Predictor | None:
    """The predictor called ``name`` (one of PREDICTORS); None for "none"."""
    if name == "none":
        return None
    if name == "previous_token":
        return PreviousToken(moe_layers, num_experts)
    if name == "gate_lookahead":
        return GateLookahead(moe_layers, num_experts, router_scores)
    if name == "coactivation":
        return Coactivation(moe_layers, num_experts)
    raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}, got {name!r}")
