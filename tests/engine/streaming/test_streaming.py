"""Expert streaming: every I/O mode, cache policy and predictor gives exactly engine part 1's logits.

Reads, caching and prefetching must change where the bytes come from, never the numbers: logits are compared
for equality with the synchronous reader (the default config), over a prompt and several decode steps.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine import load_model
from engine.bench.streaming import stream_throughput
from engine.config import CACHE_FORMATS, CACHE_POLICIES, IO_MODES, PREDICTORS, EngineConfig
from engine.errors import CheckpointError
from engine.synth import SynthShape, synthesize

SHAPE = SynthShape("qwen3_moe", 64, 4, 4, 2, 16, 16, 2, 32, 512)
EXPERT_FP32_BYTES = 3 * 64 * 32 * 4
PROMPT = list(range(3, 40, 2))
DECODE_STEPS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # small shards, so that experts live in several files; bf16, whose ranges are not page-aligned
    return synthesize(tmp_path_factory.mktemp("stream") / "m", SHAPE, dtype="bf16", shard_bytes=64 << 10)


def run(model_dir: Path, config: EngineConfig) -> tuple[np.ndarray, dict]:
    """Logits of the prompt then of greedy decode steps, and the store's counters."""
    model = load_model(model_dir, config)
    try:
        decoder = model.decoder
        cache = decoder.new_cache()
        rows = [decoder.forward(np.asarray(PROMPT), cache)]
        for _ in range(DECODE_STEPS):
            token = int(np.argmax(rows[-1][-1]))
            rows.append(decoder.forward(np.asarray([token]), cache))
        return np.concatenate(rows), decoder.store.stats.snapshot()
    finally:
        model.close()


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> np.ndarray:
    return run(model_dir, EngineConfig())[0]


@pytest.fixture(scope="module")
def packed_reference(model_dir: Path) -> np.ndarray:
    return run(model_dir, EngineConfig(cache_format="packed"))[0]


def test_packed_compute_agrees_with_float32(reference, packed_reference) -> None:
    # the fused kernels sum in another order: equal to float32 rounding, not bit for bit
    np.testing.assert_allclose(packed_reference, reference, rtol=1e-4, atol=1e-4)


COMBINATIONS = list(itertools.product(CACHE_FORMATS, IO_MODES, CACHE_POLICIES, PREDICTORS))


@pytest.mark.parametrize(("cache_format", "io_mode", "policy", "predictor"), COMBINATIONS)
def test_logits_are_bit_identical(
    model_dir, reference, packed_reference, cache_format, io_mode, policy, predictor
) -> None:
    config = EngineConfig(
        cache_format=cache_format,
        io_mode=io_mode,
        cache_policy=policy,
        cache_bytes=10 * EXPERT_FP32_BYTES // (2 if cache_format == "packed" else 1),  # 10 of 64: evictions
        predictor=predictor,
        prefetch_depth=2,
        prefetch_extra=1,
        io_block_bytes=4096,  # several requests per range
        io_threads=3,
    )
    logits, stats = run(model_dir, config)
    assert np.array_equal(logits, packed_reference if cache_format == "packed" else reference)
    accesses = stats["hits"] + stats["misses"]
    assert accesses > 0
    if policy == "none":
        assert stats["hits"] == 0
    if predictor == "none":
        assert stats["prefetch_issued"] == 0
    else:
        assert stats["prefetch_used"] + stats["prefetch_wasted"] <= stats["prefetch_issued"]
        assert stats["prefetch_timely"] <= stats["prefetch_used"]


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_a_cache_big_enough_for_everything_reads_each_expert_once(model_dir, reference, scope) -> None:
    config = EngineConfig(cache_policy="lru", cache_bytes=64 * EXPERT_FP32_BYTES, cache_scope=scope)
    logits, stats = run(model_dir, config)
    assert np.array_equal(logits, reference)
    assert stats["misses"] == stats["experts_loaded"] <= 64
    assert stats["hits"] > 0
    assert stats["bytes_read"] == stats["misses"] * 3 * 64 * 32 * 2


def test_static_pins_the_prompts_hottest_experts(model_dir, reference) -> None:
    logits, stats = run(model_dir, EngineConfig(cache_policy="static", cache_bytes=8 * EXPERT_FP32_BYTES))
    assert np.array_equal(logits, reference)
    assert stats["hits"] > 0  # decode steps find pinned experts


def test_direct_reads_are_page_aligned(model_dir) -> None:
    model = load_model(model_dir, EngineConfig(io_mode="direct", io_block_bytes=8192))
    try:
        reader = model.decoder.store.reader
        for layout in model.decoder.store.layouts.values():
            for piece in reader.plan(layout):
                assert piece.offset % 4096 == 0 and piece.nbytes % 4096 == 0
                assert piece.skip < 4096 and piece.skip + piece.length <= piece.nbytes
    finally:
        model.close()


def test_gate_lookahead_predicts_well_on_synthetic_routing(model_dir) -> None:
    _, stats = run(model_dir, EngineConfig(predictor="gate_lookahead", prefetch_depth=1))
    assert stats["prefetch_used"] > stats["prefetch_wasted"]


def test_prefetch_bounds_what_is_in_flight(model_dir) -> None:
    model = load_model(model_dir, EngineConfig(predictor="gate_lookahead", prefetch_depth=2, prefetch_extra=3))
    try:
        store = model.decoder.store
        limit = store.ledger.state.staged_limit
        assert limit == 2 * (SHAPE.top_k + 3)
        seen = []
        real = store.route_done

        def spy(*args):
            real(*args)
            seen.append(len(store._staged))

        store.route_done = spy
        model.decoder.forward(np.asarray(PROMPT), model.decoder.new_cache())
        assert seen and max(seen) <= limit
    finally:
        model.close()


def test_cache_aware_routing_changes_only_close_calls(model_dir, reference) -> None:
    # 6 of each layer's 16 experts stay in RAM, so there is a choice to make at every layer
    cached = EngineConfig(cache_policy="lru", cache_bytes=24 * EXPERT_FP32_BYTES, cache_scope="per_layer")
    near, _ = run(model_dir, replace(cached, cache_routing_tolerance=1e-9))
    assert np.array_equal(near, reference)  # no two probabilities are that close
    far, _ = run(model_dir, replace(cached, cache_routing_tolerance=1.0))
    assert not np.array_equal(far, reference)


@pytest.mark.parametrize("io_mode", IO_MODES)
def test_a_truncated_shard_is_an_error_naming_the_file(tmp_path, io_mode) -> None:
    path = synthesize(tmp_path / "m", SHAPE, dtype="bf16", shard_bytes=64 << 10)
    model = load_model(path, EngineConfig(io_mode=io_mode))
    try:
        store = model.decoder.store
        down = store.layouts[(1, 5)].down
        with open(down.path, "r+b") as f:
            f.truncate(down.offset + 100)
        store.request(1, [5])
        with pytest.raises(CheckpointError, match=Path(down.path).name) as error:
            store.get(1, 5)
        assert "truncated" in str(error.value)
    finally:
        model.close()


def test_stream_throughput_reads_experts(model_dir) -> None:
    config = EngineConfig(io_mode="direct", io_block_bytes=4096, io_threads=2)
    bytes_per_s, footprint = stream_throughput(model_dir, config, seconds=0.2, experts_per_step=2, seed=0)
    assert bytes_per_s > 0
    assert footprint >= 2 * 3 * 64 * 32 * 2 and footprint % 4096 == 0  # two experts of three bf16 64x32 matrices


def test_compute_threads_limits_blas_and_the_kernels(model_dir, packed_reference) -> None:
    from threadpoolctl import threadpool_info

    from engine.compute import kernels
    from engine.model.load import set_compute_threads

    try:
        logits, _ = run(model_dir, EngineConfig(cache_format="packed", compute_threads=1))
        assert kernels.numba.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
        np.testing.assert_allclose(logits, packed_reference, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="compute_threads 999 exceeds"):
            load_model(model_dir, EngineConfig(compute_threads=999))
    finally:
        set_compute_threads(kernels.max_threads())


def test_compute_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="compute_threads must be an integer of at least 1"):
        EngineConfig(compute_threads=0)


@pytest.mark.parametrize("cache_format", CACHE_FORMATS)
def test_a_prefill_holds_top_k_experts_in_flight_and_one_in_use(model_dir, reference, cache_format) -> None:
    """A prompt touches most of a layer's experts at once; the store still holds no more than a decode step does:
    top_k being read and the one being computed (those a cache keeps aside)."""
    model = load_model(model_dir, EngineConfig(cache_format=cache_format, io_mode="direct"))
    try:
        decoder, store = model.decoder, model.decoder.store
        decoder.forward(np.asarray(PROMPT), decoder.new_cache())
        layers = SHAPE.num_layers
        assert store.stats.misses >= 3 * (SHAPE.top_k + 1) * layers  # many more experts than that per layer
        live = SHAPE.top_k + 1
        if cache_format == "packed":  # slots come in slabs
            slots = store.reader.slots
            assert slots.allocated_bytes <= -(-live // slots.slots_per_slab) * slots.slots_per_slab * slots.slot_bytes
        else:
            assert len(store._free) + len(store._done) + len(store._retiring) <= live
    finally:
        model.close()
