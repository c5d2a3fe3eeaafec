"""DeepSeek-V3's experts stream, cache, prefetch, repack and replay as every other architecture's do.

Its shape differs where the store could notice: dense first layers (MoE layers do not start at 0), a shared
expert beside the routed ones, and a grouped sigmoid router whose scores drive cache-aware routing and the
lookahead predictor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.simulator import simulate
from engine.synth import SynthShape, synthesize
from engine.trace import load_trace, record_trace
from tests.engine.test_simulator import EXACT, WORKLOAD, engine_decode_counters
from tests.engine.test_streaming import run

SHAPE = SynthShape("deepseek_v3", 64, 4, 4, 4, 16, 16, 2, 32, 512, dense_layers=1, shared_experts=1)
EXPERT_BF16_BYTES = 3 * 64 * 32 * 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("deepseek") / "m", SHAPE, dtype="bf16", shard_bytes=64 << 10)


@pytest.fixture(scope="module")
def packed_reference(model_dir: Path) -> np.ndarray:
    return run(model_dir, EngineConfig(cache_format="packed"))[0]


STREAMING = [
    EngineConfig(io_mode="direct", cache_policy="lru", cache_bytes=10 * EXPERT_BF16_BYTES, predictor="gate_lookahead"),
    EngineConfig(io_mode="mmap", cache_policy="lfu", cache_bytes=10 * EXPERT_BF16_BYTES, predictor="coactivation"),
    EngineConfig(
        io_mode="pread", cache_policy="slru", cache_bytes=12 * EXPERT_BF16_BYTES, cache_scope="per_layer",
        predictor="previous_token", prefetch_depth=2, prefetch_extra=1,
    ),
]  # fmt: skip


@pytest.mark.parametrize("config", STREAMING, ids=lambda c: f"{c.io_mode}-{c.cache_policy}-{c.predictor}")
def test_streamed_logits_are_bit_identical(model_dir, packed_reference, config) -> None:
    config = EngineConfig(**{**config.to_dict(), "cache_format": "packed", "io_threads": 3, "io_block_bytes": 4096})
    logits, stats = run(model_dir, config)
    assert np.array_equal(logits, packed_reference)
    assert stats["hits"] > 0
    assert stats["prefetch_issued"] > 0


def test_int8_repack_stays_close_to_the_original(model_dir, packed_reference) -> None:
    # a mean, not a max: where two experts' scores lie within int8's rounding, a token routes elsewhere
    logits, _ = run(model_dir, EngineConfig(weights="int8", cache_format="packed"))
    assert np.abs(logits - packed_reference).mean() <= 0.01 * np.abs(packed_reference).max()
    assert np.mean(logits.argmax(-1) == packed_reference.argmax(-1)) >= 0.9


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(cache_policy="lru", cache_bytes=10 * 3 * 64 * 32 * 4, predictor="gate_lookahead"),
        EngineConfig(cache_policy="lfu", cache_bytes=6 * 3 * 64 * 32 * 4, cache_scope="per_layer"),
        EngineConfig(cache_policy="static", cache_bytes=10 * 3 * 64 * 32 * 4, predictor="coactivation"),
    ],
    ids=["lru-lookahead", "lfu-per-layer", "static-coactivation"],
)
def test_replay_counts_what_the_engine_counts(model_dir, tmp_path, config) -> None:
    trace = record_trace(model_dir, WORKLOAD, EngineConfig()).save(tmp_path / "trace.npz")
    assert load_trace(trace).moe_layers == [1, 2, 3]
    engine = engine_decode_counters(model_dir, config)
    sim = simulate(load_trace(trace), config)
    for name in EXACT:
        assert sim.counters[name] == engine[name], name
