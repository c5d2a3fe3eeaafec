"""The expert store: every access to expert weights goes through it; experts are never loaded wholesale.

Per MoE layer the decoder calls ``request(layer, experts)`` (the cache records the accesses; misses start
reading, ``top_k`` of them at a time), then ``route_done`` with the layer's routing so that the predictor, if
any, prefetches the next layers' experts, then ``get`` once for each expert, in the order requested (waiting
for its read if needed; each ``get`` starts the next read, and frees the previous expert unless cached).

What the store holds, in float32 (``cache_format = "dequantized"``) or as stored (``"packed"``, computed by the
fused kernels; under ``mmap`` these are views of the mapping, so the page cache decides what stays in RAM):

- the cache: experts the policy keeps, within ``cache_bytes`` (the policy is plain logic, ``cache_policy``);
- staged prefetches: experts read ahead for a later layer, at most ``prefetch_depth x (top_k +
  prefetch_extra)`` of them; used ones move into the cache like any miss, the others are cancelled (counted
  as wasted) when their layer comes;
- the current layer's experts: at most ``top_k`` being read and the one being computed, so that a prefill
  touching hundreds of experts per layer needs no more memory than a decode step; and cached experts evicted
  while the layer runs that it has yet to compute (kept until the next layer).

Buffers are pooled: after warm-up no array is allocated per expert.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field, fields

import numpy as np

from engine.cache_policy import StaticPolicy, make_cache
from engine.config import EngineConfig
from engine.expert_io import ExpertReader, Fetch, IoStats
from engine.expert_layout import ExpertData, ExpertLayout, ExpertWeights, PackedExpert
from engine.predictors import Predictor

Key = tuple[int, int]


@dataclass
class StoreStats:
    hits: int = 0  # accesses served from the engine's cache
    misses: int = 0  # accesses that needed a read (or a prefetched copy)
    experts_loaded: int = 0  # experts read on demand or by a prefetch that was used
    prefetch_issued: int = 0
    prefetch_used: int = 0  # prefetched experts that their layer asked for
    prefetch_timely: int = 0  # ... and that had arrived when it did
    prefetch_wasted: int = 0  # prefetched experts that their layer did not ask for
    stall_seconds: float = 0.0  # time the compute waited for reads
    wasted_bytes: int = 0  # bytes read for prefetches nobody used
    io: IoStats = field(default_factory=IoStats)  # the reader's counters, kept by its threads

    @property
    def bytes_read(self) -> int:
        """Bytes requested from the files (page-widened under direct I/O)."""
        return self.io.bytes_read

    @property
    def reads(self) -> int:
        return self.io.reads

    @property
    def read_seconds(self) -> float:
        return self.io.read_seconds

    def snapshot(self) -> dict[str, float]:
        """Every counter, the reader's included, as plain numbers."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "io"}
        return {**values, "bytes_read": self.bytes_read, "reads": self.reads, "read_seconds": self.read_seconds}


class ExpertStore:
    """Serves expert weights by (layer, expert), through the cache, the prefetches and the reader."""

    def __init__(
        self,
        layouts: dict[Key, ExpertLayout],
        hidden_size: int,
        intermediate_size: int,
        config: EngineConfig,
        num_layers: int,
        top_k: int,
        predictor: Predictor | None = None,
        reader: ExpertReader | None = None,
    ) -> None:
        """``reader``: where reads go; by default an ``ExpertReader`` for ``config`` (the simulator brings one that
        only keeps time)."""
        self.layouts = layouts
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.config = config
        policy = config.cache_policy if config.cache_bytes else "none"
        self.cache = make_cache(policy, config.cache_scope, config.cache_bytes, num_layers)
        self.reader = reader or ExpertReader(
            list(layouts.values()),
            config.io_mode,
            config.io_block_bytes,
            config.io_threads,
            hidden_size,
            intermediate_size,
        )
        self.packed = config.cache_format == "packed"
        if self.packed:  # the slot a read lands in, page padding included
            self.entry_bytes = self.reader.slots.slot_bytes
        else:
            self.entry_bytes = 3 * hidden_size * intermediate_size * 4
        self.stats = StoreStats(io=self.reader.stats)
        self.predictor = predictor
        self.staged_limit = config.prefetch_depth * (top_k + config.prefetch_extra)
        self.window = top_k  # a layer's reads in flight
        moe_layers = sorted({layer for layer, _ in layouts})
        depth = config.prefetch_depth
        self._ahead = {layer: moe_layers[n + 1 : n + 1 + depth] for n, layer in enumerate(moe_layers)}
        self._cached: dict[Key, ExpertData] = {}
        self._staged: dict[Key, Fetch] = {}
        # expert -> its data, the read bringing it, or None until its read starts; removed by its get
        self._current: dict[int, ExpertData | Fetch | None] = {}
        self._waiting: deque[int] = deque()  # the current layer's misses whose reads have not started
        self._reading: set[int] = set()  # the current layer's experts read by request or get, not yet taken
        self._layer = -1
        self._retiring: list[ExpertData] = []  # freed at the next request
        self._done: list[ExpertData] = []  # freed at the next get or request
        self._cancelled: list[Fetch] = []
        self._free: list[ExpertWeights] = []
        self._forward_passes = 0
        self._profile: Counter[Key] | None = Counter() if policy == "static" else None

    def begin_forward(self) -> None:
        """A forward pass starts. Under the static policy the first pass is the profiling pass: before the
        second, the experts it used most are pinned (read into the cache, as many as ``cache_bytes`` holds)."""
        self._forward_passes += 1
        if self._forward_passes == 2 and self._profile is not None:
            self._pin(StaticPolicy.rank(self._profile))
            self._profile = None

    def request(self, layer: int, experts: list[int]) -> None:
        """Record this layer's accesses and start reading the first ``top_k`` misses."""
        self._free_done()
        if self._retiring:
            for data in self._retiring:
                self._release(data)
            self._retiring.clear()
        if self._cancelled:
            self._sweep_cancelled()
        staged = self._staged
        if staged:
            self._cancel_unused(layer, experts)
        self._layer = layer
        current, waiting = self._current, self._waiting
        current.clear()
        waiting.clear()
        access, cached = self.cache.access, self._cached
        hits = used = timely = 0
        for expert in experts:
            key = (layer, expert)
            if access(key):
                hits += 1
                current[expert] = cached[key]
                continue
            read = staged.pop(key, None) if staged else None
            if read is not None:
                used += 1
                timely += read.done
            else:
                waiting.append(expert)
            current[expert] = read
        self._reading.clear()
        self._read_ahead()
        stats = self.stats
        stats.hits += hits
        stats.misses += len(experts) - hits
        stats.experts_loaded += len(experts) - hits
        stats.prefetch_used += used
        stats.prefetch_timely += timely

    def get(self, layer: int, expert: int) -> ExpertData:
        """The weights of an expert requested for this layer, once; valid until the next ``get`` or ``request``."""
        if layer != self._layer or expert not in self._current:
            raise KeyError(f"expert {expert} of layer {layer} was not requested for the current layer, or was taken")
        if self._done:
            self._free_done()
        fetch = self._current.pop(expert)
        if fetch is None:  # taken out of order: its read had not started
            self._waiting.remove(expert)
            fetch = self.reader.fetch(self.layouts[layer, expert], self._take())
        if not isinstance(fetch, Fetch):
            return fetch
        self._reading.discard(expert)
        self._read_ahead()
        if fetch.done:
            data = fetch.wait()  # raises the read's error, if any
        else:
            began = time.perf_counter()
            data = fetch.wait()
            self.stats.stall_seconds += time.perf_counter() - began
        evicted = self.cache.admit((layer, expert), self.entry_bytes)
        for victim in evicted:  # one this layer has yet to compute stays until the next layer
            still_needed = victim[0] == layer and victim[1] in self._current
            (self._retiring if still_needed else self._done).append(self._cached.pop(victim))
        if (layer, expert) in self.cache:
            self._cached[layer, expert] = data
        else:
            self._done.append(data)
        return data

    def route_done(self, layer: int, h: np.ndarray, experts: np.ndarray, probs: np.ndarray) -> None:
        """Count the tokens each expert served (the static policy's profile); let the predictor learn from this
        layer's routing, then prefetch the next layers' likely experts."""
        if self._profile is not None:
            self._profile.update((layer, expert) for expert in experts.reshape(-1).tolist())
        predictor = self.predictor
        if predictor is None:
            return
        predictor.observe(layer, h, experts, probs)
        count = experts.shape[1] + self.config.prefetch_extra
        staged, cache, limit = self._staged, self.cache, self.staged_limit
        for target in self._ahead[layer]:
            for expert in predictor.propose(layer, h, experts, target, count):
                if len(staged) >= limit:
                    return
                key = (target, expert)
                if key in staged or key in cache:
                    continue
                staged[key] = self.reader.fetch(self.layouts[key], self._take())
                self.stats.prefetch_issued += 1

    def is_resident(self, layer: int, expert: int) -> bool:
        """Whether the expert is in RAM now (cached, or prefetched and arrived): using it costs no read."""
        key = (layer, expert)
        staged = self._staged.get(key)
        return key in self.cache or (staged is not None and staged.done)

    def close(self) -> None:
        self.reader.close()  # waits for the reads in flight

    def _pin(self, ranked: list[Key]) -> None:
        self.cache.pin([(key, self.entry_bytes) for key in ranked])
        pinned = self.cache.keys()
        fetches = {key: self.reader.fetch(self.layouts[key], self._take()) for key in pinned}
        for key, fetch in fetches.items():
            self._cached[key] = fetch.wait()

    def _read_ahead(self) -> None:
        """Start the current layer's next reads, up to ``window`` in flight."""
        waiting, current, layer = self._waiting, self._current, self._layer
        while waiting and len(self._reading) < self.window:
            expert = waiting.popleft()
            current[expert] = self.reader.fetch(self.layouts[layer, expert], self._take())
            self._reading.add(expert)

    def _free_done(self) -> None:
        if self._done:
            for data in self._done:
                self._release(data)
            self._done.clear()

    def _release(self, data: ExpertData) -> None:
        if isinstance(data, PackedExpert):
            if data.buffer is not None:
                self.reader.give_slot(data.buffer)
        else:
            self._free.append(data)

    def _take(self) -> ExpertWeights | None:
        """Arrays for a dequantized read; None for a packed one (the reader brings its own slot)."""
        if self.packed:
            return None
        if self._free:
            return self._free.pop()
        h, i = self.hidden_size, self.intermediate_size
        return ExpertWeights(np.empty((2 * i, h), np.float32), np.empty((h, i), np.float32))

    def _cancel_unused(self, layer: int, experts: list[int]) -> None:
        """Cancel the staged prefetches this layer has not asked for, and those of earlier layers."""
        staged = self._staged
        for key in [key for key in staged if key[0] < layer or (key[0] == layer and key[1] not in experts)]:
            fetch = staged.pop(key)
            fetch.cancel()
            self._cancelled.append(fetch)
            self.stats.prefetch_wasted += 1

    def _sweep_cancelled(self) -> None:
        still = []
        for fetch in self._cancelled:
            if fetch.done:
                self.stats.wasted_bytes += fetch.bytes_read
                if fetch.result is not None:  # it finished before the cancel reached it
                    self._release(fetch.result)
                elif fetch.weights is not None:
                    self._free.append(fetch.weights)
            else:
                still.append(fetch)
        self._cancelled = still
