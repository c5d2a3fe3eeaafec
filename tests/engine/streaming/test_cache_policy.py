"""Cache policies: byte accounting under any operations, agreement with list-based models, each policy's behaviour,
the njit functions called directly, and numba's on-disk cache."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from fractions import Fraction
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from engine.streaming.cache_policy import (
    HORIZON,
    POLICIES,
    SCOPES,
    CacheState,
    cache_access,
    cache_admit,
    cache_contains,
    cache_discard,
    cache_keys,
    cache_pin,
    cache_visit,
    new_cache_state,
    rank_keys,
)
from tests.engine.expert_cache import ExpertCache, Key

NUM_LAYERS = 3
NUM_EXPERTS = 6
KEYS = [(layer, expert) for layer in range(NUM_LAYERS) for expert in range(NUM_EXPERTS)]
KEY = st.sampled_from(KEYS)
FRACTION = st.sampled_from((0.0, 0.3, 0.5, 0.8, 1.0))
SETTINGS = settings(max_examples=200, deadline=None)


def make_policy(policy: str, capacity: int, **kw: Any) -> ExpertCache:
    """One policy over the whole budget, with room for the behaviour tests' keys."""
    return ExpertCache(policy, "global", capacity, NUM_LAYERS, 100, **kw)


class RefLRU:
    """Resident keys in a list, least recent first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.order: list[Key] = []
        self.size: dict[Key, int] = {}

    def used(self) -> int:
        return sum(self.size[key] for key in self.order)

    def access(self, key: Key) -> bool:
        if key not in self.order:
            return False
        self.order.remove(key)
        self.order.append(key)
        return True

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        if key in self.order or nbytes > self.capacity:
            return []
        evicted = []
        while self.used() + nbytes > self.capacity:
            evicted.append(self.order.pop(0))
        self.order.append(key)
        self.size[key] = nbytes
        return evicted

    def discard(self, key: Key) -> None:
        if key in self.order:
            self.order.remove(key)

    def keys(self) -> list[Key]:
        return list(self.order)


class RefLFU:
    """Resident [key, size, uses, time of last use] in a list; the victim has the smallest (uses, time)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: list[list[Any]] = []
        self.clock = 0

    def find(self, key: Key) -> list[Any] | None:
        return next((entry for entry in self.entries if entry[0] == key), None)

    def used(self) -> int:
        return sum(entry[1] for entry in self.entries)

    def access(self, key: Key) -> bool:
        entry = self.find(key)
        if entry is None:
            return False
        self.clock += 1
        entry[2] += 1
        entry[3] = self.clock
        return True

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        if self.find(key) is not None or nbytes > self.capacity:
            return []
        evicted = []
        while self.used() + nbytes > self.capacity:
            victim = min(self.entries, key=lambda entry: (entry[2], entry[3]))
            self.entries.remove(victim)
            evicted.append(victim[0])
        self.clock += 1
        self.entries.append([key, nbytes, 1, self.clock])
        return evicted

    def discard(self, key: Key) -> None:
        self.entries = [entry for entry in self.entries if entry[0] != key]

    def keys(self) -> list[Key]:
        return [entry[0] for entry in sorted(self.entries, key=lambda entry: (entry[2], entry[3]))]


class RefSLRU:
    """Two lists, least recent first: probationary and protected."""

    def __init__(self, capacity: int, protected_fraction: float = 0.8) -> None:
        self.capacity = capacity
        self.protected_capacity = int(capacity * protected_fraction)
        self.probation: list[Key] = []
        self.protected: list[Key] = []
        self.size: dict[Key, int] = {}

    def used(self) -> int:
        return sum(self.size[key] for key in self.keys())

    def access(self, key: Key) -> bool:
        if key in self.protected:
            self.protected.remove(key)
            self.protected.append(key)
            return True
        if key not in self.probation:
            return False
        self.probation.remove(key)
        self.protected.append(key)
        while sum(self.size[k] for k in self.protected) > self.protected_capacity:
            self.probation.append(self.protected.pop(0))
        return True

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        if key in self.keys() or nbytes > self.capacity:
            return []
        evicted = []
        while self.used() + nbytes > self.capacity:
            evicted.append((self.probation or self.protected).pop(0))
        self.probation.append(key)
        self.size[key] = nbytes
        return evicted

    def discard(self, key: Key) -> None:
        for segment in (self.probation, self.protected):
            if key in segment:
                segment.remove(key)

    def keys(self) -> list[Key]:
        return self.probation + self.protected


class RefStatic:
    """The pinned keys in a list, hottest first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.pinned: list[Key] = []
        self.size: dict[Key, int] = {}

    def used(self) -> int:
        return sum(self.size[key] for key in self.pinned)

    def pin(self, ranked: list[tuple[Key, int]]) -> None:
        self.pinned = []
        for key, nbytes in ranked:
            if key not in self.pinned and self.used() + nbytes <= self.capacity:
                self.pinned.append(key)
                self.size[key] = nbytes

    def access(self, key: Key) -> bool:
        return key in self.pinned

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        return []

    def discard(self, key: Key) -> None:
        if key in self.pinned:
            self.pinned.remove(key)

    def keys(self) -> list[Key]:
        return self.pinned[::-1]


class RefNone:
    def __init__(self, capacity: int) -> None:
        pass

    def used(self) -> int:
        return 0

    def access(self, key: Key) -> bool:
        return False

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        return []

    def discard(self, key: Key) -> None:
        pass

    def keys(self) -> list[Key]:
        return []


class RefNextUse:
    """Both scopes: keys in admission order per partition, each access's time (per layer) kept, rates exact."""

    def __init__(self, capacity: int, scope: str, num_layers: int, num_experts: int) -> None:
        self.per_layer = scope == "per_layer"
        self.capacity = capacity // num_layers if self.per_layer else capacity
        self.num_layers = num_layers
        self.decay = 1 - 1 / (Fraction(HORIZON) * num_experts)
        self.order: list[list[Key]] = [[] for _ in range(num_layers if self.per_layer else 1)]
        self.size: dict[Key, int] = {}
        self.times: dict[Key, list[int]] = {}
        self.clock = [0] * num_layers
        self.layer, self.visits, self.accesses = -1, 0, 0

    def _part(self, key: Key) -> list[Key]:
        return self.order[key[0] if self.per_layer else 0]

    def used(self) -> int:
        return sum(self.size[key] for part in self.order for key in part)

    def visit(self, layer: int) -> None:
        self.layer, self.visits = layer, self.visits + 1

    def expected_next_use(self, key: Key) -> float | Fraction:
        layer = key[0]
        share = sum((1 - self.decay) * self.decay ** (self.clock[layer] - t) for t in self.times.get(key, []))
        rate = min(1, Fraction(self.accesses, self.visits) * share if self.visits else share)
        if rate == 0:
            return math.inf
        return (layer - self.layer - 1) % self.num_layers + 1 + self.num_layers * (1 / rate - 1)

    def access(self, key: Key) -> bool:
        self.clock[key[0]] += 1
        self.times.setdefault(key, []).append(self.clock[key[0]])
        self.accesses += 1
        return key in self._part(key)

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        part = self._part(key)
        if key in part or nbytes > self.capacity:
            return []
        need = sum(self.size[k] for k in part) + nbytes - self.capacity
        mine, victims = self.expected_next_use(key), []
        while need > 0:
            victim = max((k for k in part if k not in victims), key=self.expected_next_use)  # the first of equals
            if self.expected_next_use(victim) < mine:
                return []
            victims.append(victim)
            need -= self.size[victim]
        for victim in victims:
            part.remove(victim)
        part.append(key)
        self.size[key] = nbytes
        return victims

    def discard(self, key: Key) -> None:
        if key in self._part(key):
            self._part(key).remove(key)

    def keys(self) -> list[Key]:
        return list(chain.from_iterable(self.order))


REFERENCES: dict[str, Any] = {"lru": RefLRU, "lfu": RefLFU, "slru": RefSLRU, "static": RefStatic, "none": RefNone}


def reference(policy: str, scope: str, capacity: int, **kw: Any) -> Any:
    if policy == "next_use":
        return RefNextUse(capacity, scope, NUM_LAYERS, NUM_EXPERTS)
    model = REFERENCES[policy]
    return model(capacity, **kw) if scope == "global" else RefPerLayer(model, capacity, NUM_LAYERS, **kw)


class RefPerLayer:
    def __init__(self, model: Any, capacity: int, num_layers: int, **kw: Any) -> None:
        self.layers = [model(capacity // num_layers, **kw) for _ in range(num_layers)]

    def used(self) -> int:
        return sum(layer.used() for layer in self.layers)

    def pin(self, ranked: list[tuple[Key, int]]) -> None:
        for i, layer in enumerate(self.layers):
            layer.pin([(key, nbytes) for key, nbytes in ranked if key[0] == i])

    def access(self, key: Key) -> bool:
        return self.layers[key[0]].access(key)

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        return self.layers[key[0]].admit(key, nbytes)

    def discard(self, key: Key) -> None:
        self.layers[key[0]].discard(key)

    def keys(self) -> list[Key]:
        return list(chain.from_iterable(layer.keys() for layer in self.layers))


def partition_used(cache: ExpertCache, key: Key) -> int:
    """The bytes used in the partition that holds ``key``: the whole cache's, or its layer's."""
    return int(cache.state.parts["used"][key[0] if cache.scope == "per_layer" else 0])


SIZES = st.one_of(
    st.integers(1, 4).map(lambda size: dict.fromkeys(KEYS, size)),
    st.fixed_dictionaries({key: st.integers(0, 10) for key in KEYS}),
)
ENGINE_OPS = st.lists(
    st.tuples(st.sampled_from(("visit", "use", "use", "use", "prefetch", "discard")), KEY), max_size=60
)


@pytest.mark.parametrize("policy", POLICIES)
@SETTINGS
@given(
    scope=st.sampled_from(SCOPES),
    capacity=st.integers(0, 24),
    fraction=FRACTION,
    sizes=SIZES,
    ranking=st.permutations(KEYS),
    ops=ENGINE_OPS,
)
def test_matches_reference_model(
    policy: str,
    scope: str,
    capacity: int,
    fraction: float,
    sizes: dict[Key, int],
    ranking: list[Key],
    ops: list[tuple[str, Key]],
) -> None:
    kw = {"protected_fraction": fraction} if policy == "slru" else {}
    cache = ExpertCache(policy, scope, capacity, NUM_LAYERS, NUM_EXPERTS, **kw)
    ref = reference(policy, scope, capacity, **kw)
    if policy == "static":
        ranked = [(key, sizes[key]) for key in ranking]
        cache.pin(ranked)
        ref.pin(ranked)
    hits = misses = 0
    for op, key in ops:
        if op == "visit":
            cache.visit(key[0])
            if policy == "next_use":
                ref.visit(key[0])
        elif op == "use":
            hit = cache.access(key)
            assert hit == ref.access(key)
            hits, misses = hits + hit, misses + (not hit)
            if not hit:
                assert cache.admit(key, sizes[key]) == ref.admit(key, sizes[key])
        elif op == "prefetch":
            assert cache.admit(key, sizes[key]) == ref.admit(key, sizes[key])
        else:
            cache.discard(key)
            ref.discard(key)
        expected = ref.keys()
        assert [key in cache for key in KEYS] == [key in expected for key in KEYS]
        assert cache.keys() == expected
        assert cache.used_bytes == ref.used()
    assert (cache.hits, cache.misses) == (hits, misses)


ANY_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("access"), KEY, st.just(0)),
        st.tuples(st.just("admit"), KEY, st.integers(0, 40)),
        st.tuples(st.just("discard"), KEY, st.just(0)),
        st.tuples(st.just("visit"), KEY, st.just(0)),
    ),
    max_size=60,
)


@pytest.mark.parametrize("policy", POLICIES)
@SETTINGS
@given(
    scope=st.sampled_from(SCOPES),
    capacity=st.integers(0, 30),
    fraction=FRACTION,
    pins=st.lists(st.tuples(KEY, st.integers(0, 40)), unique_by=lambda p: p[0]),
    ops=ANY_OPS,
)
def test_byte_accounting_holds_under_any_operations(
    policy: str,
    scope: str,
    capacity: int,
    fraction: float,
    pins: list[tuple[Key, int]],
    ops: list[tuple[str, Key, int]],
) -> None:
    kw = {"protected_fraction": fraction} if policy == "slru" else {}
    cache = ExpertCache(policy, scope, capacity, NUM_LAYERS, NUM_EXPERTS, **kw)
    sizes = dict(pins)
    if policy == "static":
        cache.pin(pins)
    accesses = 0
    for op, key, nbytes in ops:
        before = cache.keys()
        was = key in cache
        if op == "access":
            accesses += 1
            assert cache.access(key) == was
            assert set(cache.keys()) == set(before)
        elif op == "discard":
            cache.discard(key)
            assert set(cache.keys()) == set(before) - {key}
        elif op == "visit":
            cache.visit(key[0])
            assert cache.keys() == before
        else:
            room = cache.layer_capacity_bytes - partition_used(cache, key)
            evicted = cache.admit(key, nbytes)
            if key in cache and not was:
                sizes[key] = nbytes
            inserts = policy not in ("static", "none") and nbytes <= cache.layer_capacity_bytes
            if policy == "next_use" and inserts and not was and key not in cache:  # declined
                assert room < nbytes and not evicted and cache.keys() == before
            else:
                assert (key in cache) == (was or inserts)
            assert len(set(evicted)) == len(evicted) and set(evicted) <= set(before) - {key}
            assert not any(victim in cache for victim in evicted)
            if evicted:  # without its last victim, the key would not have fit
                assert room + sum(sizes[victim] for victim in evicted[:-1]) < nbytes
        keys = cache.keys()
        assert len(set(keys)) == len(keys) == len(cache)
        assert [key in cache for key in KEYS] == [key in keys for key in KEYS]
        assert cache.used_bytes == sum(sizes[key] for key in keys) <= cache.capacity_bytes
        parts = cache.state.parts
        assert (parts["used"] <= cache.layer_capacity_bytes).all()
        assert parts["used"].sum() == cache.used_bytes
        assert (parts["hits"].sum(), parts["misses"].sum()) == (cache.hits, cache.misses)
    assert cache.hits + cache.misses == accesses


ACCESS, ADMIT, DISCARD, VISIT = range(4)


@njit
def replay(state: CacheState, ops: np.ndarray) -> np.ndarray:
    """Run (op, key id, nbytes) rows on ``state`` (a visit's third column is its layer); a row's outcome is the
    hit, or the number of victims followed by the victims."""
    log = np.full(len(ops) * (1 + len(state.evicted)), -1, np.int64)
    n = 0
    for op, key, nbytes in ops:
        if op == ACCESS:
            log[n] = cache_access(state, key)
            n += 1
        elif op == ADMIT:
            evicted = cache_admit(state, key, nbytes)
            log[n] = evicted
            log[n + 1 : n + 1 + evicted] = state.evicted[:evicted]
            n += 1 + evicted
        elif op == VISIT:
            cache_visit(state, nbytes)
        else:
            cache_discard(state, key)
    return log[:n]


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=50, deadline=None)
@given(
    scope=st.sampled_from(SCOPES),
    capacity=st.integers(0, 30),
    pins=st.lists(st.tuples(KEY, st.integers(0, 40)), unique_by=lambda p: p[0]),
    ops=ANY_OPS,
)
def test_njit_functions_called_from_njit_code_agree_with_the_wrapper(
    policy: str, scope: str, capacity: int, pins: list[tuple[Key, int]], ops: list[tuple[str, Key, int]]
) -> None:
    cache = ExpertCache(policy, scope, capacity, NUM_LAYERS, NUM_EXPERTS)
    state = new_cache_state(policy, scope, capacity, NUM_LAYERS, NUM_EXPERTS)
    ids = {(layer, expert): layer * NUM_EXPERTS + expert for layer, expert in KEYS}
    if policy == "static":
        cache.pin(pins)
        cache_pin(state, np.array([ids[key] for key, _ in pins], np.int64), np.array([n for _, n in pins], np.int64))
    expected: list[int] = []
    for op, key, nbytes in ops:
        if op == "access":
            expected.append(cache.access(key))
        elif op == "admit":
            evicted = cache.admit(key, nbytes)
            expected += [len(evicted), *(ids[victim] for victim in evicted)]
        elif op == "visit":
            cache.visit(key[0])
        else:
            cache.discard(key)
    rows = [
        (("access", "admit", "discard", "visit").index(op), ids[key], key[0] if op == "visit" else nbytes)
        for op, key, nbytes in ops
    ]
    log = replay(state, np.array(rows, np.int64).reshape(-1, 3))
    assert log.tolist() == expected
    resident = cache.keys()
    assert cache_keys(state).tolist() == [ids[key] for key in resident]
    assert [cache_contains(state, ids[key]) for key in KEYS] == [key in cache for key in KEYS]
    for name, array in zip(CacheState._fields, cache.state, strict=True):
        assert np.array_equal(array, getattr(state, name)), name
    assert tuple(int(state.meta[name][0]) for name in ("hits", "misses", "used", "count")) == (
        cache.hits,
        cache.misses,
        cache.used_bytes,
        len(cache),
    )


def test_a_second_process_loads_the_functions_from_numbas_cache() -> None:
    script = """
import numpy as np
from engine.streaming import cache_policy as cp

functions = [cp.cache_access, cp.cache_admit, cp.cache_contains, cp.cache_discard, cp.cache_keys, cp.cache_pin,
             cp.rank_keys]
for policy in cp.POLICIES:
    state = cp.new_cache_state(policy, "per_layer", 4, 2, 3)
    cp.cache_pin(state, cp.rank_keys(np.arange(6, dtype=np.int64)), np.ones(6, np.int64))
    for key in (0, 1, 2, 0, 4, 5, 3, 4):
        if not cp.cache_access(state, key):
            cp.cache_admit(state, key, 1)
    cp.cache_discard(state, 4)
    print(policy, cp.cache_keys(state).tolist(), cp.cache_contains(state, 5))
print("recompiled", [fn.__name__ for fn in functions if fn.stats.cache_misses])
print("loaded", all(fn.stats.cache_hits for fn in functions))
"""
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root)
        for _ in range(2)
    ]  # the first stores whatever the cache lacked
    first, second = (run.stdout.splitlines() for run in runs)
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    assert second[:-2] == first[:-2]
    assert second[-2:] == ["recompiled []", "loaded True"]


def use(cache: ExpertCache, key: Key, nbytes: int = 1) -> bool:
    """The engine's pattern: a demand access, and admission on a miss."""
    hit = cache.access(key)
    if not hit:
        cache.admit(key, nbytes)
    return hit


def protected_bytes(cache: ExpertCache) -> int:
    return int(cache.state.parts["protected"][0])


A, B, C, D, E = ((0, i) for i in range(5))


def test_lru_evicts_least_recently_used_first() -> None:
    cache = make_policy("lru", 3)
    for key in (A, B, C):
        cache.admit(key, 1)
    assert cache.access(A)
    assert cache.admit(B, 1) == []  # already resident: a no-op that does not refresh B
    assert cache.keys() == [B, C, A]
    assert cache.admit(D, 1) == [B]
    assert cache.admit(E, 2) == [C, A]
    assert cache.keys() == [D, E]
    assert (cache.used_bytes, cache.hits, cache.misses) == (3, 1, 0)


def test_lru_admits_nothing_larger_than_its_capacity() -> None:
    cache = make_policy("lru", 3)
    cache.admit(A, 2)
    assert cache.admit(B, 4) == []
    assert cache.admit(C, 1 << 70) == []
    assert cache.keys() == [A]


def test_lfu_evicts_least_used_then_least_recent() -> None:
    cache = make_policy("lfu", 3)
    for key in (A, B, C):
        cache.admit(key, 1)
    for key in (A, A, C, B):
        assert cache.access(key)
    assert cache.keys() == [C, B, A]  # uses 2, 2, 3: C was used before B
    assert cache.admit(D, 1) == [C]
    assert cache.admit(C, 1) == [D]  # the newcomer has the fewest uses
    assert cache.keys() == [C, B, A]  # C's old uses were forgotten


def test_lfu_does_not_count_misses() -> None:
    cache = make_policy("lfu", 2)
    cache.admit(A, 1)
    assert cache.access(A)
    for _ in range(3):
        assert not cache.access(B)
    cache.admit(B, 1)
    assert cache.keys() == [B, A]
    assert (cache.hits, cache.misses) == (1, 3)


def test_slru_promotes_on_a_second_use_and_demotes_overflow() -> None:
    cache = make_policy("slru", 4, protected_fraction=0.5)
    for key in (A, B, C, D):
        cache.admit(key, 1)
    assert cache.access(B) and cache.access(C)
    assert cache.keys() == [A, D, B, C]  # probationary, then protected
    assert cache.access(A)  # protected would hold 3 > 2 bytes: B goes back to probationary
    assert cache.keys() == [D, B, C, A]
    assert protected_bytes(cache) == 2
    assert cache.admit(E, 2) == [D, B]


def test_slru_evicts_protected_keys_once_probationary_is_empty() -> None:
    cache = make_policy("slru", 3, protected_fraction=1.0)
    for key in (A, B, C):
        cache.admit(key, 1)
        cache.access(key)
    assert cache.keys() == [A, B, C]
    assert cache.admit(D, 2) == [A, B]
    assert cache.keys() == [D, C]
    assert protected_bytes(cache) == 1


def test_slru_discarding_a_protected_key_frees_its_share() -> None:
    cache = make_policy("slru", 4, protected_fraction=0.5)
    for key in (A, A, B, B):
        use(cache, key)
    cache.discard(A)
    for key in (C, C):
        use(cache, key)
    assert protected_bytes(cache) == 2  # B and C: neither was demoted
    cache.admit(D, 1)
    cache.admit(E, 1)
    assert cache.admit((0, 9), 1) == [D]


@pytest.mark.parametrize(("policy", "keeps_hot_set"), [("slru", True), ("lru", False)])
def test_slru_resists_a_scan_that_flushes_lru(policy: str, keeps_hot_set: bool) -> None:
    cache = make_policy(policy, 10)
    hot = [(1, i) for i in range(4)]
    for key in hot * 3:
        use(cache, key)
    for i in range(100):
        use(cache, (2, i))
    assert [key in cache for key in hot] == [keeps_hot_set] * len(hot)


@pytest.mark.parametrize(("policy", "kept"), [("next_use", [(0, 0), (1, 0)]), ("lru", [(1, 0), (2, 0)])])
def test_next_use_keeps_the_layers_about_to_come(policy: str, kept: list[Key]) -> None:
    cache = ExpertCache(policy, "global", 2, 3, 4)
    for layer in (0, 1, 2, 0, 1, 2):  # each layer's one expert at every visit: used again in 3 visits
        cache.visit(layer)
        use(cache, (layer, 0))
    assert cache.keys() == kept  # next_use: layer 2's is needed last, so it is not admitted over layer 0's
    cache.visit(0)
    assert cache.access((0, 0)) == (policy == "next_use")


def test_next_use_does_not_let_an_expert_used_once_push_out_a_steady_one() -> None:
    cache = ExpertCache("next_use", "per_layer", 2, 2, 4)
    for _ in range(5):
        cache.visit(0)
        use(cache, (0, 0))
    cache.visit(0)
    assert not use(cache, (0, 1))
    assert cache.keys() == [(0, 0)]
    for _ in range(20):  # (0, 1) becomes the steady one
        cache.visit(0)
        use(cache, (0, 1))
    assert cache.keys() == [(0, 1)]


def test_static_pins_every_ranked_key_that_still_fits() -> None:
    cache = make_policy("static", 10)
    assert len(cache) == 0 and not cache.access(A)
    cache.pin([(A, 6), (B, 5), (C, 3), (D, 1), (A, 1)])
    assert cache.keys() == [D, C, A]  # coldest first; B did not fit
    assert cache.used_bytes == 10
    assert cache.access(A) and not cache.access(B)
    assert cache.admit(B, 1) == [] and B not in cache
    assert (cache.hits, cache.misses) == (1, 2)
    cache.pin([(E, 4)])
    assert (cache.keys(), cache.used_bytes) == ([E], 4)


def test_static_pins_a_repeated_key_at_the_first_size_that_fits() -> None:
    cache = make_policy("static", 10)
    cache.pin([(A, 11), (B, 9), (A, 1 << 70), (A, 1), (A, 0)])
    assert (cache.keys(), cache.used_bytes) == ([A, B], 10)


def test_static_ranks_by_count_then_key() -> None:
    counts = {(0, 1): 5, (2, 3): 1, (1, 0): 9, (0, 0): 5, (1, 1): 0}
    array = np.zeros(NUM_LAYERS * 4, np.int64)
    for (layer, expert), count in counts.items():
        array[layer * 4 + expert] = count
    assert [divmod(int(key), 4) for key in rank_keys(array)] == [(1, 0), (0, 0), (0, 1), (2, 3)]
    assert rank_keys(np.zeros(3, np.int64)).tolist() == []


def test_none_holds_nothing() -> None:
    cache = make_policy("none", 100)
    assert cache.policy == "none"
    assert cache.admit(A, 1) == []
    assert not cache.access(A) and A not in cache
    assert (len(cache), cache.keys(), cache.used_bytes, cache.misses) == (0, [], 0, 1)


def test_per_layer_splits_the_budget_and_routes_by_layer() -> None:
    cache = ExpertCache("lru", "per_layer", 10, 3, 6)
    assert cache.layer_capacity_bytes == 3  # the remaining byte is never used
    assert cache.admit((0, 0), 3) == []
    assert cache.admit((2, 5), 2) == []
    assert cache.admit((1, 0), 4) == []  # fits the budget, not the layer's share
    assert cache.admit((0, 1), 1) == [(0, 0)]
    assert cache.keys() == [(0, 1), (2, 5)]
    assert cache.state.parts["used"].tolist() == [1, 0, 2]
    assert cache.used_bytes == 3
    assert cache.access((2, 5)) and not cache.access((1, 0))
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.state.parts[["hits", "misses"]].tolist() == [(0, 0), (0, 1), (1, 0)]


def test_per_layer_static_pins_each_layer_within_its_share() -> None:
    cache = ExpertCache("static", "per_layer", 8, 2, 3)
    cache.pin([((0, 0), 3), ((1, 0), 4), ((0, 1), 2), ((0, 2), 1)])
    assert cache.keys() == [(0, 2), (0, 0), (1, 0)]
    assert cache.used_bytes == 8
    for scope in SCOPES:
        with pytest.raises(TypeError, match="static"):
            ExpertCache("lru", scope, 8, 2, 3).pin([])


@pytest.mark.parametrize("policy", POLICIES)
def test_make_cache_builds_the_named_policy_in_either_scope(policy: str) -> None:
    for scope, partitions, share in (("global", 1, 100), ("per_layer", 4, 25)):
        cache = ExpertCache(policy, scope, 100, 4, 8)
        assert (cache.policy, cache.scope, cache.capacity_bytes) == (policy, scope, 100)
        assert (cache.num_layers, cache.num_experts, cache.layer_capacity_bytes) == (4, 8, share)
        assert POLICIES[cache.state.policy] == policy
        assert len(cache.state.parts) == partitions
        arrays = [value for value in cache.state if isinstance(value, np.ndarray)]
        kinds = {
            array.dtype[name] if array.dtype.names else array.dtype
            for array in arrays
            for name in array.dtype.names or [None]
        }
        assert kinds == {np.dtype(np.int64), np.dtype(np.float64)}  # next_use's use rates are float64
        assert len(cache.state.uses) == (32 if policy == "next_use" else 0)


def test_per_layer_passes_policy_options_on() -> None:
    cache = ExpertCache("slru", "per_layer", 100, 4, 8, protected_fraction=0.5)
    assert cache.protected_fraction == 0.5
    assert cache.state.protected_capacity == 12


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: make_policy("lru", -1), "capacity_bytes"),
        (lambda: make_policy("lfu", 1.5), "capacity_bytes"),
        (lambda: make_policy("slru", True), "capacity_bytes"),
        (lambda: make_policy("slru", 1 << 63), "capacity_bytes"),
        (lambda: ExpertCache("lru", "per_layer", -1, 2, 2), "capacity_bytes"),
        (lambda: make_policy("arc", 1), "policy must be one of lru, lfu, slru, next_use, static, none"),
        (lambda: ExpertCache("arc", "per_layer", 1, 2, 2), "policy"),
        (lambda: ExpertCache("lru", "everywhere", 1, 2, 2), "scope"),
        (lambda: ExpertCache("lru", "per_layer", 1, 0, 2), "num_layers"),
        (lambda: ExpertCache("lru", "global", 1, 2, 0), "num_experts"),
        (lambda: new_cache_state("lru", "global", 1, 2, 2.0), "num_experts"),
        (lambda: make_policy("slru", 10, protected_fraction=1.5), "protected_fraction"),
        (lambda: make_policy("slru", 10, protected_fraction=-0.1), "protected_fraction"),
        (lambda: make_policy("slru", 10, protected_fraction=math.nan), "protected_fraction"),
        (lambda: make_policy("slru", 10, protected_fraction="0.5"), "protected_fraction"),
    ],
)
def test_bad_arguments_are_named(build: Any, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        build()


@pytest.mark.parametrize("policy", POLICIES)
def test_negative_sizes_are_refused(policy: str) -> None:
    with pytest.raises(ValueError, match="nbytes"):
        make_policy(policy, 10).admit(A, -1)
    if policy == "static":
        cache = make_policy(policy, 10)
        cache.pin([(A, 1)])
        with pytest.raises(ValueError, match="nbytes"):
            cache.pin([(B, 1), (C, -1)])
        assert cache.keys() == [A]


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("key", [(3, 0), (0, 6), (-1, 0), (0, -1)])
def test_keys_outside_the_cache_are_named(scope: str, key: Key) -> None:
    cache = ExpertCache("static", scope, 10, NUM_LAYERS, NUM_EXPERTS)
    calls = [
        lambda: cache.access(key),
        lambda: cache.admit(key, 1),
        lambda: cache.discard(key),
        lambda: key in cache,
        lambda: cache.pin([(key, 1)]),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=f"key {key!r}".replace("(", r"\(").replace(")", r"\)")):
            call()
    assert (cache.hits, cache.misses) == (0, 0)
