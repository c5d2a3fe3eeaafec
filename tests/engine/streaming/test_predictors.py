"""Predictors: what each proposes, against the plain definitions in its docstring."""

from __future__ import annotations

import numpy as np

from engine.streaming.predictors import Coactivation, GateLookahead, PreviousToken, merge_ranks

LAYERS = [1, 2, 4, 5]  # MoE layers; 0 and 3 are dense
E = 8


def test_merge_takes_every_tokens_first_choice_before_any_second() -> None:
    assert merge_ranks(np.array([[3, 1, 2], [3, 5, 1]])).tolist() == [3, 1, 5, 2]
    assert merge_ranks(np.array([[4, 0]])).tolist() == [4, 0]


def test_previous_token_ranks_by_the_last_tokens_probabilities() -> None:
    predictor = PreviousToken(LAYERS, E)
    experts = np.array([[0, 1]])
    assert predictor.propose(1, None, experts, 2, 2) == []  # type: ignore[arg-type]
    probs = np.zeros((2, E))
    probs[0, 7] = 1.0  # an earlier token: ignored
    probs[1, [5, 2, 6]] = [0.5, 0.3, 0.2]
    predictor.observe(2, None, experts, probs)  # type: ignore[arg-type]
    assert predictor.propose(1, None, experts, 2, 3) == [5, 2, 6]  # type: ignore[arg-type]
    assert predictor.propose(1, None, experts, 2, 0) == []  # type: ignore[arg-type]


def test_gate_lookahead_applies_the_target_router_to_the_current_input() -> None:
    router = np.eye(E, 3)  # expert e scores h[e] for e < 3, zero otherwise
    predictor = GateLookahead(LAYERS, E, lambda layer, h: h @ router.T if layer == 2 else None)
    h = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    assert predictor.propose(1, h, np.zeros((2, 2), np.intp), 2, 2) == [1, 0, 2]


def _dense_reference(counts: list[np.ndarray], chosen: np.ndarray, count: int) -> np.ndarray:
    scores = np.zeros((len(chosen), E))
    np.put_along_axis(scores, chosen, 1.0, axis=1)
    for step in counts:
        totals = step.sum(axis=1, keepdims=True)
        scores = scores @ np.divide(step, totals, out=np.zeros_like(step), where=totals > 0)
    return np.argsort(-scores, axis=1, kind="stable")[:, :count]


def test_coactivation_chains_the_row_normalised_follow_counts() -> None:
    rng = np.random.default_rng(0)
    predictor = Coactivation(LAYERS, E)
    assert predictor.propose(1, None, np.array([[0, 1]]), 2, 2) == []  # type: ignore[arg-type]
    seen = [np.zeros((E, E)) for _ in LAYERS[:-1]]
    for _ in range(40):
        tokens = int(rng.integers(1, 4))
        previous = np.empty((0, 2), np.intp)
        for n, layer in enumerate(LAYERS):
            experts = np.stack([rng.choice(E, 2, replace=False) for _ in range(tokens)])
            if n:
                for t in range(tokens):
                    for i in previous[t]:
                        seen[n - 1][i, experts[t]] += 1
            predictor.observe(layer, None, experts, None)  # type: ignore[arg-type]
            previous = experts
    np.testing.assert_array_equal(predictor.counts, np.stack(seen))
    chosen = np.array([[0, 3], [5, 6]])
    for target, steps in ((2, 1), (4, 2), (5, 3)):
        expected = merge_ranks(_dense_reference(seen[:steps], chosen, 3)).tolist()
        assert predictor.propose(1, None, chosen, target, 3) == expected  # type: ignore[arg-type]


def test_coactivation_learns_which_expert_follows() -> None:
    predictor = Coactivation(LAYERS, E)
    for _ in range(3):
        predictor.observe(1, None, np.array([[0, 1]]), None)  # type: ignore[arg-type]
        predictor.observe(2, None, np.array([[6, 7]]), None)  # type: ignore[arg-type]
    predictor.observe(1, None, np.array([[2, 3]]), None)  # type: ignore[arg-type]
    predictor.observe(2, None, np.array([[4, 5]]), None)  # type: ignore[arg-type]
    assert predictor.propose(1, None, np.array([[0, 1]]), 2, 2) == [6, 7]  # type: ignore[arg-type]
    assert predictor.propose(1, None, np.array([[3, 7]]), 2, 2) == [4, 5]  # type: ignore[arg-type]
