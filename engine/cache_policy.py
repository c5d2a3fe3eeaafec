"""Which experts stay in RAM: replacement policies over (layer, expert) keys under a byte budget.

A policy only tracks keys and their sizes, never weights, and does no I/O: the engine's expert cache
asks it what to keep and what to evict, and the trace simulator replays recorded routing through the
very same classes, so hot methods are kept lean (dicts and OrderedDicts, no per-call allocations).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

Key = tuple[int, int]  # (layer, expert)
SCOPES = ("global", "per_layer")


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class CachePolicy(ABC):
    """Resident keys and their sizes; ``used_bytes`` never exceeds ``capacity_bytes``.

    The engine's pattern is ``if not cache.access(key): cache.admit(key, nbytes)``; a prefetch admits
    without an access. ``hits`` and ``misses`` count ``access`` calls.
    """

    name: ClassVar[str]

    def __init__(self, capacity_bytes: int) -> None:
        _check_count("capacity_bytes", capacity_bytes, 0)
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0

    @abstractmethod
    def __contains__(self, key: Key) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def access(self, key: Key) -> bool:
        """A demand access: True on a hit, which counts as a use; a miss changes only ``misses``."""

    @abstractmethod
    def admit(self, key: Key, nbytes: int) -> list[Key]:
        """Make ``key`` resident, evicting as few keys as the policy's order allows; returns them, first victim first.

        Nothing happens if ``key`` is resident, if ``nbytes > capacity_bytes`` or if the policy declines.
        """

    @abstractmethod
    def discard(self, key: Key) -> None:
        """Drop ``key`` if it is resident."""

    @abstractmethod
    def keys(self) -> list[Key]:
        """The resident keys, next victim first."""


def _negative_size(nbytes: int) -> ValueError:
    return ValueError(f"nbytes must be >= 0, got {nbytes!r}")


class LRUPolicy(CachePolicy):
    """Evicts the least recently accessed or admitted key."""

    name = "lru"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._sizes: OrderedDict[Key, int] = OrderedDict()  # least recent first

    def __contains__(self, key: Key) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def access(self, key: Key) -> bool:
        sizes = self._sizes
        if key in sizes:
            sizes.move_to_end(key)
            self.hits += 1
            return True
        self.misses += 1
        return False

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        if nbytes < 0:
            raise _negative_size(nbytes)
        sizes, capacity = self._sizes, self.capacity_bytes
        if key in sizes or nbytes > capacity:
            return []
        evicted = []
        used = self.used_bytes + nbytes
        while used > capacity:
            victim, size = sizes.popitem(last=False)
            used -= size
            evicted.append(victim)
        sizes[key] = nbytes
        self.used_bytes = used
        return evicted

    def discard(self, key: Key) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.used_bytes -= size

    def keys(self) -> list[Key]:
        return list(self._sizes)


class _Bucket:
    """The resident keys used ``count`` times, least recent first; buckets form a ring in increasing count."""

    __slots__ = ("count", "next", "prev", "sizes")

    def __init__(self, count: int) -> None:
        self.count = count
        self.sizes: OrderedDict[Key, int] = OrderedDict()
        self.prev = self.next = self

    def insert_after(self, count: int) -> _Bucket:
        new = _Bucket(count)
        new.prev, new.next = self, self.next
        self.next.prev = new
        self.next = new
        return new

    def unlink(self) -> None:
        self.prev.next = self.next
        self.next.prev = self.prev


class LFUPolicy(CachePolicy):
    """Evicts the key with the fewest uses since its admission, the least recent among equals.

    Admission counts as one use and each hit as one more; misses are not counted, and a key's count is
    forgotten when it leaves. O(1) per operation: keys sit in per-count buckets linked in count order.
    """

    name = "lfu"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._ring = _Bucket(0)  # sentinel: ring.next holds the least used keys
        self._bucket_of: dict[Key, _Bucket] = {}

    def __contains__(self, key: Key) -> bool:
        return key in self._bucket_of

    def __len__(self) -> int:
        return len(self._bucket_of)

    def access(self, key: Key) -> bool:
        bucket = self._bucket_of.get(key)
        if bucket is None:
            self.misses += 1
            return False
        self.hits += 1
        count = bucket.count + 1
        target = bucket.next
        if target.count != count:
            if len(bucket.sizes) == 1:  # alone, and no key has the new count: the bucket can take it
                bucket.count = count
                return True
            target = bucket.insert_after(count)
        target.sizes[key] = bucket.sizes.pop(key)
        self._bucket_of[key] = target
        if not bucket.sizes:
            bucket.unlink()
        return True

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        if nbytes < 0:
            raise _negative_size(nbytes)
        bucket_of, capacity = self._bucket_of, self.capacity_bytes
        if key in bucket_of or nbytes > capacity:
            return []
        evicted = []
        ring = self._ring
        used = self.used_bytes + nbytes
        while used > capacity:
            bucket = ring.next
            victim, size = bucket.sizes.popitem(last=False)
            if not bucket.sizes:
                bucket.unlink()
            del bucket_of[victim]
            used -= size
            evicted.append(victim)
        ones = ring.next
        if ones.count != 1:
            ones = ring.insert_after(1)
        ones.sizes[key] = nbytes
        bucket_of[key] = ones
        self.used_bytes = used
        return evicted

    def discard(self, key: Key) -> None:
        bucket = self._bucket_of.pop(key, None)
        if bucket is not None:
            self.used_bytes -= bucket.sizes.pop(key)
            if not bucket.sizes:
                bucket.unlink()

    def keys(self) -> list[Key]:
        keys: list[Key] = []
        bucket = self._ring.next
        while bucket is not self._ring:
            keys.extend(bucket.sizes)
            bucket = bucket.next
        return keys


class SLRUPolicy(CachePolicy):
    """Segmented LRU (Karedla, Love and Wherry 1994): keys used once cannot push out keys used again.

    New keys enter the probationary segment; a hit there promotes the key to the protected segment, which
    holds at most ``protected_fraction`` of the capacity and demotes its least recent keys back to the
    probationary segment's most recent end. Victims are the probationary segment's least recent keys, then,
    once it is empty, the protected segment's.
    """

    name = "slru"

    def __init__(self, capacity_bytes: int, protected_fraction: float = 0.8) -> None:
        super().__init__(capacity_bytes)
        fraction = protected_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
            raise ValueError(f"protected_fraction must be a number in [0, 1], got {fraction!r}")
        self.protected_fraction = protected_fraction
        self.protected_capacity_bytes = int(capacity_bytes * protected_fraction)
        self.protected_bytes = 0
        self._probation: OrderedDict[Key, int] = OrderedDict()  # least recent first
        self._protected: OrderedDict[Key, int] = OrderedDict()

    def __contains__(self, key: Key) -> bool:
        return key in self._probation or key in self._protected

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def access(self, key: Key) -> bool:
        protected = self._protected
        if key in protected:
            protected.move_to_end(key)
            self.hits += 1
            return True
        probation = self._probation
        if key not in probation:
            self.misses += 1
            return False
        self.hits += 1
        size = probation.pop(key)
        protected[key] = size
        self.protected_bytes += size
        while self.protected_bytes > self.protected_capacity_bytes:
            demoted, size = protected.popitem(last=False)
            probation[demoted] = size
            self.protected_bytes -= size
        return True

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        if nbytes < 0:
            raise _negative_size(nbytes)
        probation, protected, capacity = self._probation, self._protected, self.capacity_bytes
        if key in probation or key in protected or nbytes > capacity:
            return []
        evicted = []
        used = self.used_bytes + nbytes
        while used > capacity:
            if probation:
                victim, size = probation.popitem(last=False)
            else:
                victim, size = protected.popitem(last=False)
                self.protected_bytes -= size
            used -= size
            evicted.append(victim)
        probation[key] = nbytes
        self.used_bytes = used
        return evicted

    def discard(self, key: Key) -> None:
        size = self._probation.pop(key, None)
        if size is None:
            size = self._protected.pop(key, None)
            if size is None:
                return
            self.protected_bytes -= size
        self.used_bytes -= size

    def keys(self) -> list[Key]:
        return [*self._probation, *self._protected]


class StaticPolicy(CachePolicy):
    """A fixed set chosen by ``pin`` (e.g. from a profiling pass's counts); ``admit`` never inserts.

    ``keys()`` lists the pinned keys coldest first, though nothing is ever evicted.
    """

    name = "static"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._sizes: dict[Key, int] = {}  # hottest first

    @staticmethod
    def rank(counts: Mapping[Key, int]) -> list[Key]:
        """Keys by decreasing count, ties by key."""
        return sorted(counts, key=lambda key: (-counts[key], key))

    def pin(self, ranked: Iterable[tuple[Key, int]]) -> None:
        """Replace the pinned set with every key, hottest first, that still fits; the others are skipped."""
        sizes: dict[Key, int] = {}
        used = 0
        for key, nbytes in ranked:
            if nbytes < 0:
                raise _negative_size(nbytes)
            if key not in sizes and used + nbytes <= self.capacity_bytes:
                sizes[key] = nbytes
                used += nbytes
        self._sizes = sizes
        self.used_bytes = used

    def __contains__(self, key: Key) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def access(self, key: Key) -> bool:
        if key in self._sizes:
            self.hits += 1
            return True
        self.misses += 1
        return False

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        if nbytes < 0:
            raise _negative_size(nbytes)
        return []

    def discard(self, key: Key) -> None:
        self.used_bytes -= self._sizes.pop(key, 0)

    def keys(self) -> list[Key]:
        return list(reversed(self._sizes))


class NoCache(CachePolicy):
    """Holds nothing, whatever its capacity: every access misses."""

    name = "none"

    def __contains__(self, key: Key) -> bool:
        return False

    def __len__(self) -> int:
        return 0

    def access(self, key: Key) -> bool:
        self.misses += 1
        return False

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        if nbytes < 0:
            raise _negative_size(nbytes)
        return []

    def discard(self, key: Key) -> None:
        pass

    def keys(self) -> list[Key]:
        return []


POLICIES: dict[str, type[CachePolicy]] = {
    cls.name: cls for cls in (LRUPolicy, LFUPolicy, SLRUPolicy, StaticPolicy, NoCache)
}


def make_policy(name: str, capacity_bytes: int, **kw: Any) -> CachePolicy:
    """The policy called ``name``; ``kw`` are its options (``protected_fraction`` for slru)."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {name!r}")
    return POLICIES[name](capacity_bytes, **kw)


class PerLayerCache(CachePolicy):
    """One policy per layer, routed by ``key[0]``, each with ``capacity_bytes // num_layers``.

    The remainder of that division is never used. ``keys()`` lists layer 0's keys in its eviction order,
    then layer 1's, and so on; ``hits`` and ``misses`` are totals over the layers.
    """

    name = "per_layer"

    def __init__(self, policy_name: str, capacity_bytes: int, num_layers: int, **kw: Any) -> None:
        super().__init__(capacity_bytes)
        _check_count("num_layers", num_layers, 1)
        self.policy_name = policy_name
        self.layer_capacity_bytes = capacity_bytes // num_layers
        self.layers = [make_policy(policy_name, self.layer_capacity_bytes, **kw) for _ in range(num_layers)]

    def __contains__(self, key: Key) -> bool:
        return key in self.layers[key[0]]

    def __len__(self) -> int:
        return sum(len(layer) for layer in self.layers)

    def access(self, key: Key) -> bool:
        if self.layers[key[0]].access(key):
            self.hits += 1
            return True
        self.misses += 1
        return False

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        layer = self.layers[key[0]]
        before = layer.used_bytes
        evicted = layer.admit(key, nbytes)
        self.used_bytes += layer.used_bytes - before
        return evicted

    def discard(self, key: Key) -> None:
        layer = self.layers[key[0]]
        before = layer.used_bytes
        layer.discard(key)
        self.used_bytes += layer.used_bytes - before

    def keys(self) -> list[Key]:
        keys: list[Key] = []
        for layer in self.layers:
            keys += layer.keys()
        return keys

    def pin(self, ranked: Iterable[tuple[Key, int]]) -> None:
        """For the static policy: each layer pins, within its share, its own keys in rank order."""
        layers = [layer for layer in self.layers if isinstance(layer, StaticPolicy)]
        if len(layers) != len(self.layers):
            raise TypeError(f"pin needs the static policy, not {self.policy_name!r}")
        per_layer: list[list[tuple[Key, int]]] = [[] for _ in layers]
        for key, nbytes in ranked:
            per_layer[key[0]].append((key, nbytes))
        for layer, items in zip(layers, per_layer, strict=True):
            layer.pin(items)
        self.used_bytes = sum(layer.used_bytes for layer in layers)


def make_cache(policy: str, scope: str, capacity_bytes: int, num_layers: int, **kw: Any) -> CachePolicy:
    """A ``policy`` over the whole budget (scope ``global``) or one per layer (``per_layer``)."""
    if scope == "global":
        return make_policy(policy, capacity_bytes, **kw)
    if scope == "per_layer":
        return PerLayerCache(policy, capacity_bytes, num_layers, **kw)
    raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
