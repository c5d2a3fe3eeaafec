"""Expert predictors: which experts of a later MoE layer the current tokens will need, best first.

``propose`` gives, for a call of T tokens, each token's ``count`` best experts of the target layer merged into
one list, rank by rank (every token's first choice before any token's second). They are plain logic over router
outputs (no I/O), and their compiled parts (``merge_ranks``, coactivation's counting and chaining) are what the
trace simulator's replay runs, once per layer for every replayed token.

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


@njit(cache=True)
def merge_ranks(best: np.ndarray) -> np.ndarray:
    """Per-token rankings [T, count] merged rank by rank into one list without repeats."""
    tokens, count = best.shape
    if tokens == 1:  # a ranking has no repeats
        return best[0]
    merged = np.empty(tokens * count, np.int64)
    if count == 0:
        return merged
    seen = np.zeros(best.max() + 1, np.bool_)
    n = 0
    for rank in range(count):
        for t in range(tokens):
            expert = best[t, rank]
            if not seen[expert]:
                seen[expert] = True
                merged[n] = expert
                n += 1
    return merged[:n]


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
        return merge_ranks(np.argsort(-scores, axis=1, kind="stable")[:, :count]).tolist()


class Coactivation(Predictor):
    name = "coactivation"

    def __init__(self, moe_layers: list[int], num_experts: int) -> None:
        super().__init__(moe_layers, num_experts)
        self._position = {layer: n for n, layer in enumerate(moe_layers)}
        # counts[n, i, j]: tokens that chose expert i at MoE layer n and j at layer n + 1; totals: its row sums
        self.counts = np.zeros((max(len(moe_layers) - 1, 0), num_experts, num_experts))
        self.totals = np.zeros(self.counts.shape[:2])
        self._previous: tuple[int, np.ndarray] | None = None  # the last observed MoE position and its choice
        # the scores of the last proposals, see coactivation_propose
        self._chain, self._chained, self._memo = np.empty((0, num_experts)), np.empty((0, 0), np.int64), np.full(2, -1)

    def observe(self, layer: int, h: np.ndarray, experts: np.ndarray, probs: np.ndarray) -> None:
        position = self._position[layer]
        chosen = np.ascontiguousarray(experts, dtype=np.int64)
        if self._previous is not None:
            coactivation_observe(self.counts, self.totals, *self._previous, position, chosen)
        self._previous = (position, chosen)
        self._memo[0] = -1  # the counts changed

    def propose(self, layer: int, h: np.ndarray, experts: np.ndarray, target: int, count: int) -> list[int]:
        chosen = np.ascontiguousarray(experts, dtype=np.int64)
        start, stop = self._position[layer], self._position[target]
        if self._chained.shape != chosen.shape:
            self._chain, self._chained = np.empty((len(chosen), self.num_experts)), np.empty_like(chosen)
            self._memo[0] = -1
        chain, chained, memo = self._chain, self._chained, self._memo
        return coactivation_propose(self.counts, self.totals, chosen, start, stop, count, chain, chained, memo).tolist()


@njit(cache=True)
def coactivation_observe(
    counts: np.ndarray, totals: np.ndarray, before: int, chosen: np.ndarray, position: int, experts: np.ndarray
) -> None:
    """Count the pairs of the choices ``chosen`` at MoE position ``before`` and ``experts`` at ``position``, if
    they are of the same tokens at adjacent positions."""
    if before + 1 == position and len(chosen) == len(experts):
        _count_pairs(counts[before], totals[before], chosen, experts)


@njit(cache=True)
def coactivation_propose(
    counts: np.ndarray,
    totals: np.ndarray,
    chosen: np.ndarray,
    start: int,
    stop: int,
    count: int,
    chain: np.ndarray,
    chained: np.ndarray,
    memo: np.ndarray,
) -> np.ndarray:
    """The ``count`` best experts at MoE position ``stop`` given the choices ``chosen`` [T, k] at ``start``, merged
    over tokens; empty until every position between has been seen.

    Each token's scores are its choice (one-hot) times the row-normalised counts of positions start .. stop - 1.
    They are kept between calls: ``chain`` [T, E] at position ``memo[1]`` from the choices ``chained`` [T, k] at
    position ``memo[0]``, so a layer's proposals for its next targets, asked in increasing order, each go one
    position further. The caller sets ``memo[0] = -1`` when the counts change.
    """
    if count <= 0:
        return np.empty(0, np.int64)
    for n in range(start, stop):
        if not totals[n].any():
            return np.empty(0, np.int64)
    if not (memo[0] == start and memo[1] <= stop and np.array_equal(chained, chosen)):
        chain[:] = 0.0
        for t in range(len(chosen)):
            for i in chosen[t]:
                chain[t, i] = 1.0
        chained[:] = chosen
        memo[0] = memo[1] = start
    following = np.empty(chain.shape[1])
    for n in range(memo[1], stop):
        for t in range(len(chain)):
            following[:] = 0.0
            for i in range(chain.shape[1]):
                if chain[t, i] != 0.0 and totals[n, i] > 0.0:
                    share = chain[t, i] / totals[n, i]
                    for j in range(chain.shape[1]):
                        following[j] += share * counts[n, i, j]
            chain[t] = following
    memo[1] = stop
    return merge_ranks(_best(chain, min(count, chain.shape[1])))


@njit(cache=True)
def _count_pairs(counts: np.ndarray, totals: np.ndarray, chosen: np.ndarray, experts: np.ndarray) -> None:
    for t in range(chosen.shape[0]):
        for i in chosen[t]:
            totals[i] += experts.shape[1]
            for j in experts[t]:
                counts[i, j] += 1.0


@njit(cache=True)
def _best(scores: np.ndarray, count: int) -> np.ndarray:
    """Each row's ``count`` best columns, best first, the lowest id among equals (a stable sort's first ``count``)."""
    tokens, experts = scores.shape
    best = np.empty((tokens, count), np.int64)
    taken = np.empty(experts, np.bool_)
    for t in range(tokens):
        taken[:] = False
        for rank in range(count):
            top = -1
            for j in range(experts):
                if not taken[j] and (top < 0 or scores[t, j] > scores[t, top]):
                    top = j
            best[t, rank] = top
            taken[top] = True
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
