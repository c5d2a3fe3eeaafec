"""Belady's bound: equal to a brute-force optimum on small sequences, never below any policy."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.analysis.optimal_cache import optimal_hits
from engine.streaming.cache_policy import POLICIES
from tests.engine.expert_cache import ExpertCache

batches_strategy = st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=3), min_size=1, max_size=9)


def brute_force(batches: list[list[int]], capacity: int, counted: list[bool]) -> int:
    """Every choice of what stays after each batch, among the keys resident or just read."""
    best = {frozenset(): 0}
    for batch, scored in zip(batches, counted, strict=True):
        keys = set(batch)
        following: dict[frozenset, int] = {}
        for state, hits in best.items():
            hits += len(keys & state) if scored else 0
            pool = sorted(state | keys)
            for kept in itertools.combinations(pool, min(capacity, len(pool))):
                kept = frozenset(kept)
                following[kept] = max(following.get(kept, -1), hits)
        best = following
    return max(best.values())


def store_hits(policy: str, batches: list[list[int]], capacity: int, counted: list[bool]) -> int:
    """Hits as the expert store scores them: a batch's lookups first, then its misses admitted in order; the
    static policy pins what the first batch looked up (the store's profiling pass)."""
    cache = ExpertCache(policy, "global", capacity, 1, 6)
    total = 0
    for n, (batch, scored) in enumerate(zip(batches, counted, strict=True)):
        keys = list(dict.fromkeys(batch))
        missed = [key for key in keys if not cache.access((0, key))]
        total += (len(keys) - len(missed)) if scored else 0
        for key in missed:
            cache.admit((0, key), 1)
        if n == 0 and policy == "static":
            cache.pin([((0, key), 1) for key in keys])
    return total


@settings(max_examples=1000, deadline=None)
@given(batches_strategy, st.integers(0, 4), st.data())
def test_equals_brute_force(batches, capacity, data) -> None:
    counted = data.draw(st.lists(st.booleans(), min_size=len(batches), max_size=len(batches)))
    assert optimal_hits(batches, capacity, counted) == brute_force(batches, capacity, counted)


@settings(max_examples=1000, deadline=None)
@given(batches_strategy, st.integers(0, 4), st.data())
def test_no_policy_beats_the_bound(batches, capacity, data) -> None:
    counted = data.draw(st.lists(st.booleans(), min_size=len(batches), max_size=len(batches)))
    bound = optimal_hits(batches, capacity, counted)
    for policy in POLICIES:
        assert store_hits(policy, batches, capacity, counted) <= bound, policy


def test_batches_see_the_cache_as_it_was() -> None:
    # capacity 1 holding B: [A, B] hits B, then A may replace it for the next batch: 2 hits, where sequential
    # lookups (A evicts B, or A bypasses) could score only 1
    assert optimal_hits([["B"], ["A", "B"], ["A"]], 1, [False, True, True]) == 2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="capacity"):
        optimal_hits([[1]], -1)
    with pytest.raises(ValueError, match="counted has 1 entries for 2 batches"):
        optimal_hits([[1], [2]], 1, [True])
