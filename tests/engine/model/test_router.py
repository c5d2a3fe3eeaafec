"""The router's compiled steps (top-k, the grouped sigmoid router's group choice) against numpy's spelling of them."""

from __future__ import annotations

import numpy as np
import pytest

from engine.model.decoder import _best_groups, _top_k


def reference(choice: np.ndarray, n_group: int, topk_group: int) -> np.ndarray:
    tokens, experts = choice.shape
    groups = choice.reshape(tokens, n_group, experts // n_group)
    group_scores = np.sort(groups, axis=-1)[..., -2:].sum(axis=-1)  # each group's two best
    kept = np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group]
    mask = np.zeros(group_scores.shape, bool)
    np.put_along_axis(mask, kept, True, axis=-1)
    return np.where(np.repeat(mask, experts // n_group, axis=-1), choice, -np.inf)


@pytest.mark.parametrize("ties", [False, True])
def test_best_groups_equal_the_numpy_spelling_bit_for_bit(ties):
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_group, size = int(rng.choice([1, 2, 4, 8])), int(rng.choice([2, 3, 8]))
        topk_group = int(rng.integers(1, n_group + 1))
        choice = rng.random((int(rng.integers(1, 5)), n_group * size)).astype(np.float32)
        if ties:  # equal scores within and across groups: the lower group wins
            choice = np.round(choice * 4) / 4
        got = _best_groups(choice, n_group, topk_group)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, reference(choice, n_group, topk_group))


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_ranks_as_a_stable_argsort(ties):
    rng = np.random.default_rng(1)
    for _ in range(200):
        probs = rng.random((int(rng.integers(1, 5)), int(rng.integers(2, 40)))).astype(np.float32)
        if ties:
            probs = np.round(probs * 3) / 3
        probs[0, 0] = -np.inf  # what the grouped router leaves outside the kept groups
        k = int(rng.integers(1, probs.shape[1] + 1))
        np.testing.assert_array_equal(_top_k(probs, k), np.argsort(-probs, axis=-1, kind="stable")[:, :k])
