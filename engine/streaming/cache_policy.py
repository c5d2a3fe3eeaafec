"""Which experts stay in RAM: replacement policies over (layer, expert) keys under a byte budget.

A policy only tracks keys and their sizes, never weights, and does no I/O: the expert ledger (``expert_ledger``)
asks it what to keep and what to evict, for the engine's store and for the trace simulator's replay alike. So
the whole policy is numba functions over a ``CacheState`` of arrays, called from compiled code. An access or
admission is O(1) apart from its victims (next_use: a scan of the partition per victim) and allocates nothing.

Keys are ids ``layer * num_experts + expert``. The cache has one partition (scope ``global``) or one per layer
(``per_layer``, each with ``capacity_bytes // num_layers``; the remainder is never used). A partition keeps its
resident keys in doubly linked lists, next victim first: one list, or for slru the probationary list then the
protected one. Nodes ``0 .. K-1`` of ``links`` are the keys, the nodes after them the lists' sentinels.

- lru: the list is in recency order.
- lfu: the list is in (uses, recency) order: admission counts as one use and each hit as one more; misses are
  not counted and a key's count is forgotten when it leaves. Keys with equal counts are contiguous and form a
  bucket (its count, tail and size); a partition's buckets form a ring in increasing count from a sentinel
  bucket of count 0, so a hit moves its key after the tail of the bucket one count up, or starts that bucket.
- slru (Karedla, Love and Wherry 1994): new keys enter the probationary list; a hit there promotes the key to
  the protected list, which holds at most ``protected_fraction`` of the partition's capacity and demotes its
  least recent keys to the probationary list's most recent end. Victims are the probationary keys, least
  recent first, then the protected ones: keys used once cannot push out keys used again.
- next_use: evicts the key whose next use is expected last, and admits a key only if its next use is expected
  no later than its victims' (so an expert used once cannot push out one used steadily, as in TinyLFU). The
  decoder visits the L layers in turn (``cache_visit``): a key of layer l is needed at the earliest d(l) visits
  from now (1 for the next layer, L for the one visited last), then, if a visit uses it with probability p, after
  L (1/p - 1) more on average. So its expected next use is d(l) + L (1/p - 1). p is the key's share of its layer's
  recent accesses (an exponential average over about ``HORIZON`` times the layer's experts) times the accesses
  per visit. With one partition per layer this ranks keys by use rate; in one global partition it also keeps the
  layers about to come, which lru evicts first. Keys are listed in admission order; a victim is found by a scan
  of its partition.
- static: the set ``cache_pin`` chose (e.g. from a profiling pass's counts), coldest first; admit never inserts.
- none: holds nothing, whatever its capacity.

The functions a replay calls per lookup are inlined into their callers (``inline="always"``, numba IR inlining):
passing the state between compiled functions costs more than most operations.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

SCOPES = ("global", "per_layer")
POLICIES = ("lru", "lfu", "slru", "next_use", "static", "none")
LRU, LFU, SLRU, NEXT_USE, STATIC, NONE = range(len(POLICIES))  # a policy's code is its index in POLICIES
MAX_BYTES = 1 << 62  # capacities up to this leave room for the int64 sums of sizes

# a key's entry (its partition is looked up rather than divided out: a 64-bit division costs more than the rest
# of an access)
ENTRY = np.dtype(
    [("partition", np.int64), ("layer", np.int64), ("size", np.int64), ("list", np.int64), ("bucket", np.int64)]
)
NOT_RESIDENT = -1  # the list of a key that is not resident
CHOSEN = -2  # next_use: the list of a resident key while it is chosen as a victim
PROBATION, PROTECTED = 0, 1  # slru's lists; the other policies have only list 0
LINK = np.dtype([("prev", np.int64), ("next", np.int64)])  # a node of the lists
PARTITION = np.dtype([("used", np.int64), ("protected", np.int64), ("hits", np.int64), ("misses", np.int64)])
# lfu only: the first bucket per partition is its ring's sentinel, the others start on the free list
BUCKET = np.dtype([("count", np.int64), ("prev", np.int64), ("next", np.int64), ("tail", np.int64), ("size", np.int64)])
NO_BUCKET = -1
META = np.dtype(  # what changes beside the arrays, one record; ``layer``: the layer visited last (next_use)
    [
        ("free_bucket", np.int64),
        ("hits", np.int64),
        ("misses", np.int64),
        ("used", np.int64),
        ("count", np.int64),
        ("layer", np.int64),
        ("visits", np.int64),
    ]
)
# next_use: how far back a key's use rate looks, in accesses to its layer per expert of the layer. Measured on
# synthetic traces of 8, 64 and 384 experts: 8 and 16 best (16 by under 1%); 1 and 2 forget the busy experts of
# wide layers, at a loss of up to 15% of the hits.
HORIZON = 16.0
RESCALE_AT = 1e100  # a layer's inflation is folded into its keys' use mass before it can overflow


class CacheState(NamedTuple):
    policy: int  # its index in POLICIES
    lists: int  # per partition: 2 for slru, else 1
    capacity: int  # bytes per partition
    protected_capacity: int  # slru: bytes of a partition its protected list may hold
    meta: np.ndarray  # META [1]
    links: np.ndarray  # LINK [keys + partitions * lists]
    entries: np.ndarray  # ENTRY [keys]
    parts: np.ndarray  # PARTITION [partitions]
    buckets: np.ndarray  # BUCKET [partitions + keys] for lfu, else [0]
    evicted: np.ndarray  # int64 [keys]: cache_admit's victims, first victim first
    num_layers: int
    decay: float  # next_use: the weight left to the past at each access to a layer
    uses: np.ndarray  # float64 [keys] for next_use, else [0]: each access counted at its layer's inflation then
    inflation: np.ndarray  # float64 [layers] for next_use, else [0]: decay ** -(the layer's accesses since a rescale)


def _check_count(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an int <= {maximum}, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def new_cache_state(
    policy: str,
    scope: str,
    capacity_bytes: int,
    num_layers: int,
    num_experts: int,
    protected_fraction: float = 0.8,
) -> CacheState:
    """An empty cache; ``protected_fraction`` is slru's share of each partition for its protected list."""
    _check_choice("policy", policy, POLICIES)
    _check_choice("scope", scope, SCOPES)
    _check_count("capacity_bytes", capacity_bytes, 0, MAX_BYTES)
    _check_count("num_layers", num_layers, 1)
    _check_count("num_experts", num_experts, 1)
    fraction = protected_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
        raise ValueError(f"protected_fraction must be a number in [0, 1], got {fraction!r}")
    code = POLICIES.index(policy)
    num_keys = num_layers * num_experts
    per_layer = scope == "per_layer"
    partitions = num_layers if per_layer else 1
    lists = 2 if code == SLRU else 1
    capacity = capacity_bytes // num_layers if per_layer else capacity_bytes

    meta = np.zeros(1, META)
    meta["free_bucket"] = NO_BUCKET
    meta["layer"] = -1
    links = np.full(num_keys + partitions * lists, -1, LINK)
    links["prev"][num_keys:] = links["next"][num_keys:] = np.arange(num_keys, len(links))  # empty lists
    entries = np.zeros(num_keys, ENTRY)
    if per_layer:
        entries["partition"] = np.arange(num_keys) // num_experts
    entries["layer"] = np.arange(num_keys) // num_experts
    entries["list"] = NOT_RESIDENT
    entries["bucket"] = NO_BUCKET

    buckets = np.zeros(partitions + num_keys if code == LFU else 0, BUCKET)
    if code == LFU:
        rings = np.arange(partitions)
        buckets["prev"][rings] = buckets["next"][rings] = rings
        buckets["next"][partitions:] = np.arange(partitions + 1, partitions + num_keys + 1)
        buckets["next"][-1] = NO_BUCKET
        meta["free_bucket"] = partitions
    return CacheState(
        policy=code,
        lists=lists,
        capacity=capacity,
        protected_capacity=int(capacity * fraction),
        meta=meta,
        links=links,
        entries=entries,
        parts=np.zeros(partitions, PARTITION),
        buckets=buckets,
        evicted=np.zeros(num_keys, np.int64),
        num_layers=num_layers,
        decay=1.0 - 1.0 / (HORIZON * num_experts),
        uses=np.zeros(num_keys if code == NEXT_USE else 0),
        inflation=np.ones(num_layers if code == NEXT_USE else 0),
    )


# --- lists ---------------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _unlink(links: np.ndarray, node: int) -> None:
    prev, after = links[node].prev, links[node].next
    links[prev].next = after
    links[after].prev = prev


@njit(cache=True, inline="always")
def _link_after(links: np.ndarray, node: int, at: int) -> None:
    after = links[at].next
    links[node].prev = at
    links[node].next = after
    links[after].prev = node
    links[at].next = node


@njit(cache=True, inline="always")
def _sentinel(state: CacheState, partition: int, list_: int) -> int:
    return len(state.entries) + partition * state.lists + list_


@njit(cache=True, inline="always")
def _move_to_end(state: CacheState, key: int, list_: int) -> None:
    """Unlink ``key`` and append it to list ``list_`` of its partition."""
    links = state.links
    sentinel = _sentinel(state, state.entries[key].partition, list_)
    _unlink(links, key)
    _link_after(links, key, links[sentinel].prev)
    state.entries[key].list = list_


@njit(cache=True, inline="always")
def _first_victim(state: CacheState, partition: int) -> int:
    links = state.links
    for list_ in range(state.lists):
        sentinel = _sentinel(state, partition, list_)
        if links[sentinel].next != sentinel:
            return links[sentinel].next
    return -1


# --- lfu buckets ---------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _new_bucket(state: CacheState, after: int, count: int, key: int) -> None:
    """Take a bucket off the free list, with ``count`` and its only key ``key``, and ring it after ``after``."""
    buckets = state.buckets
    bucket = state.meta[0].free_bucket
    state.meta[0].free_bucket = buckets[bucket].next
    following = buckets[after].next
    buckets[bucket].prev = after
    buckets[bucket].next = following
    buckets[following].prev = bucket
    buckets[after].next = bucket
    buckets[bucket].count = count
    buckets[bucket].tail = key
    buckets[bucket].size = 1
    state.entries[key].bucket = bucket


@njit(cache=True, inline="always")
def _join_bucket(state: CacheState, key: int, bucket: int) -> None:
    """Link ``key`` after ``bucket``'s most recent key, as its new most recent key."""
    buckets = state.buckets
    _link_after(state.links, key, buckets[bucket].tail)
    buckets[bucket].tail = key
    buckets[bucket].size += 1
    state.entries[key].bucket = bucket


@njit(cache=True, inline="always")
def _leave_bucket(state: CacheState, key: int) -> None:
    """Take ``key`` out of its bucket, which goes back to the free list once empty; ``key`` stays linked."""
    buckets = state.buckets
    bucket = state.entries[key].bucket
    state.entries[key].bucket = NO_BUCKET
    buckets[bucket].size -= 1
    if buckets[bucket].size == 0:
        prev, following = buckets[bucket].prev, buckets[bucket].next
        buckets[prev].next = following
        buckets[following].prev = prev
        buckets[bucket].next = state.meta[0].free_bucket
        state.meta[0].free_bucket = bucket
    elif buckets[bucket].tail == key:
        buckets[bucket].tail = state.links[key].prev


@njit(cache=True, inline="always")
def _lfu_enter(state: CacheState, key: int, partition: int) -> None:
    """Link a new ``key`` as the most recent of the keys used once."""
    ring = partition
    ones = state.buckets[ring].next
    if state.buckets[ones].count == 1:
        _join_bucket(state, key, ones)
    else:
        _link_after(state.links, key, _sentinel(state, partition, 0))
        _new_bucket(state, ring, 1, key)


@njit(cache=True, inline="always")
def _lfu_hit(state: CacheState, key: int) -> None:
    buckets = state.buckets
    bucket = state.entries[key].bucket
    count = buckets[bucket].count + 1
    following = buckets[bucket].next
    if buckets[following].count == count:
        _leave_bucket(state, key)
        _unlink(state.links, key)
        _join_bucket(state, key, following)
    elif buckets[bucket].size == 1:  # alone, and no key has the new count: the bucket can take it
        buckets[bucket].count = count
    else:
        tail = buckets[bucket].tail
        _leave_bucket(state, key)
        if tail != key:
            _unlink(state.links, key)
            _link_after(state.links, key, tail)
        _new_bucket(state, bucket, count, key)


# --- slru ----------------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _slru_hit(state: CacheState, key: int) -> None:
    entries, links = state.entries, state.links
    if entries[key].list == PROTECTED:
        _move_to_end(state, key, PROTECTED)
        return
    partition = entries[key].partition
    parts = state.parts
    _move_to_end(state, key, PROTECTED)
    parts[partition].protected += entries[key].size
    protected = _sentinel(state, partition, PROTECTED)
    while parts[partition].protected > state.protected_capacity:
        demoted = links[protected].next
        _move_to_end(state, demoted, PROBATION)
        parts[partition].protected -= entries[demoted].size


@njit(cache=True, inline="always")
def _insert(state: CacheState, key: int, nbytes: int, partition: int) -> None:
    entries = state.entries
    entries[key].size = nbytes
    entries[key].list = 0
    if state.policy == LFU:
        _lfu_enter(state, key, partition)
    elif state.policy == STATIC:  # pinned hottest first: each pin is the coldest so far
        _link_after(state.links, key, _sentinel(state, partition, 0))
    else:
        _link_after(state.links, key, state.links[_sentinel(state, partition, 0)].prev)
    state.parts[partition].used += nbytes
    state.meta[0].used += nbytes
    state.meta[0].count += 1


@njit(cache=True, inline="always")
def _remove(state: CacheState, key: int) -> None:
    entries = state.entries
    partition = entries[key].partition
    size = entries[key].size
    if state.policy == LFU:
        _leave_bucket(state, key)
    _unlink(state.links, key)
    if entries[key].list == PROTECTED:
        state.parts[partition].protected -= size
    entries[key].list = NOT_RESIDENT
    state.parts[partition].used -= size
    state.meta[0].used -= size
    state.meta[0].count -= 1


# --- next_use ------------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _rate_scale(state: CacheState) -> float:
    """What turns a key's use mass over its layer's inflation into its chance of use per visit: (1 - decay) times
    the accesses per visit."""
    meta = state.meta[0]
    return (1.0 - state.decay) * ((meta.hits + meta.misses) / meta.visits if meta.visits else 1.0)


@njit(cache=True, inline="always")
def _expected_next_use(state: CacheState, key: int, scale: float) -> float:
    """In layer visits from now; infinite for a key never accessed. ``scale``: ``_rate_scale(state)``."""
    layer = state.entries[key].layer
    rate = min(1.0, scale * state.uses[key] / state.inflation[layer])
    if rate <= 0.0:
        return np.inf
    layers = state.num_layers
    return (layer - state.meta[0].layer - 1) % layers + 1 + layers * (1.0 / rate - 1.0)


@njit(cache=True, inline="always")
def _count_use(state: CacheState, key: int) -> None:
    layer = state.entries[key].layer
    inflation = state.inflation[layer] / state.decay
    if inflation > RESCALE_AT:
        experts = len(state.entries) // state.num_layers
        state.uses[layer * experts : (layer + 1) * experts] /= inflation
        inflation = 1.0
    state.inflation[layer] = inflation
    state.uses[key] += inflation


@njit(cache=True, inline="always")
def _next_use_victims(state: CacheState, key: int, partition: int, need: int) -> int:
    """Choose the keys expected last until they free ``need`` bytes, into ``state.evicted``; 0 if one of them is
    expected sooner than ``key`` (then ``key`` is not admitted), else how many."""
    links, entries = state.links, state.entries
    sentinel = _sentinel(state, partition, 0)
    scale = _rate_scale(state)
    mine = _expected_next_use(state, key, scale)
    count = freed = 0
    while freed < need:
        victim, latest = -1, -1.0
        node = links[sentinel].next
        while node != sentinel:
            if entries[node].list != CHOSEN:
                expected = _expected_next_use(state, node, scale)
                if expected > latest:
                    victim, latest = node, expected
            node = links[node].next
        if latest < mine:
            break
        entries[victim].list = CHOSEN
        state.evicted[count] = victim
        count += 1
        freed += entries[victim].size
    for n in range(count):
        entries[state.evicted[n]].list = 0
    return count if freed >= need else 0


@njit(cache=True, inline="always")
def cache_visit(state: CacheState, layer: int) -> None:
    """A forward pass reaches ``layer``; its accesses follow. Only next_use keeps time, in visits."""
    if state.policy != NEXT_USE:
        return
    state.meta[0].layer = layer
    state.meta[0].visits += 1


# --- the cache -----------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def cache_contains(state: CacheState, key: int) -> bool:
    return state.entries[key].list != NOT_RESIDENT


@njit(cache=True, inline="always")
def cache_access(state: CacheState, key: int) -> bool:
    """A demand access: True on a hit, which counts as a use; a miss changes only the miss counts (and, under
    next_use, the key's use rate, as a hit does)."""
    partition = state.entries[key].partition
    policy = state.policy
    if policy == NEXT_USE:
        _count_use(state, key)
    if state.entries[key].list == NOT_RESIDENT:
        state.meta[0].misses += 1
        state.parts[partition].misses += 1
        return False
    state.meta[0].hits += 1
    state.parts[partition].hits += 1
    if policy == LRU:
        _move_to_end(state, key, 0)
    elif policy == LFU:
        _lfu_hit(state, key)
    elif policy == SLRU:
        _slru_hit(state, key)
    return True


@njit(cache=True, inline="always")
def cache_admit(state: CacheState, key: int, nbytes: int) -> int:
    """Make ``key`` resident with ``nbytes >= 0``, evicting as few keys as the policy's order allows.

    The victims go to ``state.evicted[:n]``, first victim first; returns n. Nothing happens if ``key`` is
    resident, if ``nbytes`` exceeds the partition's capacity, under the static and none policies, or when
    next_use declines it.
    """
    policy, capacity = state.policy, state.capacity
    if policy in (STATIC, NONE) or state.entries[key].list != NOT_RESIDENT or nbytes > capacity:
        return 0
    partition = state.entries[key].partition
    room = capacity - nbytes
    evicted = 0
    if policy == NEXT_USE:
        need = state.parts[partition].used - room
        if need > 0:
            evicted = _next_use_victims(state, key, partition, need)
            if evicted == 0:
                return 0
            for n in range(evicted):
                _remove(state, state.evicted[n])
    while state.parts[partition].used > room:
        victim = _first_victim(state, partition)
        _remove(state, victim)
        state.evicted[evicted] = victim
        evicted += 1
    _insert(state, key, nbytes, partition)
    return evicted


@njit(cache=True)
def cache_discard(state: CacheState, key: int) -> None:
    """Drop ``key`` if it is resident."""
    if state.entries[key].list != NOT_RESIDENT:
        _remove(state, key)


@njit(cache=True)
def cache_keys(state: CacheState) -> np.ndarray:
    """The resident keys, next victim first (next_use: in admission order); partition by partition."""
    links = state.links
    keys = np.empty(state.meta[0].count, np.int64)
    n = 0
    for sentinel in range(len(state.entries), len(links)):
        node = links[sentinel].next
        while node != sentinel:
            keys[n] = node
            n += 1
            node = links[node].next
    return keys


@njit(cache=True)
def cache_pin(state: CacheState, ranked: np.ndarray, sizes: np.ndarray) -> None:
    """Static only (a no-op otherwise): replace the resident set with every key of ``ranked`` (hottest first,
    ``sizes[i] >= 0`` the size of ``ranked[i]``) that still fits its partition, in rank order; the others, and
    repeats of a key already pinned, are skipped."""
    if state.policy != STATIC:
        return
    for key in cache_keys(state):
        _remove(state, key)
    capacity = state.capacity
    for i in range(len(ranked)):
        key, nbytes = ranked[i], sizes[i]
        partition = state.entries[key].partition
        if state.entries[key].list == NOT_RESIDENT and nbytes <= capacity - state.parts[partition].used:
            _insert(state, key, nbytes, partition)


@njit(cache=True)
def rank_keys(counts: np.ndarray) -> np.ndarray:
    """The key ids with a count above 0, by decreasing count, ties by smaller id first."""
    ids = np.flatnonzero(counts > 0)
    return ids[np.argsort(-counts[ids], kind="mergesort")]
