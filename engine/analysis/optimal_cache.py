"""The best hit count any cache could reach on a known access sequence: Belady's MIN, as the expert store caches.

The store looks a layer's experts up together (``request``) and admits the misses after, so accesses come in
batches: a key is a hit if it was resident when its batch began. After each batch, any of the keys resident or
just read may stay. Keeping the ``capacity`` keys whose next use comes soonest (Belady 1966, "farthest in
future" evicted, with bypass) is optimal here too: the exchange argument of the classic proof carries over
batch by batch. The store charges every expert the same bytes (one slot size per store), so a byte budget is a
count of ``capacity_bytes // entry_bytes`` keys; no policy can do better than this on the same sequence.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence

NEVER = float("inf")


def optimal_hits(batches: Sequence[Sequence[Hashable]], capacity: int, counted: Sequence[bool] | None = None) -> int:
    """Hits in the ``counted`` batches (all by default) of the optimal cache holding ``capacity`` keys.

    A key repeated within a batch counts once. The other batches' lookups are not scored, but what they read may
    stay (so the bound holds for, say, the decode steps after a warm-up and a prefill). A key whose next lookup is
    not scored is worth nothing until then, when it can be had again for free: it goes first, and among the
    others the one used latest, as before.
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    batches = [list(dict.fromkeys(batch)) for batch in batches]
    counted = [True] * len(batches) if counted is None else list(counted)
    if len(counted) != len(batches):
        raise ValueError(f"counted has {len(counted)} entries for {len(batches)} batches")
    if capacity == 0:
        return 0
    next_use: list[list[float]] = [[] for _ in batches]
    upcoming: dict[Hashable, float] = {}
    for i in range(len(batches) - 1, -1, -1):
        next_use[i] = [upcoming.get(key, NEVER) for key in batches[i]]
        for key in batches[i]:
            upcoming[key] = i if counted[i] else NEVER
    resident: dict[Hashable, float] = {}
    heap: list[tuple[float, int, Hashable]] = []
    tiebreak = hits = 0
    for batch, uses, scored in zip(batches, next_use, counted, strict=True):
        for key, use in zip(batch, uses, strict=True):
            if scored and key in resident:
                hits += 1
            if use == NEVER:
                resident.pop(key, None)
                continue
            if resident.get(key) == use:
                continue
            resident[key] = use
            heapq.heappush(heap, (-use, tiebreak, key))
            tiebreak += 1
        while len(resident) > capacity:
            use, _, key = heapq.heappop(heap)
            if resident.get(key) == -use:
                del resident[key]
    return hits
