"""The expert ledger against a plain-Python model of the store's bookkeeping (dicts and a deque, as the engine
kept it before the ledger): the same counters, reads in the same order, the same cancellations."""

from __future__ import annotations

import random
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import EngineConfig
from engine.streaming import expert_ledger as ledger
from engine.streaming.predictors import new_predictor
from tests.engine.expert_cache import ExpertCache, Key

LAYERS, EXPERTS, TOP_K, ENTRY = 4, 6, 2, 10
MOE_LAYERS = [1, 2, 3]  # layer 0 is dense
CHOICE = st.lists(st.integers(0, EXPERTS - 1), min_size=1, max_size=4, unique=True).map(sorted)
LAYER_STEP = st.tuples(
    CHOICE,  # the layer's experts
    st.lists(st.permutations(range(EXPERTS)), min_size=3, max_size=3),  # each later layer's ranking
    st.integers(0, 2**32),  # seeds the order the experts are taken in
)
NO_LOOKAHEAD = np.empty((0, 0, 0), np.int64)
PASSES = st.lists(st.lists(LAYER_STEP, min_size=3, max_size=3), min_size=1, max_size=6)


class ReferenceStore:
    """What the store decided, written as plainly as possible; ``reads`` logs every read in issue order."""

    def __init__(self, config: EngineConfig) -> None:
        policy = config.cache_policy if config.cache_bytes else "none"
        self.cache = ExpertCache(policy, config.cache_scope, config.cache_bytes, LAYERS, EXPERTS)
        self.limit = config.prefetch_depth * (TOP_K + config.prefetch_extra)
        depth = config.prefetch_depth
        self.ahead = {layer: MOE_LAYERS[n + 1 : n + 1 + depth] for n, layer in enumerate(MOE_LAYERS)}
        self.counters = dict.fromkeys(ledger.COUNTERS, 0)
        self.staged: dict[Key, None] = {}
        self.current: dict[int, str | None] = {}
        self.waiting: deque[int] = deque()
        self.reading: set[int] = set()
        self.layer = -1
        self.reads: list[Key] = []
        self.cancelled: list[Key] = []

    def request(self, layer: int, experts: list[int]) -> None:
        for key in [key for key in self.staged if key[0] < layer or (key[0] == layer and key[1] not in experts)]:
            del self.staged[key]
            self.cancelled.append(key)
            self.counters["prefetch_wasted"] += 1
        self.layer = layer
        self.current.clear()
        self.waiting.clear()
        hits = 0
        for expert in experts:
            key = (layer, expert)
            if self.cache.access(key):
                hits += 1
                self.current[expert] = "cached"
            elif key in self.staged:
                del self.staged[key]
                self.counters["prefetch_used"] += 1
                self.current[expert] = "staged"
            else:
                self.waiting.append(expert)
                self.current[expert] = None
        self.reading.clear()
        self._read_ahead()
        for name, value in (("hits", hits), ("misses", len(experts) - hits), ("experts_loaded", len(experts) - hits)):
            self.counters[name] += value

    def stage(self, target: int, proposals: list[int]) -> bool:
        for expert in proposals:
            if len(self.staged) >= self.limit:
                return True
            key = (target, expert)
            if key in self.staged or key in self.cache:
                continue
            self.staged[key] = None
            self.reads.append(key)
            self.counters["prefetch_issued"] += 1
        return False

    def get(self, expert: int) -> None:
        was = self.current.pop(expert)
        if was == "cached":
            return
        if was is None:
            self.waiting.remove(expert)
            self.reads.append((self.layer, expert))
        self.reading.discard(expert)
        self._read_ahead()
        self.cache.admit((self.layer, expert), ENTRY)

    def _read_ahead(self) -> None:
        while self.waiting and len(self.reading) < TOP_K:
            expert = self.waiting.popleft()
            self.current[expert] = "reading"
            self.reading.add(expert)
            self.reads.append((self.layer, expert))


def replay(config: EngineConfig, passes: list) -> tuple[dict, list[Key], list[Key], list[Key]]:
    """The ledger driven as the store drives it: counters, reads in issue order, cancellations, staged keys."""
    state = ledger.new_ledger(config, LAYERS, EXPERTS, MOE_LAYERS, ENTRY, TOP_K)
    predictor = new_predictor(config.predictor, len(MOE_LAYERS), EXPERTS, TOP_K)
    calls = ledger.Ledger(state, predictor)
    routing = np.zeros((1, TOP_K), np.int64)  # gate_lookahead reads only the rankings
    reads: list[Key] = []
    cancelled: list[Key] = []
    for steps in passes:
        calls.begin_forward()
        for layer, (experts, proposals, order) in zip(MOE_LAYERS, steps, strict=True):
            n_cancelled, starts = calls.request(layer, np.array(experts, np.int64))
            cancelled += [divmod(key, EXPERTS) for key in state.cancelled[:n_cancelled].tolist()]
            reads += [(layer, expert) for expert in state.out[:starts].tolist()]
            lookahead = np.array(proposals, np.int64)[None]  # [1 token, D, E]
            staged = calls.route_done(predictor, layer, routing, np.empty(0, np.int64), lookahead)
            reads += [divmod(key, EXPERTS) for key in state.out[:staged].tolist()]
            taken = [expert for expert in experts if state.current[expert] != ledger.CACHED]
            for expert in random.Random(order).sample(taken, len(taken)):
                was, starts = calls.take(layer, expert)
                if was == ledger.WAITING:
                    reads.append((layer, expert))
                reads += [(layer, started) for started in state.out[:starts].tolist()]
                calls.admit(layer, expert)
    staged = [divmod(key, EXPERTS) for key in state.staged[: state.staged_count[0]].tolist()]
    return dict(zip(ledger.COUNTERS, state.counters.tolist(), strict=True)), reads, cancelled, staged


def reference(config: EngineConfig, passes: list) -> tuple[dict, list[Key], list[Key], list[Key]]:
    store = ReferenceStore(config)
    for steps in passes:
        for layer, (experts, proposals, order) in zip(MOE_LAYERS, steps, strict=True):
            store.request(layer, experts)
            for target, proposed in zip(store.ahead[layer], proposals, strict=False):
                if store.stage(target, proposed[: TOP_K + config.prefetch_extra]):
                    break
            taken = [expert for expert in experts if store.current[expert] != "cached"]
            for expert in random.Random(order).sample(taken, len(taken)):
                store.get(expert)
    counters = {**store.counters, "prefetch_timely": 0}  # timeliness is the caller's to count
    return counters, store.reads, store.cancelled, list(store.staged)


@pytest.mark.parametrize("policy", ["lru", "lfu", "slru", "none"])
@settings(max_examples=150, deadline=None)
@given(
    scope=st.sampled_from(("global", "per_layer")),
    slots=st.integers(0, 12),
    depth=st.integers(1, 2),
    extra=st.integers(0, 2),
    passes=PASSES,
)
def test_matches_the_plain_bookkeeping(policy: str, scope: str, slots: int, depth: int, extra: int, passes) -> None:
    config = EngineConfig(
        cache_policy=policy,
        cache_bytes=slots * ENTRY,
        cache_scope=scope,
        predictor="gate_lookahead",
        prefetch_depth=depth,
        prefetch_extra=extra,
    )
    assert replay(config, passes) == reference(config, passes)


def test_static_pins_the_first_pass_most_used_experts_before_the_second() -> None:
    config = EngineConfig(cache_policy="static", cache_bytes=2 * ENTRY)
    state = ledger.new_ledger(config, LAYERS, EXPERTS, MOE_LAYERS, ENTRY, TOP_K)
    predictor = new_predictor(config.predictor, len(MOE_LAYERS), EXPERTS, TOP_K)
    calls = ledger.Ledger(state, predictor)

    def routed(layer: int, experts: list[list[int]]) -> None:
        calls.route_done(predictor, layer, np.array(experts, np.int64), np.empty(0, np.int64), NO_LOOKAHEAD)

    assert calls.begin_forward() == 0
    routed(1, [[4, 5], [4, 0]])
    routed(2, [[3, 5], [1, 0]])
    assert calls.begin_forward() == 2
    assert sorted(divmod(key, EXPERTS) for key in state.out[:2].tolist()) == [(1, 0), (1, 4)]  # (1, 4) twice
    routed(1, [[2, 3]])  # the profile is over
    assert calls.begin_forward() == 0
    assert state.profile.sum() == 8


def test_taking_an_expert_not_requested_or_twice_is_refused() -> None:
    state = ledger.new_ledger(EngineConfig(), LAYERS, EXPERTS, MOE_LAYERS, ENTRY, TOP_K)
    calls = ledger.Ledger(state, new_predictor("none", len(MOE_LAYERS), EXPERTS, TOP_K))
    calls.request(1, np.array([0, 3], np.int64))
    assert calls.take(1, 5)[0] == ledger.ABSENT
    assert calls.take(2, 0)[0] == ledger.ABSENT
    assert calls.take(1, 3)[0] == ledger.READING
    assert calls.take(1, 3)[0] == ledger.ABSENT
