"""The expert store's decisions, compiled: which experts are cached, staged, read now or later, and the counters.

The ledger is plain arrays and numba functions, with no weights and no I/O: the engine's ``ExpertStore`` calls
it once per layer (and once per expert it takes) and carries out what it says with real reads, and the trace
simulator's compiled replay calls the very same functions in a loop, with a model disk instead of reads. So
the simulator's hit rate and prefetch counters are the engine's by construction, at millions of lookups per
second.

Keys are ``layer * num_experts + expert``. Per layer the calls come in the decoder's order: ``request`` with the
layer's experts, ``route_done`` with its routing (the predictor learns from it, and its proposals for the next
layers are staged), then for each expert not cached ``take`` and, once its read has arrived, ``admit``.
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
    cache_visit,
    new_cache_state,
    rank_keys,
)
from engine.streaming.predictors import NO_PREDICTOR, PredictorState, observe, propose

# counters, as StoreStats names them: a vector, summed and differenced as one
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
    """The ledger's arrays; a one-element array is a scalar the compiled calls change."""

    cache: CacheState
    num_experts: int
    entry_bytes: int  # what the cache charges per expert
    window: int  # the current layer's reads in flight at most: top_k
    staged_limit: int  # staged prefetches at most: prefetch_depth x (top_k + prefetch_extra)
    prefetch_extra: int
    layer: np.ndarray  # int64 [1]: the current layer (-1 before the first request)
    staged_count: np.ndarray  # int64 [1]: keys in ``staged``
    waiting_head: np.ndarray  # int64 [1]: the next of ``waiting`` to read
    waiting_end: np.ndarray  # int64 [1]
    in_flight: np.ndarray  # int64 [1]: the current layer's reads started and not yet taken
    passes: np.ndarray  # int64 [1]: forward passes begun
    profiling: np.ndarray  # int64 [1]: 1 while the static policy counts the first pass's routing
    counters: np.ndarray  # int64 [7], indexed by HITS ... PREFETCH_WASTED
    staged: np.ndarray  # int64 [staged_limit]: staged keys, in the order their reads were issued
    is_staged: np.ndarray  # int64 [keys]: 1 while staged
    current: np.ndarray  # int64 [experts]: the current layer's experts, ABSENT ... READING
    waiting: np.ndarray  # int64 [experts]: the current layer's misses whose reads have not started, a queue
    ahead: np.ndarray  # int64 [layers, depth]: the MoE layers a layer's predictions are for, -1 after the last
    position: np.ndarray  # int64 [layers]: each MoE layer's position among them (-1: a dense layer)
    profile: np.ndarray  # int64 [keys]: tokens served per key in the first forward pass (static policy)
    cancelled: np.ndarray  # int64 [staged_limit]: the staged keys the last request cancelled
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
    ahead = np.full((num_layers, depth), -1, np.int64)
    position = np.full(num_layers, -1, np.int64)
    for n, layer in enumerate(moe_layers):
        following = moe_layers[n + 1 : n + 1 + depth]
        ahead[layer, : len(following)] = following
        position[layer] = n
    return LedgerState(
        cache,
        num_experts,
        entry_bytes,
        top_k,
        limit,
        config.prefetch_extra,
        np.full(1, -1, np.int64),
        *(np.zeros(1, np.int64) for _ in range(5)),
        np.full(1, policy == "static", np.int64),
        np.zeros(len(COUNTERS), np.int64),
        np.zeros(max(limit, 1), np.int64),
        np.zeros(keys, np.int64),
        np.zeros(num_experts, np.int64),
        np.zeros(num_experts, np.int64),
        ahead,
        position,
        np.zeros(keys, np.int64),
        np.zeros(max(limit, 1), np.int64),
        np.zeros(max(keys, num_experts), np.int64),
    )


class Ledger:
    """A ledger for Python callers (the engine's store): each function compiled for this state's types and bound
    to it. Calling a compiled entry point skips numba's typing of the arguments, which for a namedtuple of
    arrays costs more than the work: 3 µs a call against under 1. Nothing checks the arguments then: arrays must
    be int64 (``resident``: bool) with the dimensions declared below, as the store makes them."""

    def __init__(self, state: LedgerState, predictor: PredictorState) -> None:
        self.state = state
        predictor_type = numba.typeof(predictor)
        int64, keys, choices = types.int64, types.int64[:], types.int64[:, :]

        def bind(function: numba.core.registry.CPUDispatcher, *argument_types: types.Type) -> partial:
            return partial(function.compile((numba.typeof(state), *argument_types)), state)

        self.begin_forward = bind(begin_forward)
        self.request = bind(request, int64, keys)
        self.route_done = bind(route_done, predictor_type, int64, choices, keys, types.int64[:, :, :])
        self.take = bind(take, int64, int64)
        self.admit = bind(admit, int64, int64)
        self.cached_experts = bind(cached_experts, int64, types.boolean[:])


@njit(cache=True, inline="always")
def begin_forward(s: LedgerState) -> int:
    """A forward pass starts. Under the static policy, before the second the keys the first used most are pinned:
    returns how many, in ``s.out`` (coldest first), for the caller to read into the cache."""
    s.passes[0] += 1
    if s.passes[0] != 2 or not s.profiling[0]:
        return 0
    s.profiling[0] = 0
    ranked = rank_keys(s.profile)
    cache_pin(s.cache, ranked, np.full(len(ranked), s.entry_bytes, np.int64))
    pinned = cache_keys(s.cache)
    s.out[: len(pinned)] = pinned
    return len(pinned)


@njit(cache=True, inline="always")
def request(s: LedgerState, layer: int, experts: np.ndarray) -> tuple[int, int]:
    """Record ``layer``'s accesses to ``experts`` (distinct: ``waiting`` has room for each expert once); cancel the
    staged prefetches it did not ask for. Returns how many were cancelled (keys in ``s.cancelled``) and how many
    reads to start now (experts in ``s.out``, in order): each expert is then ``s.current[expert]``, CACHED,
    STAGED_READ, WAITING or READING."""
    num_experts, current, counters = s.num_experts, s.current, s.counters
    current[:] = ABSENT
    for expert in experts:
        current[expert] = REQUESTED
    cancelled = _cancel_unused(s, layer) if s.staged_count[0] else 0
    cache_visit(s.cache, layer)
    s.layer[0] = layer
    s.waiting_head[0] = 0
    s.waiting_end[0] = 0
    s.in_flight[0] = 0
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
            s.waiting[s.waiting_end[0]] = expert
            s.waiting_end[0] += 1
            current[expert] = WAITING
    counters[HITS] += hits
    counters[MISSES] += len(experts) - hits
    counters[EXPERTS_LOADED] += len(experts) - hits
    counters[PREFETCH_USED] += used
    return cancelled, _read_ahead(s)


@njit(cache=True, inline="always")
def route_done(
    s: LedgerState, p: PredictorState, layer: int, experts: np.ndarray, last_ranked: np.ndarray, lookahead: np.ndarray
) -> int:
    """``layer``'s routing is known: its choice [T, k], its last token's experts ranked by probability, and the
    later layers' routers' rankings of its input ([T, D, R], only gate_lookahead reads them). Counts the static
    policy's profile, lets the predictor ``p`` learn, and stages its proposals for the next layers while the limit
    allows. Returns how many keys were staged (in ``s.out``, for the caller to read, in order)."""
    count_routing(s, layer, experts)
    if p.kind == NO_PREDICTOR:
        return 0
    position = s.position[layer]
    observe(p, position, experts, last_ranked)
    count = experts.shape[1] + s.prefetch_extra
    staged = 0
    for ahead in range(s.ahead.shape[1]):
        target = s.ahead[layer, ahead]
        if target < 0:
            break
        added, full = _stage(s, target, propose(p, position, ahead, experts, lookahead, count), staged)
        staged += added
        if full:
            break
    return staged


@njit(cache=True, inline="always")
def _stage(s: LedgerState, target: int, proposals: np.ndarray, at: int) -> tuple[int, bool]:
    """Stage the proposed experts of layer ``target`` that are neither staged nor cached, while the limit allows.
    Returns how many (keys in ``s.out`` from ``at``) and whether the limit was reached."""
    staged = 0
    for expert in proposals:
        if s.staged_count[0] >= s.staged_limit:
            return staged, True
        key = target * s.num_experts + expert
        if s.is_staged[key] or cache_contains(s.cache, key):
            continue
        s.staged[s.staged_count[0]] = key
        s.staged_count[0] += 1
        s.is_staged[key] = 1
        s.out[at + staged] = key
        staged += 1
        s.counters[PREFETCH_ISSUED] += 1
    return staged, False


@njit(cache=True, inline="always")
def take(s: LedgerState, layer: int, expert: int) -> tuple[int, int]:
    """The expert of the current layer the caller computes next, if it is not CACHED (a cached one needs nothing
    here): returns what it was (ABSENT if it was not requested, or was taken) and how many reads to start now
    (experts in ``s.out``). A WAITING expert, taken out of order, is the caller's to read first."""
    if layer != s.layer[0] or s.current[expert] in (ABSENT, CACHED):
        return ABSENT, 0
    was = s.current[expert]
    s.current[expert] = ABSENT
    if was == WAITING:
        _unwait(s, expert)
    elif was == READING:
        s.in_flight[0] -= 1
    return was, _read_ahead(s)


@njit(cache=True, inline="always")
def admit(s: LedgerState, layer: int, expert: int) -> tuple[int, bool]:
    """An expert read for the current layer has arrived: offer it to the cache. Returns how many keys it evicted
    (in ``s.cache.evicted``, first victim first) and whether it is cached now."""
    key = layer * s.num_experts + expert
    evicted = cache_admit(s.cache, key, s.entry_bytes)
    return evicted, cache_contains(s.cache, key)


@njit(cache=True, inline="always")
def count_routing(s: LedgerState, layer: int, experts: np.ndarray) -> None:
    """The static policy's profile: the tokens each expert of ``layer`` served ([T, k] choices)."""
    if s.profiling[0]:
        base = layer * s.num_experts
        for t in range(experts.shape[0]):
            for expert in experts[t]:
                s.profile[base + expert] += 1


@njit(cache=True, inline="always")
def cached_experts(s: LedgerState, layer: int, resident: np.ndarray) -> None:
    """``resident[e]``: whether expert e of ``layer`` is cached."""
    base = layer * s.num_experts
    for expert in range(s.num_experts):
        resident[expert] = cache_contains(s.cache, base + expert)


@njit(cache=True, inline="always")
def _cancel_unused(s: LedgerState, layer: int) -> int:
    """Cancel the staged keys of earlier layers, and those of ``layer`` it has not requested, in issue order."""
    num_experts, kept, cancelled = s.num_experts, 0, 0
    for n in range(s.staged_count[0]):
        key = s.staged[n]
        owner = key // num_experts
        if owner < layer or (owner == layer and s.current[key % num_experts] == ABSENT):
            s.is_staged[key] = 0
            s.cancelled[cancelled] = key
            cancelled += 1
        else:
            s.staged[kept] = key
            kept += 1
    s.staged_count[0] = kept
    s.counters[PREFETCH_WASTED] += cancelled
    return cancelled


@njit(cache=True, inline="always")
def _unstage(s: LedgerState, key: int) -> None:
    count = s.staged_count[0]
    n = 0
    while s.staged[n] != key:
        n += 1
    for m in range(n, count - 1):
        s.staged[m] = s.staged[m + 1]
    s.staged_count[0] = count - 1
    s.is_staged[key] = 0


@njit(cache=True, inline="always")
def _unwait(s: LedgerState, expert: int) -> None:
    head, end = s.waiting_head[0], s.waiting_end[0]
    n = head
    while s.waiting[n] != expert:
        n += 1
    for m in range(n, end - 1):
        s.waiting[m] = s.waiting[m + 1]
    s.waiting_end[0] = end - 1


@njit(cache=True, inline="always")
def _read_ahead(s: LedgerState) -> int:
    """Start the current layer's next reads, up to WINDOW in flight; returns how many (experts in ``s.out``)."""
    started = 0
    while s.waiting_head[0] < s.waiting_end[0] and s.in_flight[0] < s.window:
        expert = s.waiting[s.waiting_head[0]]
        s.waiting_head[0] += 1
        s.current[expert] = READING
        s.in_flight[0] += 1
        s.out[started] = expert
        started += 1
    return started
