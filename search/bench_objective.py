"""The search benchmark's objective: a config the tuner's space gives, scored in about ten milliseconds.

Decode speed is the trace simulator's prediction (the trace of the config's weights format, reads served at the
bandwidth the engine's reader reaches with the config's I/O settings, interpolated in log2 of the request size and
of the reads in flight); quality is the measured table's, for the config's format and active experts, linear in the
cache-aware routing tolerance between the measured ones. Deterministic: the same config gives the same figures.
Settings that change only the compute (``compute_threads``, ``cache_format``, ``activations``,
``resident_weights``) score alike: the simulator replays the trace's compute time, and the quality table holds
float32 activations and the original resident weights only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from engine.analysis.simulator import simulate
from engine.analysis.trace import Trace, load_trace
from engine.config import EngineConfig
from search.bench_fixtures import READER_BLOCKS, READER_THREADS, TOLERANCES, Fixtures, format_key, quality_key


@dataclass(frozen=True)
class Outcome:
    decode_tok_s: float
    quality_top1: float
    quality_kl: float


class Objective:
    """``objective(config) -> Outcome``, memoised (the samplers propose the same config again and again)."""

    def __init__(self, fixtures: Fixtures) -> None:
        self.fixtures = fixtures
        self.traces: dict[str, Trace] = {fmt: load_trace(path) for fmt, path in fixtures.traces.items()}
        self._memo: dict[str, Outcome] = {}
        self.evaluations = 0  # simulations actually run

    def __call__(self, config: EngineConfig) -> Outcome:
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in self._memo:
            self._memo[key] = self._evaluate(config)
            self.evaluations += 1
        return self._memo[key]

    def _evaluate(self, config: EngineConfig) -> Outcome:
        fmt = format_key(config.weights, config.group_size)
        result = simulate(self.traces[fmt], config, self.bandwidth(config), optimal=False)
        top1, kl = self.quality(config)
        return Outcome(result.predicted_decode_tok_s or 0.0, top1, kl)

    def bandwidth(self, config: EngineConfig) -> float:
        if config.io_mode == "mmap":
            return self.fixtures.mmap_bandwidth
        row = self.fixtures.reader[format_key(config.weights, config.group_size)]
        grid = np.asarray(row[config.io_mode])  # [blocks, threads]
        threads = math.log2(config.io_threads)
        by_block = [np.interp(threads, np.log2(READER_THREADS), grid[b]) for b in range(len(READER_BLOCKS))]
        return float(np.interp(math.log2(config.io_block_bytes), np.log2(READER_BLOCKS), by_block))

    def quality(self, config: EngineConfig) -> tuple[float, float]:
        fmt = format_key(config.weights, config.group_size)
        k = config.top_k or self.fixtures.model_top_k
        rows = [self.fixtures.quality[quality_key(fmt, k, t)] for t in TOLERANCES]
        top1 = float(np.interp(config.cache_routing_tolerance, TOLERANCES, [r["top1"] for r in rows]))
        kl = float(np.interp(config.cache_routing_tolerance, TOLERANCES, [r["kl"] for r in rows]))
        return top1, kl
