"""Predictors: what each proposes, against the plain definitions in its docstring."""

from __future__ import annotations

import numpy as np

from engine.streaming.predictors import fit, merge_ranks, new_predictor, observe, propose

LAYERS = 4  # MoE layers
E, K = 8, 2
NOTHING = np.empty(0, np.int64)
NO_LOOKAHEAD = np.empty((0, 0, 0), np.int64)


def test_merge_takes_every_tokens_first_choice_before_any_second() -> None:
    assert merge_ranks(np.array([[3, 1, 2], [3, 5, 1]])).tolist() == [3, 1, 5, 2]
    assert merge_ranks(np.array([[4, 0]])).tolist() == [4, 0]


def test_previous_token_ranks_by_the_last_tokens_probabilities() -> None:
    p = new_predictor("previous_token", LAYERS, E, K)
    experts = np.array([[0, 1]])
    assert propose(p, 0, 0, experts, NO_LOOKAHEAD, 2).tolist() == []  # layer 1 not seen yet
    observe(p, 1, experts, np.array([5, 2, 6, 0, 1, 3, 4, 7]))
    assert propose(p, 0, 0, experts, NO_LOOKAHEAD, 3).tolist() == [5, 2, 6]
    assert propose(p, 0, 0, experts, NO_LOOKAHEAD, 0).tolist() == []
    assert propose(p, 0, 1, experts, NO_LOOKAHEAD, 3).tolist() == []  # layer 2 not seen yet


def test_gate_lookahead_merges_the_later_routers_rankings() -> None:
    p = new_predictor("gate_lookahead", LAYERS, E, K)
    lookahead = np.array([[[1, 2, 0], [7, 6, 5]], [[0, 1, 2], [6, 7, 5]]])  # [T, D, R]
    experts = np.zeros((2, K), np.int64)
    assert propose(p, 0, 0, experts, lookahead, 2).tolist() == [1, 0, 2]
    assert propose(p, 0, 1, experts, lookahead, 3).tolist() == [7, 6, 5]


def test_no_predictor_proposes_nothing() -> None:
    p = new_predictor("none", LAYERS, E, K)
    assert propose(p, 0, 0, np.array([[0, 1]]), np.zeros((1, 1, 3), np.int64), 3).tolist() == []


def _dense_reference(counts: list[np.ndarray], chosen: np.ndarray, count: int) -> np.ndarray:
    scores = np.zeros((len(chosen), E))
    np.put_along_axis(scores, chosen, 1.0, axis=1)
    for step in counts:
        totals = step.sum(axis=1, keepdims=True)
        scores = scores @ np.divide(step, totals, out=np.zeros_like(step), where=totals > 0)
    best = -np.sort(-scores, axis=1)[:, : count + 1]
    assert (-np.diff(best, axis=1) > 1e-9).all(), "near-ties: the ranking would be float noise"  # smallest: 8e-5
    return np.argsort(-scores, axis=1, kind="stable")[:, :count]


def test_coactivation_chains_the_row_normalised_follow_counts() -> None:
    rng = np.random.default_rng(0)
    p = new_predictor("coactivation", LAYERS, E, K)
    assert propose(fit(p, 1, K), 0, 0, np.array([[0, 1]]), NO_LOOKAHEAD, 2).tolist() == []
    seen = [np.zeros((E, E)) for _ in range(LAYERS - 1)]
    for _ in range(40):
        tokens = int(rng.integers(1, 4))
        p = fit(p, tokens, K)  # room for the call's tokens, the counts kept
        previous = np.empty((0, K), np.intp)
        for position in range(LAYERS):
            experts = np.stack([rng.choice(E, K, replace=False) for _ in range(tokens)])
            if position:
                for t in range(tokens):
                    for i in previous[t]:
                        seen[position - 1][i, experts[t]] += 1
            observe(p, position, experts, NOTHING)
            previous = experts
    np.testing.assert_array_equal(p.counts, np.stack(seen))
    chosen = np.array([[0, 3], [5, 6]])
    for ahead in range(3):
        expected = merge_ranks(_dense_reference(seen[: ahead + 1], chosen, 3)).tolist()
        assert propose(p, 0, ahead, chosen, NO_LOOKAHEAD, 3).tolist() == expected


def test_coactivation_learns_which_expert_follows() -> None:
    p = new_predictor("coactivation", LAYERS, E, K)
    for _ in range(3):
        observe(p, 0, np.array([[0, 1]]), NOTHING)
        observe(p, 1, np.array([[6, 7]]), NOTHING)
    observe(p, 0, np.array([[2, 3]]), NOTHING)
    observe(p, 1, np.array([[4, 5]]), NOTHING)
    assert propose(p, 0, 0, np.array([[0, 1]]), NO_LOOKAHEAD, 2).tolist() == [6, 7]
    assert propose(p, 0, 0, np.array([[3, 7]]), NO_LOOKAHEAD, 2).tolist() == [4, 5]
