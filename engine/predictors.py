"""Expert predictors: which experts of a later MoE layer the current tokens will need, best first.

Each predictor scores every expert of a target layer for every token of the call ([T, E]); ``propose`` turns
scores into one ranked list. They are plain logic over router outputs (no I/O), so the trace simulator can run
them unchanged.

- ``previous_token``: the target layer's router probabilities for the previous token (routing is sticky:
  adjacent tokens share experts 1.3-1.7x more often than chance).
- ``gate_lookahead``: the target layer's router applied to the current layer's input (the residual stream
  changes little from one layer to the next).
- ``coactivation``: learned online, how often expert j of the next MoE layer followed expert i of this one for
  the same token; several layers ahead, the row-normalised counts are chained.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod

import numpy as np

from engine.config import PREDICTORS
from engine.models.layers import softmax


class Predictor(ABC):
    """``moe_layers``: the model's MoE layer indices, ascending; ``num_experts``: E."""

    name: str

    def __init__(self, moe_layers: list[int], num_experts: int) -> None:
        self.moe_layers = moe_layers
        self.num_experts = num_experts

    def observe(self, layer: int, h: np.ndarray, experts: np.ndarray, probs: np.ndarray) -> None:  # noqa: B027
        """Learn from ``layer``'s routing of this call: its input h [T, H], chosen experts [T, k], probs [T, E]."""

    @abstractmethod
    def scores(self, layer: int, h: np.ndarray, experts: np.ndarray, target: int) -> np.ndarray | None:
        """[T, E] scores of ``target``'s experts given ``layer``'s input and choice; None when it cannot tell."""

    def propose(self, layer: int, h: np.ndarray, experts: np.ndarray, target: int, count: int) -> list[int]:
        """The ``count`` best experts of ``target`` for each token, merged into one list, best first."""
        scores = self.scores(layer, h, experts, target)
        if scores is None or count <= 0:
            return []
        count = min(count, scores.shape[1])
        best = np.argsort(-scores, axis=1, kind="stable")[:, :count]  # [T, count]
        # Merge rank by rank, so that every token's first choice comes before any token's second.
        return list(dict.fromkeys(best.T.reshape(-1).tolist()))


class PreviousToken(Predictor):
    name = "previous_token"

    def __init__(self, moe_layers: list[int], num_experts: int) -> None:
        super().__init__(moe_layers, num_experts)
        self._last: dict[int, np.ndarray] = {}  # layer -> the last token's router probabilities [E]

    def observe(self, layer: int, h: np.ndarray, experts: np.ndarray, probs: np.ndarray) -> None:
        self._last[layer] = probs[-1].copy()

    def scores(self, layer: int, h: np.ndarray, experts: np.ndarray, target: int) -> np.ndarray | None:
        last = self._last.get(target)
        return None if last is None else last[None, :]


class GateLookahead(Predictor):
    name = "gate_lookahead"

    def __init__(self, moe_layers: list[int], num_experts: int, routers: dict[int, np.ndarray]) -> None:
        super().__init__(moe_layers, num_experts)
        self.routers = routers  # layer -> [E, H]

    def scores(self, layer: int, h: np.ndarray, experts: np.ndarray, target: int) -> np.ndarray | None:
        return softmax(h @ self.routers[target].T)


class Coactivation(Predictor):
    name = "coactivation"

    def __init__(self, moe_layers: list[int], num_experts: int) -> None:
        super().__init__(moe_layers, num_experts)
        self._next = dict(itertools.pairwise(moe_layers))
        self.counts = {layer: np.zeros((num_experts, num_experts)) for layer in moe_layers[:-1]}
        self._previous: tuple[int, np.ndarray] | None = None  # the last observed layer and its choice

    def observe(self, layer: int, h: np.ndarray, experts: np.ndarray, probs: np.ndarray) -> None:
        if self._previous is not None:
            before, chosen = self._previous
            if self._next.get(before) == layer and len(chosen) == len(experts):
                rows = np.repeat(chosen, experts.shape[1], axis=1).reshape(-1)  # each (i, j) pair of one token
                np.add.at(self.counts[before], (rows, np.tile(experts, chosen.shape[1]).reshape(-1)), 1.0)
        self._previous = (layer, experts.copy())

    def scores(self, layer: int, h: np.ndarray, experts: np.ndarray, target: int) -> np.ndarray | None:
        scores = np.zeros((len(experts), self.num_experts))
        np.put_along_axis(scores, experts, 1.0, axis=1)
        step = layer
        while step != target:
            counts = self.counts[step]
            totals = counts.sum(axis=1, keepdims=True)
            if not totals.any():
                return None
            scores = scores @ np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
            step = self._next[step]
        return scores


def make_predictor(
    name: str, moe_layers: list[int], num_experts: int, routers: dict[int, np.ndarray]
) -> Predictor | None:
    """The predictor called ``name`` (one of PREDICTORS); None for "none"."""
    if name == "none":
        return None
    if name == "previous_token":
        return PreviousToken(moe_layers, num_experts)
    if name == "gate_lookahead":
        return GateLookahead(moe_layers, num_experts, routers)
    if name == "coactivation":
        return Coactivation(moe_layers, num_experts)
    raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}, got {name!r}")
