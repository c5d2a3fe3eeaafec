"""Trace-driven simulation: replay a routing trace through the engine's own expert ledger, without weights.

The replay is one compiled loop that makes the decoder's calls into the store, call by call and layer by layer,
on the very ledger the engine's ``ExpertStore`` runs on (``expert_ledger``: its cache policies, staging,
cancellation, read windows and counters) with the engine's own predictors (``gate_lookahead`` and
``previous_token`` as recorded, ``coactivation`` learning as it goes) and cache-aware routing. Where the store
reads, the replay queues the read on a model disk. So hit rate, bytes per token and the prefetch counters are
the engine's own, and a predicted decode speed comes from a small timing model:

- the disk serves reads one after another, in the order issued, at the probe's bandwidth for the config's
  request size and queue depth; a cancelled read gives back the time it had not used yet;
- each MoE layer's compute takes the recorded compute time per token spread evenly over the MoE layers, half
  before the layer's experts are requested (attention, routing), half on its experts, shared among them: an
  expert's part starts once it has arrived, while the later ones are still being read;
- under ``mmap`` nothing is read ahead: an expert's bytes come by page faults when the compute first touches
  it, so its disk time is waited for then, in full.

With an infinite bandwidth every read completes at once: the synchronous engine, whose counters the
simulator reproduces exactly. Not modelled: the page cache (``pread`` and ``mmap`` re-reads are counted as
disk reads, as the engine's own counters count them), and the CPU time the reads themselves take (completions,
conversions), which competes with the compute on a machine with few cores.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numba import njit

from engine.analysis.optimal_cache import optimal_hits
from engine.analysis.trace import Trace
from engine.bench.probe_result import ProbeResult
from engine.bench.streaming import stream_throughput
from engine.buffers import PAGE
from engine.config import EngineConfig
from engine.formats.weights import DEFAULT_GROUP_SIZE
from engine.model.decoder import prefer_resident
from engine.streaming import expert_ledger as ledger
from engine.streaming.expert_io import issues_reads
from engine.streaming.expert_ledger import LedgerState
from engine.streaming.expert_store import cache_entry_bytes, cached_experts_per_layer
from engine.streaming.predictors import READS_LOOKAHEAD, READS_RANKINGS, PredictorState, new_predictor
from engine.units import format_bytes

# the disk model's reads: served in order by the model disk, done at once (infinite bandwidth), or page faults
QUEUED, INSTANT, MAPPED = range(3)
# what the replay keeps beside the ledger's counters, as StoreStats names them
WASTED_BYTES, BYTES_READ, READS = range(3)
EXTRA = ("wasted_bytes", "bytes_read", "reads")
# the replay's timing: the measured decode tokens, their simulated seconds and stall; lookups in every pass
TIMING = np.dtype([("tokens", np.int64), ("seconds", np.float64), ("stall", np.float64), ("lookups", np.int64)])


@dataclass
class SimResult:
    config: dict
    passes: int  # passes replayed, warm-up included
    measured_passes: int  # the last ones: every figure is of their decode steps, as the benchmark's are
    decode_tokens: int
    accesses: int  # expert lookups
    hits: int
    hit_rate: float
    optimal_hit_rate: float | None  # Belady's bound for the same budget, scope and accesses; None: not asked
    cache_entry_bytes: int  # what the cache charges per expert under the config's cache_format
    cached_experts_per_layer: float  # experts per MoE layer the budget holds (under global scope: on average)
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
    optimal: bool = True,
) -> SimResult:
    """Replay ``trace`` ``warmup + repeats`` times through a ledger for ``config``; figures are the repeats'.

    Compute times per token default to those measured when the trace was recorded. ``optimal=False`` skips
    Belady's bound, which takes several times the replay's own time (for callers that want only the speed).
    """
    k = _check(trace, config)
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive bytes/s, got {bandwidth!r}")
    meta = trace.meta
    decode_compute = meta["decode_seconds_per_token"] if decode_seconds_per_token is None else decode_seconds_per_token
    prefill_compute = (
        meta["prefill_seconds_per_token"] if prefill_seconds_per_token is None else prefill_seconds_per_token
    )
    decode_compute, prefill_compute = decode_compute or 0.0, prefill_compute or 0.0
    recorded = _Recorded.of(trace, k, config.cache_routing_tolerance > 0, prefill_compute, decode_compute)
    moe_layers, num_layers, num_experts = trace.moe_layers, meta["num_layers"], trace.num_experts
    nbytes, entry_bytes = _expert_bytes(trace, config)
    state = ledger.new_ledger(config, num_layers, num_experts, moe_layers, entry_bytes, k)
    predictor = new_predictor(config.predictor, len(moe_layers), num_experts, k, recorded.most_tokens())
    # reads needed at once: the pinned ones; a layer's own and those staged, cancelled ones until their bytes count
    reads = len(nbytes) + num_experts + 4 * state.staged_limit + 64
    disk = _model_disk(trace, config, nbytes, bandwidth, reads)
    replay = _Batches.for_passes(recorded, warmup + repeats, num_experts)
    totals = np.zeros(len(ledger.COUNTERS) + len(EXTRA), np.int64)
    timing = np.zeros(1, TIMING)
    began = time.perf_counter()
    _replay(
        recorded,
        state,
        predictor,
        disk,
        replay,
        config.cache_routing_tolerance,
        warmup,
        repeats,
        totals,
        timing,
    )
    replay_seconds = time.perf_counter() - began
    tokens, seconds, stall, lookups = (timing[name][0].item() for name in TIMING.names)
    counters: dict = dict(zip(ledger.COUNTERS + EXTRA, totals.tolist(), strict=True))
    counters["stall_seconds"] = stall  # the simulated wait, not the replay's own wall time
    accesses = counters["hits"] + counters["misses"]
    best = _optimal_hits(replay, config, state.cache.capacity, entry_bytes, moe_layers) if optimal else None
    issued, used = counters["prefetch_issued"], counters["prefetch_used"]
    per_token = max(tokens, 1)
    return SimResult(
        config=config.to_dict(),
        passes=warmup + repeats,
        measured_passes=repeats,
        decode_tokens=tokens,
        accesses=accesses,
        hits=counters["hits"],
        hit_rate=counters["hits"] / accesses if accesses else 0.0,
        optimal_hit_rate=None if best is None else best / accesses if accesses else 0.0,
        cache_entry_bytes=entry_bytes,
        cached_experts_per_layer=cached_experts_per_layer(
            config.cache_scope, state.cache.capacity, entry_bytes, len(moe_layers)
        ),
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
        io_stall_frac=stall / seconds if seconds else None,
        replay_seconds=replay_seconds,
        accesses_per_second=lookups / replay_seconds if replay_seconds else 0.0,
    )


def _optimal_hits(
    batches: _Batches, config: EngineConfig, partition_bytes: int, entry_bytes: int, moe_layers: list[int]
) -> int:
    """Belady's bound on the replayed lookups, for the same budget (``partition_bytes`` per layer or in all) in the
    same scope."""
    experts = batches.experts.tolist()
    at = batches.at.tolist()
    layers = batches.layer.tolist()
    chosen = [experts[at[n] : at[n + 1]] for n in range(len(layers))]
    counted = batches.counted.astype(bool).tolist()
    if config.cache_scope == "per_layer":
        per_layer = partition_bytes // entry_bytes
        optimal = 0
        for layer in moe_layers:  # each layer's own lookups, its share of the budget
            mine = [batch if owner == layer else [] for owner, batch in zip(layers, chosen, strict=True)]
            optimal += optimal_hits(mine, per_layer, counted)
        return optimal
    keyed = [[(layer, expert) for expert in batch] for layer, batch in zip(layers, chosen, strict=True)]
    return optimal_hits(keyed, config.cache_bytes // entry_bytes, counted)


class _Recorded(NamedTuple):
    """The trace as the replay reads it."""

    bounds: np.ndarray  # int64 [C, 2]: each forward call's first token and end
    compute: np.ndarray  # float64 [C]: half a MoE layer's compute in each call
    top_ids: np.ndarray  # int64 [N, L, R]: the router's best experts, best first
    top_probs: np.ndarray  # float32 [N, L, R]: their probabilities
    lookahead: np.ndarray  # int64 [N, L, D, R]: gate_lookahead's proposals for the next D MoE layers
    moe_layers: np.ndarray  # int64 [L]
    k: int  # experts per token
    chosen: np.ndarray  # int64: per call and MoE layer, its distinct experts (without cache-aware routing)
    chosen_at: np.ndarray  # int64 [C * L + 1]: where each call and layer's experts start in ``chosen``

    @classmethod
    def of(cls, trace: Trace, k: int, routed: bool, prefill_compute: float, decode_compute: float) -> _Recorded:
        bounds = np.asarray(trace.call_bounds(), np.int64).reshape(-1, 2)
        tokens = trace.call_tokens.astype(np.float64)
        half = 0.5 / len(trace.moe_layers)
        compute = half * (tokens * np.where(tokens > 1, prefill_compute, decode_compute))
        top_ids = trace.top_ids.astype(np.int64)
        chosen, chosen_at = [], [0]
        if not routed:  # without cache-aware routing a layer's experts do not depend on the cache
            for a, b in bounds.tolist():
                for li in range(len(trace.moe_layers)):
                    distinct = np.unique(top_ids[a:b, li, :k])
                    chosen.append(distinct)
                    chosen_at.append(chosen_at[-1] + len(distinct))
        return cls(
            bounds,
            compute,
            top_ids,
            trace.top_probs.astype(np.float32),
            trace.lookahead_ids.astype(np.int64),
            np.asarray(trace.moe_layers, np.int64),
            k,
            np.concatenate(chosen) if chosen else np.zeros(0, np.int64),
            np.asarray(chosen_at, np.int64),
        )

    def most_tokens(self) -> int:
        return int((self.bounds[:, 1] - self.bounds[:, 0]).max())

    def most_lookups(self, num_experts: int) -> int:
        """A bound on one pass's lookups: each call's layers look up at most T x k experts, and E."""
        tokens = np.diff(self.bounds, axis=1).ravel()
        return int(np.minimum(tokens * self.k, num_experts).sum()) * len(self.moe_layers)


class _Batches(NamedTuple):
    """Every layer's lookups as replayed, for the optimal bound."""

    experts: np.ndarray  # int64: the distinct experts of each batch, one batch after another
    at: np.ndarray  # int64 [batches + 1]: where each batch starts in ``experts``
    layer: np.ndarray  # int64 [batches]
    counted: np.ndarray  # int64 [batches]: 1 if it is of a measured decode step
    filled: np.ndarray  # int64 [1]: batches recorded so far

    @classmethod
    def for_passes(cls, recorded: _Recorded, passes: int, num_experts: int) -> _Batches:
        count = passes * len(recorded.bounds) * len(recorded.moe_layers)
        return cls(
            np.zeros(passes * recorded.most_lookups(num_experts), np.int64),
            np.zeros(count + 1, np.int64),
            np.zeros(count, np.int64),
            np.zeros(count, np.int64),
            np.zeros(1, np.int64),
        )


class _Disk(NamedTuple):
    """The model disk and the reads it serves: each read a slot of the per-read arrays, free again once the compute
    has waited for it or its cancelled bytes are counted."""

    kind: int  # QUEUED, INSTANT or MAPPED
    seconds: np.ndarray  # float64 [keys]: an expert's disk time
    nbytes: np.ndarray  # int64 [keys]: the bytes its read takes
    now: np.ndarray  # float64 [1]: the simulated clock
    stalled: np.ndarray  # float64 [1]: the time the compute waited for reads
    disk_free: np.ndarray  # float64 [1]: when the disk has served every read queued
    next_slot: np.ndarray  # int64 [1]: the read slot to try first
    head: np.ndarray  # int64 [1]: the disk queue's first read
    tail: np.ndarray  # int64 [1]: and its end
    cancelled_count: np.ndarray  # int64 [1]: cancelled reads to sweep
    live: np.ndarray  # int64 [reads]: 1 while a slot's read is needed
    key: np.ndarray  # int64 [reads]
    start: np.ndarray  # float64 [reads]
    end: np.ndarray  # float64 [reads]: done once the clock reaches it
    size: np.ndarray  # int64 [reads]: bytes asked for
    read_bytes: np.ndarray  # int64 [reads]: bytes read, less once cancelled
    charged: np.ndarray  # int64 [reads]: under MAPPED, whether the page faults were waited for
    queue: np.ndarray  # int64 [reads]: issued reads not yet finished, in disk order, from head to tail
    cancelled: np.ndarray  # int64 [reads]: cancelled reads whose bytes are not yet counted as wasted
    staged: np.ndarray  # int64 [keys]: the read of each staged key
    current: np.ndarray  # int64 [experts]: the read of each expert of the current layer
    extra: np.ndarray  # int64 [3]: WASTED_BYTES, BYTES_READ, READS


def _expert_bytes(trace: Trace, config: EngineConfig) -> tuple[np.ndarray, int]:
    """The bytes each expert's read takes in ``config``'s mode (by key), and those the store charges the cache.

    As ``plan_pieces`` reads a trace's layouts (every range a piece; under ``direct`` widened to page boundaries),
    over the arrays at once: building the layouts cost 80 ms a replay, ten times the replay itself.
    """
    meta = trace.meta
    offsets, sizes = trace.expert_offsets.astype(np.int64), trace.expert_nbytes.astype(np.int64)  # [L, E, P]
    if config.io_mode == "direct":
        skip = offsets % PAGE
        sizes = np.where(sizes > 0, -(-(skip + sizes) // PAGE) * PAGE, 0)
    nbytes = np.zeros((meta["num_layers"], trace.num_experts), np.int64)
    nbytes[trace.moe_layers] = sizes.sum(axis=2)
    nbytes = nbytes.reshape(-1)
    packed = config.cache_format == "packed"
    return nbytes, cache_entry_bytes(packed, int(nbytes.max()), meta["hidden_size"], meta["intermediate_size"])


def _model_disk(trace: Trace, config: EngineConfig, nbytes: np.ndarray, bandwidth: float, reads: int) -> _Disk:
    """The disk for ``config``'s reads of ``nbytes`` at ``bandwidth``, with room for ``reads``."""
    if not issues_reads(config.io_mode, repacked=trace.meta["repacked"], packed=config.cache_format == "packed"):
        kind = MAPPED
    else:
        kind = INSTANT if bandwidth == float("inf") else QUEUED
    num_keys = len(nbytes)
    return _Disk(
        kind,
        nbytes / bandwidth,
        nbytes,
        *(np.zeros(1, np.float64) for _ in range(3)),
        *(np.zeros(1, np.int64) for _ in range(4)),
        np.zeros(reads, np.int64),
        np.zeros(reads, np.int64),
        np.zeros(reads, np.float64),
        np.zeros(reads, np.float64),
        np.zeros(reads, np.int64),
        np.zeros(reads, np.int64),
        np.zeros(reads, np.int64),
        np.zeros(reads, np.int64),
        np.zeros(reads, np.int64),
        np.zeros(num_keys, np.int64),
        np.zeros(trace.num_experts, np.int64),
        np.zeros(len(EXTRA), np.int64),
    )


@njit(cache=True)
def _fetch(d: _Disk, key: int) -> int:
    """Issue a read of ``key``; returns the read."""
    now = d.now[0]
    while d.head[0] < d.tail[0] and d.end[d.queue[d.head[0]]] <= now:  # finished: off the queue
        d.head[0] += 1
    f = _free_slot(d)
    d.key[f], d.charged[f] = key, 0
    if d.kind == MAPPED:  # nothing read ahead, nothing counted: the page faults come when the compute touches it
        d.start[f] = d.end[f] = now
        d.size[f] = d.read_bytes[f] = 0
        return f
    d.size[f] = d.read_bytes[f] = d.nbytes[key]
    if d.kind == INSTANT:
        d.start[f] = d.end[f] = -np.inf
    else:
        start = max(d.disk_free[0], now)
        d.start[f], d.end[f] = start, start + d.seconds[key]
        d.disk_free[0] = d.end[f]
        if d.tail[0] == len(d.queue):  # move the queue back to the front
            queued = d.tail[0] - d.head[0]
            d.queue[:queued] = d.queue[d.head[0] : d.tail[0]].copy()
            d.head[0] = 0
            d.tail[0] = queued
        d.queue[d.tail[0]] = f
        d.tail[0] += 1
    if d.size[f]:
        d.extra[READS] += 1
        d.extra[BYTES_READ] += d.size[f]
    return f


@njit(cache=True)
def _free_slot(d: _Disk) -> int:
    """A slot no read needs (finished ones are off the queue by now), taken."""
    slots = len(d.live)
    f = d.next_slot[0]
    for _ in range(slots):
        if not d.live[f]:
            d.live[f] = 1
            d.next_slot[0] = (f + 1) % slots
            return f
        f = (f + 1) % slots
    raise RuntimeError("the model disk has no free read slot: more reads in flight than the replay allowed for")


@njit(cache=True)
def _done(d: _Disk, f: int) -> bool:
    return d.end[f] <= d.now[0]


@njit(cache=True)
def _wait(d: _Disk, f: int) -> None:
    """The compute needs the read: the clock moves on to its end (under MAPPED, to the end of its page faults)."""
    now = d.now[0]
    if d.kind == MAPPED:
        if d.charged[f]:
            return
        d.charged[f] = 1
        d.end[f] = max(now, d.disk_free[0]) + d.seconds[d.key[f]]
        d.disk_free[0] = d.end[f]
    if d.end[f] > now:
        d.stalled[0] += d.end[f] - now
        d.now[0] = d.end[f]


@njit(cache=True)
def _cancel(d: _Disk, f: int) -> None:
    """Stop a queued read now: the disk time it had not used yet goes to the reads queued after it."""
    now = d.now[0]
    if d.kind != QUEUED or d.end[f] <= now:
        return
    head, tail = d.head[0], d.tail[0]
    position = head
    while position < tail and d.queue[position] != f:
        position += 1
    if position == tail:
        return
    cut = max(now, d.start[f])
    freed = d.end[f] - cut
    unread = int(np.rint(d.size[f] * freed / (d.end[f] - d.start[f])))
    d.read_bytes[f] -= unread
    d.extra[BYTES_READ] -= unread
    d.end[f] = cut
    for n in range(position + 1, tail):
        later = d.queue[n]
        d.start[later] -= freed
        d.end[later] -= freed
        d.queue[n - 1] = later
    d.tail[0] = tail - 1
    d.disk_free[0] -= freed


@njit(cache=True)
def _sweep_cancelled(d: _Disk) -> None:
    """The cancelled reads that have finished count their bytes as wasted."""
    kept = 0
    for n in range(d.cancelled_count[0]):
        f = d.cancelled[n]
        if _done(d, f):
            d.extra[WASTED_BYTES] += d.read_bytes[f]
            d.live[f] = 0
        else:
            d.cancelled[kept] = f
            kept += 1
    d.cancelled_count[0] = kept


@njit(cache=True)
def _replay(
    r: _Recorded,
    s: LedgerState,
    p: PredictorState,
    d: _Disk,
    batches: _Batches,
    tolerance: float,
    warmup: int,
    repeats: int,
    totals: np.ndarray,
    timing: np.ndarray,
) -> None:
    """The decoder's calls into the store for every call of the trace, ``warmup + repeats`` times; the repeats'
    decode steps add their counters to ``totals`` and their tokens, seconds, stall to ``timing`` (with lookups).

    One loop on purpose: split into helpers (even inlined ones), it ran 12-15% slower. The exception is what the
    store runs too (the ledger's calls, the predictors inside ``route_done``): written once for both.
    """
    layers, num_experts, k = len(r.moe_layers), s.num_experts, r.k
    before = np.zeros(len(totals), np.int64)
    resident = np.zeros(num_experts, np.bool_)
    for n in range(warmup + repeats):
        for c in range(len(r.bounds)):
            a, b = r.bounds[c]
            scored = n >= warmup and c > 0 and b - a == 1
            began, stalled = d.now[0], d.stalled[0]
            before[: len(s.counters)] = s.counters
            before[len(s.counters) :] = d.extra
            pinned = ledger.begin_forward(s)
            reads = np.empty(pinned, np.int64)
            for m in range(pinned):
                reads[m] = _fetch(d, s.out[m])
            for m in range(pinned):
                _wait(d, reads[m])
                d.live[reads[m]] = 0
            step = r.compute[c]
            for li in range(layers):
                layer = r.moe_layers[li]
                d.now[0] += step
                if tolerance > 0:
                    ledger.cached_experts(s, layer, resident)
                    for m in range(s.staged_count[0]):
                        key = s.staged[m]
                        if key // num_experts == layer and _done(d, d.staged[key]):
                            resident[key % num_experts] = True
                    experts = _route(r, a, b, li, tolerance, resident)
                    chosen = np.unique(experts)
                else:
                    experts = r.top_ids[a:b, li, :k]
                    chosen = r.chosen[r.chosen_at[c * layers + li] : r.chosen_at[c * layers + li + 1]]
                _record(batches, layer, chosen, scored)
                timing[0].lookups += len(chosen)
                if d.cancelled_count[0]:
                    _sweep_cancelled(d)
                cancelled, starts = ledger.request(s, layer, chosen)
                for m in range(cancelled):
                    f = d.staged[s.cancelled[m]]
                    _cancel(d, f)
                    d.cancelled[d.cancelled_count[0]] = f
                    d.cancelled_count[0] += 1
                base = layer * num_experts
                for expert in chosen:
                    if s.current[expert] == ledger.STAGED_READ:
                        d.current[expert] = d.staged[base + expert]
                        s.counters[ledger.PREFETCH_TIMELY] += _done(d, d.current[expert])
                for m in range(starts):
                    d.current[s.out[m]] = _fetch(d, base + s.out[m])
                staged = ledger.route_done(s, p, layer, experts, r.top_ids[b - 1, li], r.lookahead[a:b, li])
                for m in range(staged):
                    d.staged[s.out[m]] = _fetch(d, s.out[m])
                share = step / len(chosen)
                for expert in chosen:
                    if s.current[expert] == ledger.CACHED:
                        d.now[0] += share
                        continue
                    was, starts = ledger.take(s, layer, expert)
                    if was == ledger.WAITING:
                        d.current[expert] = _fetch(d, base + expert)
                    for m in range(starts):
                        d.current[s.out[m]] = _fetch(d, base + s.out[m])
                    _wait(d, d.current[expert])
                    d.live[d.current[expert]] = 0
                    ledger.admit(s, layer, expert)
                    d.now[0] += share
            if scored:
                totals[: len(s.counters)] += s.counters - before[: len(s.counters)]
                totals[len(s.counters) :] += d.extra - before[len(s.counters) :]
                timing[0].tokens += 1
                timing[0].seconds += d.now[0] - began
                timing[0].stall += d.stalled[0] - stalled


@njit(cache=True)
def _route(r: _Recorded, a: int, b: int, li: int, tolerance: float, resident: np.ndarray) -> np.ndarray:
    """The experts [T, k] the decoder picks with cache-aware routing, given what is ``resident``; only the best R
    of each token's probabilities are known (the rest are zero)."""
    order = r.top_ids[a:b, li]
    probs = np.zeros((b - a, len(resident)), np.float32)
    for t in range(b - a):
        probs[t, order[t]] = r.top_probs[a + t, li]
    return prefer_resident(probs, order, r.k, tolerance, resident)


@njit(cache=True)
def _record(batches: _Batches, layer: int, chosen: np.ndarray, scored: bool) -> None:
    n = batches.filled[0]
    start = batches.at[n]
    batches.experts[start : start + len(chosen)] = chosen
    batches.at[n + 1] = start + len(chosen)
    batches.layer[n], batches.counted[n] = layer, scored
    batches.filled[0] = n + 1


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
    fmt = result.config["cache_format"]
    each = f"{format_bytes(result.cache_entry_bytes)} each as {fmt}"
    shared = " on average (cache_scope global)" if result.config["cache_scope"] == "global" else ""
    held = f"{result.cached_experts_per_layer:.3g} experts per MoE layer{shared} ({each})"
    rows = [
        ("cache holds", held if result.config["cache_policy"] != "none" else "nothing (cache_policy none)"),
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
    needs_candidates = config.predictor in READS_RANKINGS and trace.candidates < trace.num_experts
    if needs_candidates and k + config.prefetch_extra > trace.candidates:
        raise ValueError(
            f"prefetch_extra {config.prefetch_extra} needs {k + config.prefetch_extra} candidates per layer; "
            f"the trace recorded {trace.candidates}"
        )
    if config.predictor in READS_LOOKAHEAD and trace.depth == 0:
        raise ValueError(
            f"predictor {config.predictor!r} replays gate_lookahead's proposals, and this trace has none (imported "
            "from a routing log): choose another predictor (previous_token, coactivation) or record the trace with "
            "`autoresearch trace`"
        )
    if config.predictor in READS_LOOKAHEAD and config.prefetch_depth > trace.depth:
        raise ValueError(f"prefetch_depth {config.prefetch_depth} exceeds the {trace.depth} layers the trace recorded")
    return k


def _stored_format(weights: str, group_size: int | None) -> str:
    return f"int4-g{group_size or DEFAULT_GROUP_SIZE}" if weights == "int4" else repr(weights)
