"""Expert predictors: which experts of a later MoE layer the current tokens will need, best first.

One compiled implementation serves the engine and the trace simulator: ``expert_ledger.route_done`` calls
``observe`` and ``propose`` with the routing the decoder computed, or, in the simulator's replay, with the routing
the trace recorded. Per MoE layer of a call of T tokens a predictor sees the layer's position among the MoE layers,
its chosen experts [T, k], its last token's experts ranked by router probability, and the later layers' routers'
rankings of the layer's input (``lookahead`` [T, D, R], which the decoder computes only for ``gate_lookahead``).
``propose`` gives each token's ``count`` best experts of a later layer merged into one list, rank by rank (every
token's first choice before any token's second).

- ``previous_token``: the target layer's experts ranked by the previous token's router probabilities (routing
  is sticky: adjacent tokens share experts 1.3-1.7x more often than chance).
- ``gate_lookahead``: the target layer's router applied to the current layer's input (the residual stream
  changes little from one layer to the next).
- ``coactivation``: learned online, how often expert j of the next MoE layer followed expert i of this one for
  the same token; several layers ahead, the row-normalised counts are chained.

Adding a predictor touches this module only: its name in PREDICTORS, its state in PredictorState, its branches in
``observe`` and ``propose`` (and the trace recorder, if it needs an input a trace does not hold).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

PREDICTORS = ("none", "previous_token", "gate_lookahead", "coactivation")
NO_PREDICTOR, PREVIOUS_TOKEN, GATE_LOOKAHEAD, COACTIVATION = range(len(PREDICTORS))  # a predictor's index
# what a replayed trace must hold for each: rankings of at least top_k + prefetch_extra experts per layer, and
# the later routers' rankings (``lookahead``) for prefetch_depth layers
READS_RANKINGS = frozenset({"previous_token", "gate_lookahead"})
READS_LOOKAHEAD = frozenset({"gate_lookahead"})


class PredictorState(NamedTuple):
    """A predictor's state over a model's L MoE layers of E experts; token buffers hold ``capacity`` tokens."""

    kind: int  # NO_PREDICTOR ... COACTIVATION
    ranked: np.ndarray  # int64 [L, E]: previous_token: each layer's experts by its last token's probability
    ranked_count: np.ndarray  # int64 [L]: how many of ``ranked`` are known (0: the layer was not seen yet)
    counts: np.ndarray  # float64 [L - 1, E, E]: coactivation: tokens that chose i at layer n and j at n + 1
    totals: np.ndarray  # float64 [L - 1, E]: the row sums of ``counts``
    previous: np.ndarray  # int64 [capacity, k]: coactivation: the last observed layer's choice
    previous_position: np.ndarray  # int64 [1]: that layer's position (-2: none yet)
    previous_tokens: np.ndarray  # int64 [1]: its tokens, the first rows of ``previous``
    chain: np.ndarray  # float64 [capacity, E]: the scores of coactivation's last proposals, see coactivation_propose
    chained: np.ndarray  # int64 [capacity, k]
    memo: np.ndarray  # int64 [2]


def new_predictor(name: str, layers: int, num_experts: int, top_k: int, capacity: int = 1) -> PredictorState:
    """The state of the predictor called ``name`` (one of PREDICTORS) for ``layers`` MoE layers, ``top_k``
    experts per token, calls of up to ``capacity`` tokens (``fit`` makes room for more)."""
    if name not in PREDICTORS:
        raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}, got {name!r}")
    kind = PREDICTORS.index(name)
    learns = kind == COACTIVATION
    pairs = max(layers - 1, 0) if learns else 0
    tokens = capacity if learns else 0
    return PredictorState(
        kind,
        np.zeros((layers, num_experts) if kind == PREVIOUS_TOKEN else (0, 0), np.int64),
        np.zeros(layers, np.int64),
        np.zeros((pairs, num_experts, num_experts)),
        np.zeros((pairs, num_experts)),
        np.zeros((tokens, top_k), np.int64),
        np.full(1, -2, np.int64),
        np.zeros(1, np.int64),
        np.zeros((tokens, num_experts)),
        np.zeros((tokens, top_k), np.int64),
        np.full(2, -1, np.int64),
    )


def fit(p: PredictorState, tokens: int, top_k: int) -> PredictorState:
    """``p``, or a copy of it with token buffers for calls of ``tokens`` tokens choosing ``top_k`` experts each."""
    if p.kind != COACTIVATION or (len(p.previous) >= tokens and p.previous.shape[1] == top_k):
        return p
    previous = np.zeros((tokens, top_k), np.int64)
    if p.previous.shape[1] == top_k:
        previous[: len(p.previous)] = p.previous
    else:  # another k: the last choice cannot pair with the next
        p.previous_position[0] = -2
    p.memo[0] = -1
    return p._replace(
        previous=previous, chain=np.zeros((tokens, p.chain.shape[1])), chained=np.zeros((tokens, top_k), np.int64)
    )


@njit(cache=True, inline="always")
def observe(p: PredictorState, position: int, experts: np.ndarray, last_ranked: np.ndarray) -> None:
    """Learn from the routing of the MoE layer at ``position``: its choice [T, k] and its last token's experts
    ranked by probability (previous_token's input, ignored by the others)."""
    if p.kind == PREVIOUS_TOKEN:
        p.ranked[position, : len(last_ranked)] = last_ranked
        p.ranked_count[position] = len(last_ranked)
    elif p.kind == COACTIVATION:
        tokens = experts.shape[0]
        before = p.previous[: p.previous_tokens[0]]
        coactivation_observe(p.counts, p.totals, p.previous_position[0], before, position, experts)
        p.previous[:tokens] = experts
        p.previous_position[0], p.previous_tokens[0] = position, tokens
        p.memo[0] = -1  # the counts changed


@njit(cache=True, inline="always")
def propose(
    p: PredictorState, position: int, ahead: int, experts: np.ndarray, lookahead: np.ndarray, count: int
) -> np.ndarray:
    """The ``count`` best experts of the MoE layer ``ahead + 1`` positions after ``position`` for the tokens that
    chose ``experts`` [T, k] there, merged, best first; empty when the predictor cannot tell yet. ``lookahead``
    [T, D, R]: each later layer's router's ranking of the current input (gate_lookahead's input)."""
    target = position + 1 + ahead
    if count <= 0 or p.kind == NO_PREDICTOR:
        return np.empty(0, np.int64)
    if p.kind == PREVIOUS_TOKEN:
        return p.ranked[target, : min(count, p.ranked_count[target])]
    if p.kind == GATE_LOOKAHEAD:
        return merge_ranks(lookahead[:, ahead, :count])
    tokens = experts.shape[0]
    return coactivation_propose(
        p.counts, p.totals, experts, position, target, count, p.chain[:tokens], p.chained[:tokens], p.memo
    )


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
