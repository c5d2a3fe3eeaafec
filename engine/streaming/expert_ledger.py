"""The expert store's decisions, compiled: which experts are cached, staged, read now or later, and the counters.

The ledger is plain arrays and numba functions, with no weights and no I/O: the engine's ``ExpertStore`` calls
it once per layer (and once per expert it takes) and carries out what it says with real reads, and the trace
simulator's compiled replay calls the very same functions in a loop, with a model disk instead of reads. So
the simulator's hit rate and prefetch counters are the engine's by construction, at millions of lookups per
second.

Keys are ``layer * num_experts + expert``. Per layer the calls come in the decoder's order: ``request`` with the
layer's experts, ``stage`` with each later layer's proposals, then for each expert not cached ``take`` and,
once its read has arrived, ``admit``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, types

from engine.config import EngineConfig
from engine.streaming.cache_policy import (
    CacheState,
    cache_access,
    cache_admit,
    cache_contains,
    cache_keys,
    cache_pin,
    new_cache_state,
    rank_keys,
)

# meta: the ledger's scalars
META_FIELDS = 11
LAYER, EXPERTS, ENTRY_BYTES, WINDOW, STAGED_LIMIT, STAGED, WAITING_HEAD, WAITING_END, IN_FLIGHT, PASSES, PROFILING = (
    range(META_FIELDS)
)
# counters, as StoreStats names them
HITS, MISSES, EXPERTS_LOADED, PREFETCH_ISSUED, PREFETCH_USED, PREFETCH_TIMELY, PREFETCH_WASTED = range(7)
COUNTERS = (
    "hits",
    "misses",
    "experts_loaded",
    "prefetch_issued",
    "prefetch_used",
    "prefetch_timely",
    "prefetch_wasted",
)
# what each expert of the current layer is: not requested (or taken), cached, prefetched, waiting for its read
# to start, being read; REQUESTED only while a request sorts out the staged keys
ABSENT, CACHED, STAGED_READ, WAITING, READING, REQUESTED = range(6)


class LedgerState(NamedTuple):
    cache: CacheState
    meta: np.ndarray  # int64 [META_FIELDS], indexed by LAYER ... PROFILING
    counters: np.ndarray  # int64 [7], indexed by HITS ... PREFETCH_WASTED
    staged: np.ndarray  # int64 [STAGED_LIMIT]: staged keys, in the order their reads were issued
    is_staged: np.ndarray  # int64 [keys]: 1 while staged
    current: np.ndarray  # int64 [experts]: the current layer's experts, ABSENT ... READING
    waiting: np.ndarray  # int64 [experts]: the current layer's misses whose reads have not started, a queue
    ahead: np.ndarray  # int64 [layers, depth]: the MoE layers a layer's predictions are for, -1 after the last
    profile: np.ndarray  # int64 [keys]: tokens served per key in the first forward pass (static policy)
    cancelled: np.ndarray  # int64 [STAGED_LIMIT]: the staged keys the last request cancelled
    out: np.ndarray  # int64 [max(keys, experts)]: the experts or keys the last call asks the caller to read


def new_ledger(
    config: EngineConfig, num_layers: int, num_experts: int, moe_layers: list[int], entry_bytes: int, top_k: int
) -> LedgerState:
    """A ledger for ``config`` (its cache, ``entry_bytes`` per expert); a layer's reads in flight are ``top_k``, its
    staged prefetches at most ``prefetch_depth x (top_k + prefetch_extra)``."""
    policy = config.cache_policy if config.cache_bytes else "none"
    cache = new_cache_state(policy, config.cache_scope, config.cache_bytes, num_layers, num_experts)
    keys = num_layers * num_experts
    depth = config.prefetch_depth
    limit = depth * (top_k + config.prefetch_extra)
    meta = np.zeros(META_FIELDS, np.int64)
    meta[[LAYER, EXPERTS, ENTRY_BYTES, WINDOW, STAGED_LIMIT]] = (-1, num_experts, entry_bytes, top_k, limit)
    meta[PROFILING] = policy == "static"
    ahead = np.full((num_layers, depth), -1, np.int64)
    for n, layer in enumerate(moe_layers):
        following = moe_layers[n + 1 : n + 1 + depth]
        ahead[layer, : len(following)] = following
    return LedgerState(
        cache,
        meta,
        np.zeros(len(COUNTERS), np.int64),
        np.zeros(max(limit, 1), np.int64),
        np.zeros(keys, np.int64),
        np.zeros(num_experts, np.int64),
        np.zeros(num_experts, np.int64),
        ahead,
        np.zeros(keys, np.int64),
        np.zeros(max(limit, 1), np.int64),
        np.zeros(max(keys, num_experts), np.int64),
    )


class Ledger:
    """A ledger for Python callers (the engine's store): each function compiled for this state's types and bound
    to it. Calling a compiled entry point skips numba's typing of the arguments, which for a namedtuple of
    arrays costs more than the work: 3 µs a call against under 1. Nothing checks the arguments then: arrays must
    be int64 (``resident``: bool) with the dimensions declared below, as the store makes them."""

    def __init__(self, state: LedgerState) -> None:
        self.state = state
        int64, keys, choices = types.int64, types.int64[:], types.int64[:, :]

        def bind(function: numba.core.registry.CPUDispatcher, *argument_types: types.Type) -> partial:
            return partial(function.compile((numba.typeof(state), *argument_types)), state)

        self.begin_forward = bind(begin_forward)
        self.request = bind(request, int64, keys)
        self.stage = bind(stage, int64, keys)
        self.take = bind(take, int64, int64)
        self.admit = bind(admit, int64, int64)
        self.count_routing = bind(count_routing, int64, choices)
        self.cached_experts = bind(cached_experts, int64, types.boolean[:])


@njit(cache=True, inline="always")
def begin_forward(s: LedgerState) -> int:
    """A forward pass starts. Under the static policy, before the second the keys the first used most are pinned:
    returns how many, in ``s.out`` (coldest first), for the caller to read into the cache."""
    s.meta[PASSES] += 1
    if s.meta[PASSES] != 2 or not s.meta[PROFILING]:
        return 0
    s.meta[PROFILING] = 0
    ranked = rank_keys(s.profile)
    cache_pin(s.cache, ranked, np.full(len(ranked), s.meta[ENTRY_BYTES], np.int64))
    pinned = cache_keys(s.cache)
    s.out[: len(pinned)] = pinned
    return len(pinned)


@njit(cache=True, inline="always")
def request(s: LedgerState, layer: int, experts: np.ndarray) -> tuple[int, int]:
    """Record ``layer``'s accesses to ``experts`` (distinct: ``waiting`` has room for each expert once); cancel the
    staged prefetches it did not ask for. Returns how many were cancelled (keys in ``s.cancelled``) and how many
    reads to start now (experts in ``s.out``, in order): each expert is then ``s.current[expert]``, CACHED,
    STAGED_READ, WAITING or READING."""
    num_experts, current, counters = s.meta[EXPERTS], s.current, s.counters
    current[:] = ABSENT
    for expert in experts:
        current[expert] = REQUESTED
    cancelled = _cancel_unused(s, layer) if s.meta[STAGED] else 0
    s.meta[LAYER] = layer
    s.meta[WAITING_HEAD] = s.meta[WAITING_END] = s.meta[IN_FLIGHT] = 0
    hits = used = 0
    for expert in experts:
        key = layer * num_experts + expert
        if cache_access(s.cache, key):
            hits += 1
            current[expert] = CACHED
        elif s.is_staged[key]:
            _unstage(s, key)
            used += 1
            current[expert] = STAGED_READ
        else:
            s.waiting[s.meta[WAITING_END]] = expert
            s.meta[WAITING_END] += 1
            current[expert] = WAITING
    counters[HITS] += hits
    counters[MISSES] += len(experts) - hits
    counters[EXPERTS_LOADED] += len(experts) - hits
    counters[PREFETCH_USED] += used
    return cancelled, _read_ahead(s)


@njit(cache=True, inline="always")
def stage(s: LedgerState, target: int, proposals: np.ndarray) -> tuple[int, bool]:
    """Stage the proposed experts of layer ``target`` that are neither staged nor cached, while the limit allows.
    Returns how many (keys in ``s.out``, for the caller to read, in order) and whether the limit was reached."""
    limit, staged = s.meta[STAGED_LIMIT], 0
    for expert in proposals:
        if s.meta[STAGED] >= limit:
            return staged, True
        key = target * s.meta[EXPERTS] + expert
        if s.is_staged[key] or cache_contains(s.cache, key):
            continue
        s.staged[s.meta[STAGED]] = key
        s.meta[STAGED] += 1
        s.is_staged[key] = 1
        s.out[staged] = key
        staged += 1
        s.counters[PREFETCH_ISSUED] += 1
    return staged, False


@njit(cache=True, inline="always")
def take(s: LedgerState, layer: int, expert: int) -> tuple[int, int]:
    """The expert of the current layer the caller computes next, if it is not CACHED (a cached one needs nothing
    here): returns what it was (ABSENT if it was not requested, or was taken) and how many reads to start now
    (experts in ``s.out``). A WAITING expert, taken out of order, is the caller's to read first."""
    if layer != s.meta[LAYER] or s.current[expert] in (ABSENT, CACHED):
        return ABSENT, 0
    was = s.current[expert]
    s.current[expert] = ABSENT
    if was == WAITING:
        _unwait(s, expert)
    elif was == READING:
        s.meta[IN_FLIGHT] -= 1
    return was, _read_ahead(s)


@njit(cache=True, inline="always")
def admit(s: LedgerState, layer: int, expert: int) -> tuple[int, bool]:
    """An expert read for the current layer has arrived: offer it to the cache. Returns how many keys it evicted
    (in ``s.cache.evicted``, first victim first) and whether it is cached now."""
    key = layer * s.meta[EXPERTS] + expert
    evicted = cache_admit(s.cache, key, s.meta[ENTRY_BYTES])
    return evicted, cache_contains(s.cache, key)


@njit(cache=True, inline="always")
def count_routing(s: LedgerState, layer: int, experts: np.ndarray) -> None:
    """The static policy's profile: the tokens each expert of ``layer`` served ([T, k] choices)."""
    if s.meta[PROFILING]:
        base = layer * s.meta[EXPERTS]
        for t in range(experts.shape[0]):
            for expert in experts[t]:
                s.profile[base + expert] += 1


@njit(cache=True, inline="always")
def cached_experts(s: LedgerState, layer: int, resident: np.ndarray) -> None:
    """``resident[e]``: whether expert e of ``layer`` is cached."""
    base = layer * s.meta[EXPERTS]
    for expert in range(s.meta[EXPERTS]):
        resident[expert] = cache_contains(s.cache, base + expert)


@njit(cache=True, inline="always")
def _cancel_unused(s: LedgerState, layer: int) -> int:
    """Cancel the staged keys of earlier layers, and those of ``layer`` it has not requested, in issue order."""
    num_experts, kept, cancelled = s.meta[EXPERTS], 0, 0
    for n in range(s.meta[STAGED]):
        key = s.staged[n]
        owner = key // num_experts
        if owner < layer or (owner == layer and s.current[key % num_experts] == ABSENT):
            s.is_staged[key] = 0
            s.cancelled[cancelled] = key
            cancelled += 1
        else:
            s.staged[kept] = key
            kept += 1
    s.meta[STAGED] = kept
    s.counters[PREFETCH_WASTED] += cancelled
    return cancelled


@njit(cache=True, inline="always")
def _unstage(s: LedgerState, key: int) -> None:
    count = s.meta[STAGED]
    n = 0
    while s.staged[n] != key:
        n += 1
    for m in range(n, count - 1):
        s.staged[m] = s.staged[m + 1]
    s.meta[STAGED] = count - 1
    s.is_staged[key] = 0


@njit(cache=True, inline="always")
def _unwait(s: LedgerState, expert: int) -> None:
    head, end = s.meta[WAITING_HEAD], s.meta[WAITING_END]
    n = head
    while s.waiting[n] != expert:
        n += 1
    for m in range(n, end - 1):
        s.waiting[m] = s.waiting[m + 1]
    s.meta[WAITING_END] = end - 1


@njit(cache=True, inline="always")
def _read_ahead(s: LedgerState) -> int:
    """Start the current layer's next reads, up to WINDOW in flight; returns how many (experts in ``s.out``)."""
    started = 0
    while s.meta[WAITING_HEAD] < s.meta[WAITING_END] and s.meta[IN_FLIGHT] < s.meta[WINDOW]:
        expert = s.waiting[s.meta[WAITING_HEAD]]
        s.meta[WAITING_HEAD] += 1
        s.current[expert] = READING
        s.meta[IN_FLIGHT] += 1
        s.out[started] = expert
        started += 1
    return started
