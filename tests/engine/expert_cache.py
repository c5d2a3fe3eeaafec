"""The cache policies for Python callers: (layer, expert) keys over the compiled functions, as the tests drive
them."""

from __future__ import annotations

from collections.abc import Iterable
from operator import index

import numpy as np

from engine.streaming.cache_policy import (
    cache_access,
    cache_admit,
    cache_contains,
    cache_discard,
    cache_keys,
    cache_pin,
    cache_visit,
    new_cache_state,
)

Key = tuple[int, int]  # (layer, expert)


class ExpertCache:
    """The cache over (layer, expert) keys, for Python callers; ``state`` is what njit code takes.

    The engine's pattern is ``if not cache.access(key): cache.admit(key, nbytes)``; a prefetch admits without
    an access. ``hits`` and ``misses`` count ``access`` calls; ``used_bytes`` never exceeds ``capacity_bytes``.
    """

    def __init__(
        self,
        policy: str,
        scope: str,
        capacity_bytes: int,
        num_layers: int,
        num_experts: int,
        protected_fraction: float = 0.8,
    ) -> None:
        self.state = new_cache_state(policy, scope, capacity_bytes, num_layers, num_experts, protected_fraction)
        self.policy, self.scope = policy, scope
        self.capacity_bytes = capacity_bytes
        self.num_layers, self.num_experts = num_layers, num_experts
        self.layer_capacity_bytes = self.state.capacity
        self.protected_fraction = protected_fraction

    @property
    def hits(self) -> int:
        return int(self.state.meta["hits"][0])

    @property
    def misses(self) -> int:
        return int(self.state.meta["misses"][0])

    @property
    def used_bytes(self) -> int:
        return int(self.state.meta["used"][0])

    def _key_id(self, key: Key) -> int:
        layer, expert = key
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
            raise ValueError(f"key {key!r} is outside {self.num_layers} layers x {self.num_experts} experts")
        return index(layer) * self.num_experts + index(expert)

    def visit(self, layer: int) -> None:
        """A forward pass reaches ``layer`` (next_use keeps time in visits; the others ignore it)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer!r} is outside {self.num_layers} layers")
        cache_visit(self.state, index(layer))

    def access(self, key: Key) -> bool:
        """A demand access: True on a hit, which counts as a use; a miss changes only ``misses``."""
        return cache_access(self.state, self._key_id(key))

    def admit(self, key: Key, nbytes: int) -> list[Key]:
        """Make ``key`` resident, evicting as few keys as the policy's order allows; returns them, first victim
        first. Nothing happens if ``key`` is resident, if ``nbytes > layer_capacity_bytes`` or if the policy
        declines."""
        key_id, nbytes = self._key_id(key), index(nbytes)
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
        if nbytes > self.layer_capacity_bytes:
            return []
        n = cache_admit(self.state, key_id, nbytes)
        return [divmod(victim, self.num_experts) for victim in self.state.evicted[:n].tolist()]

    def discard(self, key: Key) -> None:
        """Drop ``key`` if it is resident."""
        cache_discard(self.state, self._key_id(key))

    def keys(self) -> list[Key]:
        """The resident keys, next victim first (per layer: layer 0's, then layer 1's, ...)."""
        return [divmod(key, self.num_experts) for key in cache_keys(self.state).tolist()]

    def __contains__(self, key: Key) -> bool:
        return cache_contains(self.state, self._key_id(key))

    def __len__(self) -> int:
        return int(self.state.meta["count"][0])

    def pin(self, ranked: Iterable[tuple[Key, int]]) -> None:
        """Static only: replace the pinned set with every key, hottest first, that still fits (per layer: its
        layer's share); the others are skipped."""
        if self.policy != "static":
            raise TypeError(f"pin needs the static policy, not {self.policy!r}")
        ids, sizes = [], []
        for key, nbytes in ranked:
            ids.append(self._key_id(key))
            size = index(nbytes)
            if size < 0:
                raise ValueError(f"nbytes must be >= 0, got {size!r}")
            sizes.append(min(size, self.layer_capacity_bytes + 1))  # no larger size could fit either
        cache_pin(self.state, np.array(ids, np.int64), np.array(sizes, np.int64))
