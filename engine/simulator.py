"""Trace-driven simulation: replay a routing trace through the engine's own expert store, without weights.

The replay drives the real ``ExpertStore`` (its cache policies, staging, cancellation and counters; the real
predictors) exactly as the decoder does, call by call and layer by layer, but gives it a ``SimulatedReader``
that reads nothing: each fetch only takes its time on a model disk. So hit rate, bytes per token and the
prefetch counters are the engine's own, and a predicted decode speed comes from a small timing model:

- the disk serves fetches one after another, in the order issued, at the probe's bandwidth for the config's
  request size and queue depth; a cancelled fetch gives back the time it had not used yet;
- each MoE layer's compute takes the recorded compute time per token spread evenly over the MoE layers, half
  before the layer's experts are requested (attention, routing), half on its experts, shared among them: an
  expert's part starts once it has arrived, while the later ones are still being read.

With an infinite bandwidth every read completes at once: the synchronous engine, whose counters the
simulator reproduces exactly. Not modelled: the page cache (``pread`` and ``mmap`` re-reads are counted as
disk reads, as the engine's own counters count them), and the CPU time the reads themselves take (completions,
conversions), which competes with the compute on a machine with few cores.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.bench.probe import ProbeResult
from engine.bench.streaming import stream_throughput
from engine.config import EngineConfig
from engine.expert_io import Fetch, IoStats, issues_reads, plan_pieces
from engine.expert_layout import ExpertLayout, PackedExpert
from engine.expert_store import ExpertStore
from engine.models.decoder import prefer_resident
from engine.optimal_cache import optimal_hits
from engine.predictors import GateLookahead, Predictor, PreviousToken, make_predictor, merge_ranks
from engine.trace import Trace
from engine.units import format_bytes
from engine.weights import DEFAULT_GROUP_SIZE

NO_DATA = PackedExpert((), None, None)  # type: ignore[arg-type]  # what a simulated fetch delivers


class Clock:
    """Simulated seconds, and those the compute spent waiting for reads."""

    def __init__(self) -> None:
        self.now = 0.0
        self.stalled = 0.0


class SimulatedFetch(Fetch):
    """A read that only takes time: done once the clock passes its end."""

    weights, result, error = None, NO_DATA, None

    def __init__(self, reader: SimulatedReader, nbytes: int, start: float, end: float) -> None:
        # Not Fetch.__init__: its lock and event are for reader threads, which a simulation has none of.
        self.reader, self.nbytes, self.bytes_read, self.start, self.end = reader, nbytes, nbytes, start, end
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.end <= self.reader.clock.now

    def wait(self) -> PackedExpert:
        clock = self.reader.clock
        if self.end > clock.now:
            clock.stalled += self.end - clock.now
            clock.now = self.end
        return NO_DATA

    def cancel(self) -> None:
        self.cancelled = True
        self.reader.cancel(self)


class InstantFetch(Fetch):
    """A read that is done when asked for (infinite bandwidth): one per expert, made up front and reused."""

    done = True

    def __init__(self, nbytes: int) -> None:  # not Fetch.__init__: no reader threads, no lock or event
        self.nbytes = self.bytes_read = nbytes
        self.weights, self.result, self.error, self.cancelled = None, NO_DATA, None, False

    def wait(self) -> PackedExpert:
        return NO_DATA

    def cancel(self) -> None:
        pass


class MappedFetch(Fetch):
    """An expert under ``mmap`` as the engine has it: done at once (views of the mapping), its bytes read by page
    faults when the compute first touches it, so the disk time is waited for then, in full."""

    done = True

    def __init__(self, reader: SimulatedReader, seconds: float) -> None:  # not Fetch.__init__: no threads here
        self.reader, self.seconds, self.charged = reader, seconds, False
        self.nbytes = self.bytes_read = 0
        self.weights, self.result, self.error, self.cancelled = None, NO_DATA, None, False

    def wait(self) -> PackedExpert:
        if not self.charged:
            self.charged = True
            reader, clock = self.reader, self.reader.clock
            end = max(clock.now, reader.disk_free) + self.seconds
            clock.stalled += end - clock.now
            clock.now = reader.disk_free = end
        return NO_DATA

    def cancel(self) -> None:
        pass


class _Slots:
    def __init__(self, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes


class SimulatedReader:
    """Stands in for ``ExpertReader``: the bytes each fetch would read in ``mode``, served by one model disk.

    With an infinite bandwidth every read is done as soon as it is asked for: each expert's fetch is an
    ``InstantFetch`` made up front (the store only reads its counts), which keeps a counters-only replay fast.
    """

    def __init__(
        self, layouts: list[ExpertLayout], mode: str, packed: bool, repacked: bool, bandwidth: float, clock: Clock
    ) -> None:
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be positive bytes/s, got {bandwidth!r}")
        self.clock, self.bandwidth = clock, bandwidth
        self.counts = issues_reads(mode, repacked=repacked, packed=packed)
        self.nbytes = {id(layout): sum(p.nbytes for p in plan_pieces(layout, mode)) for layout in layouts}
        self.seconds = {key: nbytes / bandwidth for key, nbytes in self.nbytes.items()}
        self.slots = _Slots(max(self.nbytes.values()))
        self.stats = IoStats()
        self.disk_free = 0.0
        self.queue: deque[SimulatedFetch] = deque()  # issued and not finished, in disk order
        self.instant: dict[int, InstantFetch] | None = None
        if bandwidth == float("inf"):
            self.instant = {key: InstantFetch(nbytes) for key, nbytes in self.nbytes.items()}

    def fetch(self, layout: ExpertLayout, weights: object) -> SimulatedFetch | InstantFetch | MappedFetch:
        """Queue a read of ``layout``; under ``mmap`` (nothing read, nothing counted) the page faults come when the
        compute first touches the expert, and take their disk time then."""
        key = id(layout)  # by identity: hashing a layout's ranges costs more than the rest
        stats = self.stats
        fetch: SimulatedFetch | InstantFetch | MappedFetch
        if not self.counts:
            return MappedFetch(self, self.seconds[key])
        if self.instant is not None:
            fetch = self.instant[key]
        else:
            now, queue = self.clock.now, self.queue
            while queue and queue[0].end <= now:
                queue.popleft()
            start = self.disk_free if self.disk_free > now else now
            self.disk_free = end = start + self.seconds[key]
            fetch = SimulatedFetch(self, self.nbytes[key], start, end)
            queue.append(fetch)
        if fetch.nbytes:
            stats.reads += 1
            stats.bytes_read += fetch.nbytes
        return fetch

    def cancel(self, fetch: SimulatedFetch) -> None:
        """Stop ``fetch`` now: the disk time it had not used yet goes to the reads queued after it."""
        now = self.clock.now
        if fetch.end <= now or fetch not in self.queue:
            return
        cut = max(now, fetch.start)
        freed = fetch.end - cut
        unread = round(fetch.nbytes * freed / (fetch.end - fetch.start))
        fetch.bytes_read -= unread
        self.stats.bytes_read -= unread
        fetch.end = cut
        position = self.queue.index(fetch)
        for n in range(position + 1, len(self.queue)):
            self.queue[n].start -= freed
            self.queue[n].end -= freed
        del self.queue[position]
        self.disk_free -= freed

    def give_slot(self, slot: object) -> None:
        pass

    def close(self) -> None:
        pass


class _SimulatedStore(ExpertStore):
    def _take(self) -> None:  # no arrays: nothing is ever converted
        return None


class _RecordedLookahead(Predictor):
    """``gate_lookahead`` as recorded: ``h`` is the trace's proposals for the layer's next D layers, per token
    [T][D][R] (nested lists)."""

    name = GateLookahead.name

    def __init__(self, moe_layers: list[int], num_experts: int) -> None:
        super().__init__(moe_layers, num_experts)
        self._position = {layer: i for i, layer in enumerate(moe_layers)}

    def propose(self, layer: int, h: np.ndarray, experts: np.ndarray, target: int, count: int) -> list[int]:
        ahead = self._position[target] - self._position[layer] - 1
        if count <= 0:
            return []
        if len(h) == 1:
            return h[0][ahead][:count]
        return merge_ranks(np.array([token[ahead][:count] for token in h]))


class _RecordedPreviousToken(PreviousToken):
    """``previous_token`` as recorded: ``probs`` is the layer's recorded candidates per token, best first [T][R]
    (nested lists). Only the first R of a ranking are known, which ``_check`` makes sure is enough."""

    def observe(self, layer: int, h: np.ndarray, experts: np.ndarray, probs: np.ndarray) -> None:
        self._ranked[layer] = probs[-1]


def _no_router(layer: int, h: np.ndarray) -> np.ndarray:
    raise AssertionError("a replay has no router: gate_lookahead replays the recorded proposals")


@dataclass
class SimResult:
    config: dict
    passes: int  # passes replayed, warm-up included
    measured_passes: int  # the last ones: every figure is of their decode steps, as the benchmark's are
    decode_tokens: int
    accesses: int  # expert lookups
    hits: int
    hit_rate: float
    optimal_hit_rate: float  # Belady's bound for the same budget, scope and access sequence
    bytes_read_per_token: float  # decode tokens of the measured passes
    wasted_bytes_per_token: float
    prefetch_issued: int
    prefetch_used: int
    prefetch_wasted: int
    prefetch_timely: int
    prefetch_precision: float | None
    prefetch_recall: float | None
    counters: dict  # every counter of the store, summed over the measured decode steps
    bandwidth: float  # bytes/s the disk model served reads at
    decode_seconds_per_token_compute: float
    predicted_decode_tok_s: float | None
    io_stall_frac: float | None
    replay_seconds: float  # wall time of the replay
    accesses_per_second: float  # expert lookups replayed per second of wall time, every pass

    def to_dict(self) -> dict:
        return asdict(self)


def simulate(
    trace: Trace,
    config: EngineConfig,
    bandwidth: float = float("inf"),
    decode_seconds_per_token: float | None = None,
    prefill_seconds_per_token: float | None = None,
    warmup: int = 1,
    repeats: int = 1,
) -> SimResult:
    """Replay ``trace`` ``warmup + repeats`` times through a store for ``config``; figures are the repeats'.

    Compute times per token default to those measured when the trace was recorded.
    """
    k = _check(trace, config)
    meta = trace.meta
    decode_compute = meta["decode_seconds_per_token"] if decode_seconds_per_token is None else decode_seconds_per_token
    prefill_compute = (
        meta["prefill_seconds_per_token"] if prefill_seconds_per_token is None else prefill_seconds_per_token
    )
    decode_compute, prefill_compute = decode_compute or 0.0, prefill_compute or 0.0
    moe_layers = trace.moe_layers
    layouts = trace.layouts()
    clock = Clock()
    reader = SimulatedReader(
        list(layouts.values()), config.io_mode, config.cache_format == "packed", meta["repacked"], bandwidth, clock
    )
    predictor: Predictor | None
    if config.predictor == "gate_lookahead":
        predictor = _RecordedLookahead(moe_layers, trace.num_experts)
    elif config.predictor == "previous_token":
        predictor = _RecordedPreviousToken(moe_layers, trace.num_experts)
    else:
        predictor = make_predictor(config.predictor, moe_layers, trace.num_experts, _no_router)
    store = _SimulatedStore(
        layouts,
        meta["hidden_size"],
        meta["intermediate_size"],
        config,
        meta["num_layers"],
        k,
        predictor,
        reader=reader,
    )
    replay = _Replay(trace, config, store, clock, k, prefill_compute, decode_compute)
    began = time.perf_counter()
    for n in range(warmup + repeats):
        replay.run_pass(measured=n >= warmup)
    replay_seconds = time.perf_counter() - began
    counters, tokens, seconds = replay.counters, replay.decode_tokens, replay.decode_seconds
    counters["stall_seconds"] = replay.decode_stall  # the simulated wait, not the replay's own wall time
    counters.pop("read_seconds")
    accesses = counters["hits"] + counters["misses"]
    entry = store.entry_bytes
    if config.cache_scope == "per_layer":
        per_layer = store.cache.layer_capacity_bytes // entry if config.cache_bytes else 0
        optimal = 0
        for layer in moe_layers:  # each layer's own lookups, its share of the budget
            mine = [chosen if owner == layer else [] for owner, chosen in replay.batches]
            optimal += optimal_hits(mine, per_layer, replay.counted)
    else:
        keyed = [[(layer, expert) for expert in chosen] for layer, chosen in replay.batches]
        optimal = optimal_hits(keyed, config.cache_bytes // entry, replay.counted)
    issued, used = counters["prefetch_issued"], counters["prefetch_used"]
    per_token = max(tokens, 1)
    store.close()
    return SimResult(
        config=config.to_dict(),
        passes=warmup + repeats,
        measured_passes=repeats,
        decode_tokens=tokens,
        accesses=accesses,
        hits=counters["hits"],
        hit_rate=counters["hits"] / accesses if accesses else 0.0,
        optimal_hit_rate=optimal / accesses if accesses else 0.0,
        bytes_read_per_token=counters["bytes_read"] / per_token,
        wasted_bytes_per_token=counters["wasted_bytes"] / per_token,
        prefetch_issued=issued,
        prefetch_used=used,
        prefetch_wasted=counters["prefetch_wasted"],
        prefetch_timely=counters["prefetch_timely"],
        prefetch_precision=used / issued if issued else None,
        prefetch_recall=used / counters["misses"] if counters["misses"] else None,
        counters=counters,
        bandwidth=bandwidth,
        decode_seconds_per_token_compute=decode_compute,
        predicted_decode_tok_s=tokens / seconds if seconds else None,
        io_stall_frac=replay.decode_stall / seconds if seconds else None,
        replay_seconds=replay_seconds,
        accesses_per_second=replay.lookups / replay_seconds if replay_seconds else 0.0,
    )


MMAP_READAHEAD = 128 << 10  # Linux's default readahead window: what one page fault reads


def disk_bandwidth(probe: ProbeResult, config: EngineConfig) -> float:
    """Bytes/s the disk serves ``config``'s reads at: the probe at its request size and queue depth; under
    ``mmap``, one readahead window at a time (the compute thread's page faults)."""
    if config.io_mode == "mmap":
        return probe.bandwidth(MMAP_READAHEAD, 1)
    return probe.bandwidth(config.io_block_bytes, config.io_threads)


def reader_bandwidth(
    model_dir: Path, config: EngineConfig, experts_per_step: int, seconds: float = 3.0, seed: int = 0
) -> float:
    """Bytes/s the engine's reader alone reaches on ``model_dir``'s files with ``config``'s reads, a layer's
    ``experts_per_step`` experts at a time: on the project's machine it predicted decode speed within 15% where
    the probe's bandwidth, which the reader reaches only 0.6-0.85 of, overestimated it by a third."""
    cell = EngineConfig(io_mode=config.io_mode, io_block_bytes=config.io_block_bytes, io_threads=config.io_threads)
    return stream_throughput(model_dir, cell, seconds, experts_per_step=experts_per_step, seed=seed)[0]


def format_result(result: SimResult) -> str:
    """The result as a short table for the terminal."""

    def share(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    tok_s = result.predicted_decode_tok_s
    rows = [
        ("hit rate", f"{share(result.hit_rate)} (optimal {share(result.optimal_hit_rate)})"),
        ("bytes read per token", format_bytes(result.bytes_read_per_token)),
        ("wasted prefetch bytes per token", format_bytes(result.wasted_bytes_per_token)),
        (
            "prefetch issued / used / wasted",
            f"{result.prefetch_issued} / {result.prefetch_used} / {result.prefetch_wasted}",
        ),
        ("prefetch precision / recall", f"{share(result.prefetch_precision)} / {share(result.prefetch_recall)}"),
        ("disk bandwidth (model)", f"{result.bandwidth / 1e9:.2f} GB/s"),
        ("compute per token (recorded)", f"{1e3 * result.decode_seconds_per_token_compute:.2f} ms"),
        ("predicted decode", "-" if tok_s is None else f"{tok_s:.2f} tok/s, {share(result.io_stall_frac)} waiting"),
        ("replay", f"{result.accesses_per_second / 1e6:.2f} M expert lookups/s"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{result.decode_tokens} decode tokens x {result.measured_passes} pass(es), {result.accesses} lookups"]
    return "\n".join(lines + [f"{name:<{width}}  {value}" for name, value in rows])


def _check(trace: Trace, config: EngineConfig) -> int:
    """The top-k the replay routes with; what the trace cannot replay is an error, not an approximation."""
    recorded = trace.meta["recorded_with"]
    stored = _stored_format(recorded.get("weights", "original"), recorded.get("group_size"))
    if _stored_format(config.weights, config.group_size) != stored:
        raise ValueError(
            f"the trace was recorded with weights {stored}, the config asks for "
            f"{_stored_format(config.weights, config.group_size)}: the stored format changes the routing; record a "
            "trace with it"
        )
    k = trace.top_k if config.top_k is None else config.top_k
    if k > trace.top_k:
        raise ValueError(f"top_k {k} exceeds the {trace.top_k} experts per token the trace recorded")
    needs_candidates = config.predictor in ("previous_token", "gate_lookahead") and trace.candidates < trace.num_experts
    if needs_candidates and k + config.prefetch_extra > trace.candidates:
        raise ValueError(
            f"prefetch_extra {config.prefetch_extra} needs {k + config.prefetch_extra} candidates per layer; "
            f"the trace recorded {trace.candidates}"
        )
    if config.predictor == "gate_lookahead" and config.prefetch_depth > trace.depth:
        raise ValueError(f"prefetch_depth {config.prefetch_depth} exceeds the {trace.depth} layers the trace recorded")
    return k


def _stored_format(weights: str, group_size: int | None) -> str:
    return f"int4-g{group_size or DEFAULT_GROUP_SIZE}" if weights == "int4" else repr(weights)


class _Replay:
    """The decoder's calls into the store, from the trace; keeps every lookup batch for the optimal bound."""

    def __init__(
        self,
        trace: Trace,
        config: EngineConfig,
        store: ExpertStore,
        clock: Clock,
        k: int,
        prefill_compute: float,
        decode_compute: float,
    ) -> None:
        self.trace, self.store, self.clock, self.k = trace, store, clock, k
        self.tolerance = config.cache_routing_tolerance
        self.calls = trace.call_bounds()
        self.moe_layers = trace.moe_layers
        half = 0.5 / len(self.moe_layers)
        self.compute = [half * (t * (prefill_compute if t > 1 else decode_compute)) for t in trace.call_tokens.tolist()]
        by_layer = np.ascontiguousarray(trace.top_ids[:, :, :k].transpose(1, 0, 2), dtype=np.intp)  # [L, N, k]
        # What the store is given per call and layer: the chosen experts [T, k], and what the predictor reads.
        self.experts = [[by_layer[li, a:b] for li in range(len(self.moe_layers))] for a, b in self.calls]
        self.inputs = self._predictor_inputs(trace, config.predictor)
        # Without cache-aware routing a layer's experts do not depend on the cache: work them out once.
        self.fixed = None
        if not self.tolerance:
            self.fixed = [[np.unique(experts).tolist() for experts in call] for call in self.experts]
        self.batches: list[tuple[int, list[int]]] = []  # every layer's lookups, for the optimal bound
        self.counted: list[bool] = []  # whether each batch is of a measured decode step
        self.lookups = 0
        self.counters = dict.fromkeys(store.stats.snapshot(), 0)
        self.decode_tokens = 0
        self.decode_seconds = self.decode_stall = 0.0

    def _predictor_inputs(self, trace: Trace, predictor: str) -> list[list[tuple]]:
        """Per call and layer, the (h, probs) the store passes the predictor: the recorded lookahead proposals
        for ``gate_lookahead``, the recorded candidates for ``previous_token``, nothing for the others."""
        layers = range(len(self.moe_layers))
        if predictor == "gate_lookahead":
            return [[(trace.lookahead_ids[a:b, li].tolist(), None) for li in layers] for a, b in self.calls]
        if predictor == "previous_token":
            return [[(None, trace.top_ids[a:b, li].tolist()) for li in layers] for a, b in self.calls]
        return [[(None, None)] * len(self.moe_layers) for _ in self.calls]

    def run_pass(self, measured: bool) -> None:
        """One pass over the trace's calls; a measured one adds its decode steps to the figures."""
        store, clock, stats = self.store, self.clock, self.store.stats
        request, route_done, get = store.request, store.route_done, store.get
        batches, moe_layers = self.batches, self.moe_layers
        for c, (a, b) in enumerate(self.calls):
            scored = measured and c > 0 and b - a == 1
            began, stalled, before = clock.now, clock.stalled, stats.snapshot() if scored else None
            store.begin_forward()
            step = self.compute[c]
            calls_experts, inputs = self.experts[c], self.inputs[c]
            fixed = self.fixed[c] if self.fixed is not None else None
            for li, layer in enumerate(moe_layers):
                clock.now += step
                experts = calls_experts[li]
                if fixed is not None:
                    chosen = fixed[li]
                else:
                    experts = self._route(a, b, li, layer)
                    chosen = np.unique(experts).tolist()
                batches.append((layer, chosen))
                self.lookups += len(chosen)
                request(layer, chosen)
                h, probs = inputs[li]
                route_done(layer, h, experts, probs)  # type: ignore[arg-type]
                share = step / len(chosen)
                for expert in chosen:  # each expert's compute runs while the later ones are still arriving
                    get(layer, expert)
                    clock.now += share
            self.counted += [scored] * len(moe_layers)
            if before is not None:
                for name, value in stats.snapshot().items():
                    self.counters[name] += value - before[name]
                self.decode_tokens += 1
                self.decode_seconds += clock.now - began
                self.decode_stall += clock.stalled - stalled

    def _route(self, a: int, b: int, li: int, layer: int) -> np.ndarray:
        """The experts [T, k] the decoder picks with cache-aware routing, given what is resident now."""
        trace = self.trace
        probs = np.zeros((b - a, trace.num_experts), np.float32)
        order = trace.top_ids[a:b, li].astype(np.intp)
        np.put_along_axis(probs, order, trace.top_probs[a:b, li], axis=1)  # the best R as recorded, zero elsewhere
        resident = self.store.is_resident
        return np.stack(
            [
                prefer_resident(p, o, self.k, self.tolerance, lambda e: resident(layer, e))
                for p, o in zip(probs, order, strict=True)
            ]
        )
