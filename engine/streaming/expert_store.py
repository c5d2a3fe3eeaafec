"""The expert store: every access to expert weights goes through it; experts are never loaded wholesale.

Per MoE layer the decoder calls ``request(layer, experts)`` (the cache records the accesses; misses start
reading, ``top_k`` of them at a time), then ``route_done`` with the layer's routing so that the predictor, if
any, prefetches the next layers' experts, then ``get`` once for each expert, in the order requested (waiting
for its read if needed; each ``get`` starts the next read, and frees the previous expert unless cached), or
``get_all`` for all of them at once (a decode step: they stay until the next ``request``).

What the store holds, in float32 (``cache_format = "dequantized"``) or as stored (``"packed"``, computed by the
fused kernels; under ``mmap`` these are views of the mapping, so the page cache decides what stays in RAM):

- the cache: experts the policy keeps, within ``cache_bytes``;
- staged prefetches: experts read ahead for a later layer, at most ``prefetch_depth x (top_k +
  prefetch_extra)`` of them; used ones move into the cache like any miss, the others are cancelled (counted
  as wasted) when their layer comes;
- the current layer's experts: at most ``top_k`` being read and the one being computed, so that a prefill
  touching hundreds of experts per layer needs no more memory than a decode step; and cached experts evicted
  while the layer runs that it has yet to compute (kept until the next layer).

What to cache, stage, read, cancel and count is decided by the expert ledger (``expert_ledger``, compiled, the
very code the trace simulator replays); the store carries it out with the reader's reads and holds the data.
Buffers are pooled: after warm-up no array is allocated per expert.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.config import EngineConfig
from engine.formats.expert_layout import ExpertData, ExpertLayout, ExpertWeights, PackedExpert
from engine.streaming import expert_ledger as ledger
from engine.streaming.expert_io import ExpertReader, Fetch, IoStats
from engine.streaming.predictors import GATE_LOOKAHEAD, NO_PREDICTOR, PREVIOUS_TOKEN, fit, new_predictor

Key = tuple[int, int]
RouterScores = Callable[[int, np.ndarray], np.ndarray]  # (layer, inputs [T, H]) -> that router's scores [T, E]
_NO_RANKING = np.empty(0, np.int64)
_NO_LOOKAHEAD = np.empty((0, 0, 0), np.int64)


def _counter(index: int) -> property:
    return property(lambda stats: int(stats.counters[index]))


@dataclass
class StoreStats:
    """The ledger's counters and the store's own."""

    counters: np.ndarray = field(default_factory=lambda: np.zeros(len(ledger.COUNTERS), np.int64))
    stall_seconds: float = 0.0  # time the compute waited for reads
    wasted_bytes: int = 0  # bytes read for prefetches nobody used
    io: IoStats = field(default_factory=IoStats)  # the reader's counters, kept by its threads

    hits = _counter(ledger.HITS)  # accesses served from the engine's cache
    misses = _counter(ledger.MISSES)  # accesses that needed a read (or a prefetched copy)
    experts_loaded = _counter(ledger.EXPERTS_LOADED)  # read on demand or by a prefetch that was used
    prefetch_issued = _counter(ledger.PREFETCH_ISSUED)
    prefetch_used = _counter(ledger.PREFETCH_USED)  # prefetched experts that their layer asked for
    prefetch_timely = _counter(ledger.PREFETCH_TIMELY)  # ... and that had arrived when it did
    prefetch_wasted = _counter(ledger.PREFETCH_WASTED)  # prefetched experts that their layer did not ask for

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
        return {
            **dict(zip(ledger.COUNTERS, self.counters.tolist(), strict=True)),
            "stall_seconds": self.stall_seconds,
            "wasted_bytes": self.wasted_bytes,
            "bytes_read": self.bytes_read,
            "reads": self.reads,
            "read_seconds": self.read_seconds,
        }


def cache_entry_bytes(packed: bool, slot_bytes: int, hidden_size: int, intermediate_size: int) -> int:
    """What the cache charges per expert: the slot a packed read lands in, page padding included, or the float32
    matrices of a dequantized one."""
    return slot_bytes if packed else 3 * hidden_size * intermediate_size * 4


def cached_experts_per_layer(scope: str, partition_bytes: int, entry_bytes: int, moe_layer_count: int) -> float:
    """Experts per MoE layer a cache holds whose partitions have ``partition_bytes`` each: a partition's count
    under ``per_layer`` scope, its share of every MoE layer's under ``global`` (an average)."""
    slots = partition_bytes // entry_bytes
    return float(slots) if scope == "per_layer" else slots / moe_layer_count


class ExpertStore:
    """Serves expert weights by (layer, expert): carries out the ledger's decisions with the reader's reads."""

    def __init__(
        self,
        layouts: dict[Key, ExpertLayout],
        hidden_size: int,
        intermediate_size: int,
        config: EngineConfig,
        num_layers: int,
        top_k: int,
        router_scores: RouterScores | None = None,
    ) -> None:
        self.layouts = layouts
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.config = config
        self.num_experts = max(expert for _, expert in layouts) + 1
        self.reader = ExpertReader(
            list(layouts.values()),
            config.io_mode,
            config.io_block_bytes,
            config.io_threads,
            hidden_size,
            intermediate_size,
        )
        self.packed = config.cache_format == "packed"
        self.entry_bytes = cache_entry_bytes(self.packed, self.reader.slots.slot_bytes, hidden_size, intermediate_size)
        moe_layers = sorted({layer for layer, _ in layouts})
        state = ledger.new_ledger(config, num_layers, self.num_experts, moe_layers, self.entry_bytes, top_k)
        self.predictor = new_predictor(config.predictor, len(moe_layers), self.num_experts, top_k)
        self.ledger = ledger.Ledger(state, self.predictor)
        self.experts_per_layer = cached_experts_per_layer(
            config.cache_scope, state.cache.capacity, self.entry_bytes, len(moe_layers)
        )
        self.stats = StoreStats(counters=state.counters, io=self.reader.stats)
        self.router_scores = router_scores  # gate_lookahead's input: the decoder's ranking of a layer's experts
        self._cached: dict[Key, ExpertData] = {}
        self._staged: dict[Key, Fetch] = {}
        # expert -> its data, the read bringing it, or None until its read starts; removed by its get
        self._current: dict[int, ExpertData | Fetch | None] = {}
        self._layer = -1
        self._retiring: list[ExpertData] = []  # freed at the next request
        self._done: list[ExpertData] = []  # freed at the next get or request
        self._cancelled: list[Fetch] = []
        self._free: list[ExpertWeights] = []

    def begin_forward(self) -> None:
        """A forward pass starts. Under the static policy the first pass is the profiling pass: before the
        second, the experts it used most are pinned (read into the cache, as many as ``cache_bytes`` holds)."""
        pinned = self.ledger.begin_forward()
        if pinned:
            keys = [self._key(key) for key in self.ledger.state.out[:pinned].tolist()]
            fetches = {key: self.reader.fetch(self.layouts[key], self._take()) for key in keys}
            for key, fetch in fetches.items():
                self._cached[key] = fetch.wait()

    def request(self, layer: int, experts: list[int]) -> None:
        """Record this layer's accesses (distinct experts, ascending) and start reading the first ``top_k``
        misses."""
        self._free_done()
        if self._retiring:
            for data in self._retiring:
                self._release(data)
            self._retiring.clear()
        if self._cancelled:
            self._sweep_cancelled()
        state = self.ledger.state
        cancelled, starts = self.ledger.request(layer, np.asarray(experts, np.int64))
        for key in state.cancelled[:cancelled].tolist() if cancelled else ():
            fetch = self._staged.pop(self._key(key))
            fetch.cancel()
            self._cancelled.append(fetch)
        self._layer = layer
        current, codes = self._current, state.current
        current.clear()
        timely = 0
        for expert in experts:
            code = codes[expert]
            if code == ledger.CACHED:
                current[expert] = self._cached[layer, expert]
            elif code == ledger.STAGED_READ:
                fetch = self._staged.pop((layer, expert))
                timely += fetch.done
                current[expert] = fetch
            else:  # its read starts now or later
                current[expert] = None
        state.counters[ledger.PREFETCH_TIMELY] += timely
        self._start(layer, starts)

    def get_all(self, layer: int, experts: list[int]) -> list[ExpertData]:
        """The weights of every expert requested for this layer, in the order requested, each valid until the next
        ``request`` (a decode step computes them together)."""
        return [self.get(layer, expert, hold=True) for expert in experts]

    def get(self, layer: int, expert: int, hold: bool = False) -> ExpertData:
        """The weights of an expert requested for this layer, once; valid until the next ``get`` or ``request``
        (with ``hold``, until the next ``request``)."""
        if layer != self._layer or expert not in self._current:
            raise KeyError(f"expert {expert} of layer {layer} was not requested for the current layer, or was taken")
        if self._done:
            self._free_done()
        fetch = self._current.pop(expert)
        if fetch is not None and not isinstance(fetch, Fetch):  # cached
            return fetch
        was, starts = self.ledger.take(layer, expert)
        if was == ledger.WAITING:  # taken out of order: its read had not started
            fetch = self.reader.fetch(self.layouts[layer, expert], self._take())
        self._start(layer, starts)
        if fetch.done:
            data = fetch.wait()  # raises the read's error, if any
        else:
            began = time.perf_counter()
            data = fetch.wait()
            self.stats.stall_seconds += time.perf_counter() - began
        evicted, cached = self.ledger.admit(layer, expert)
        for victim in self.ledger.state.cache.evicted[:evicted].tolist() if evicted else ():
            key = self._key(victim)  # one this layer has yet to compute stays until the next layer
            still_needed = hold or (key[0] == layer and key[1] in self._current)
            (self._retiring if still_needed else self._done).append(self._cached.pop(key))
        if cached:
            self._cached[layer, expert] = data
        else:
            (self._retiring if hold else self._done).append(data)
        return data

    def route_done(self, layer: int, h: np.ndarray, experts: np.ndarray, probs: np.ndarray) -> None:
        """This layer's routing is known (its input h [T, H], choice [T, k], probabilities [T, E]): count the
        static policy's profile, let the predictor learn from it, and read the next layers' likely experts ahead."""
        state, predictor = self.ledger.state, self.predictor
        if predictor.kind == NO_PREDICTOR and not state.profiling[0]:
            return
        experts = np.ascontiguousarray(experts, np.int64)
        tokens, k = experts.shape
        self.predictor = predictor = fit(predictor, tokens, k)
        ranked = np.argsort(-probs[-1], kind="stable") if predictor.kind == PREVIOUS_TOKEN else _NO_RANKING
        lookahead = self._lookahead(layer, h, k) if predictor.kind == GATE_LOOKAHEAD else _NO_LOOKAHEAD
        staged = self.ledger.route_done(predictor, layer, experts, ranked, lookahead)
        for key in state.out[:staged].tolist() if staged else ():
            key = self._key(key)
            self._staged[key] = self.reader.fetch(self.layouts[key], self._take())

    def _lookahead(self, layer: int, h: np.ndarray, k: int) -> np.ndarray:
        """[T, D, top_k + prefetch_extra]: each later layer's router's ranking of this layer's input."""
        targets = [target for target in self.ledger.state.ahead[layer].tolist() if target >= 0]
        count = min(k + self.config.prefetch_extra, self.num_experts)
        ranked = np.empty((h.shape[0], max(len(targets), 1), count), np.int64)
        for d, target in enumerate(targets):
            scores = self.router_scores(target, h)
            ranked[:, d] = np.argsort(-scores, axis=1, kind="stable")[:, :count]
        return ranked

    def resident(self, layer: int) -> np.ndarray:
        """[E] bool: whether each expert of ``layer`` is in RAM now (cached, or prefetched and arrived): using it
        costs no read."""
        mask = np.zeros(self.num_experts, np.bool_)
        self.ledger.cached_experts(layer, mask)
        for (owner, expert), fetch in self._staged.items():
            if owner == layer and fetch.done:
                mask[expert] = True
        return mask

    def close(self) -> None:
        self.reader.close()  # waits for the reads in flight

    def _key(self, key: int) -> Key:
        return divmod(key, self.num_experts)

    def _start(self, layer: int, starts: int) -> None:
        """Start the reads the ledger asked for: the current layer's experts in ``ledger.out``."""
        for expert in self.ledger.state.out[:starts].tolist() if starts else ():
            self._current[expert] = self.reader.fetch(self.layouts[layer, expert], self._take())

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
