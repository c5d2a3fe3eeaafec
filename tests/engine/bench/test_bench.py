"""The benchmark protocol: enforced limits, cold reads, quality against the reference, statistics, errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine import generate, load_model
from engine.analysis.routing_stats import RoutingRecorder
from engine.bench.memory_limit import detect_controller
from engine.bench.protocol import BenchFailure, BenchRequest, resident_bytes, run_bench
from engine.bench.stats import median_ci, ratio_ci, slowest_window
from engine.bench.worker import _disk_read_bytes
from engine.bench.workloads import get_workload
from engine.config import EngineConfig
from engine.formats.repack import repack
from engine.formats.weights import weights_dir
from engine.synth import SynthShape, synthesize

SHAPE = SynthShape("qwen3_moe", 128, 2, 4, 2, 32, 16, 4, 256, 512)
PAGE = os.sysconf("SC_PAGE_SIZE")
can_limit = pytest.mark.skipif(
    isinstance(detect_controller(), str), reason=f"no enforceable memory limit here: {detect_controller()}"
)
linux_io = pytest.mark.skipif(_disk_read_bytes() is None, reason="needs /proc/self/io (Linux)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("bench") / "model", SHAPE, dtype="bf16")


def _request(model_dir: Path, tmp_path: Path, **kwargs) -> BenchRequest:
    defaults = {"config": EngineConfig(), "workload": get_workload("decode-short"), "repeats": 2, "cache_dir": tmp_path}
    return BenchRequest(model=model_dir, **{**defaults, **kwargs})


@can_limit
def test_a_run_over_the_enforced_limit_fails_as_out_of_memory(model_dir, tmp_path):
    limit = resident_bytes(model_dir) + (8 << 20)  # above the weights, below what Python and numpy need
    with pytest.raises(BenchFailure) as failure:
        run_bench(_request(model_dir, tmp_path, memory_limit=limit, cache_dir=None))
    assert failure.value.reason == "out_of_memory"
    assert "limit" in str(failure.value)


@can_limit
@linux_io
def test_result_under_an_enforced_limit(model_dir, tmp_path):
    result = run_bench(_request(model_dir, tmp_path, memory_limit=512 << 20))
    assert result.memory_limit["enforced"] and result.memory_limit["mechanism"].startswith("cgroup")
    assert 0 < result.memory_peak_bytes <= 512 << 20
    assert result.cold["enforced"]
    assert result.repeats == len(result.per_repeat) == 2
    assert result.decode_tok_s_ci[0] <= result.decode_tok_s <= result.decode_tok_s_ci[1]
    expert_bytes = 3 * SHAPE.hidden_size * SHAPE.moe_intermediate_size * 2
    assert result.bytes_read_per_token == SHAPE.num_layers * SHAPE.top_k * expert_bytes
    # every cold repeat fetched its experts from the disk during the prefill
    assert all(r["prefill"]["disk_bytes"] >= expert_bytes for r in result.per_repeat)
    assert result.quality_top1 == 1.0 and abs(result.quality_kl) < 1e-6  # the defaults are the reference (stored fp32)
    assert result.quality_top1_excluded < 0.05  # a tie-free model decides (nearly) every position
    assert result.to_dict()["schema_version"] == 4
    assert result.hit_rate is None and result.prefetch_precision is None  # no cache, no predictor
    assert "nothing (no cache)" in result.summary()
    assert "decode tok/s" in result.summary()


@linux_io
@pytest.mark.parametrize("repacked", [False, True])
def test_cold_reads_fetch_exactly_the_routed_experts_pages(model_dir, tmp_path, repacked):
    """After dropping the model's pages, the bytes fetched from storage are the pages of the experts used, for a
    checkpoint and for a repacked copy (whose experts live in experts.bin, outside the checkpoint's shards)."""
    if repacked:
        model_dir = repack(model_dir, tmp_path / "int8", "int8").out_dir
    model = load_model(model_dir)
    workload = get_workload("decode-short")
    prompt = workload.tokens(model)
    generate(model, prompt, 2, workload.sampler(model), stop_at_eos=False)  # lazy imports read code files: do them now
    assert model.drop_cached_pages()
    before = _disk_read_bytes()
    with RoutingRecorder(model.decoder) as recorder:
        generate(model, prompt, 8, workload.sampler(model), stop_at_eos=False)
    fetched = _disk_read_bytes() - before
    pages = set()
    for layer, experts in recorder.routing().items():
        for expert in np.unique(experts):
            for r in model.decoder.store.layouts[(layer, int(expert))].ranges:
                pages |= {(r.path, p) for p in range(r.offset // PAGE, (r.offset + r.nbytes - 1) // PAGE + 1)}
    # a few extra pages are filesystem metadata, which dropping the model's pages does not touch
    assert len(pages) * PAGE <= fetched <= (len(pages) + 16) * PAGE
    model.close()


def test_quality_sees_fewer_experts(model_dir, tmp_path):
    result = run_bench(_request(model_dir, tmp_path, config=EngineConfig(top_k=1), repeats=1, cold=False))
    assert result.quality_top1 < 1.0 and result.quality_kl > 0
    assert result.bytes_read_per_token == SHAPE.num_layers * 1 * 3 * SHAPE.hidden_size * SHAPE.moe_intermediate_size * 2


def test_vs_interleaves_and_reports_a_ratio(model_dir, tmp_path):
    result = run_bench(_request(model_dir, tmp_path, vs=EngineConfig(top_k=2), repeats=2, cold=False))
    assert result.vs is not None and result.vs["config"] == EngineConfig(top_k=2).to_dict()
    low, high = result.vs["ratio_ci"]
    assert low <= result.vs["ratio"] <= high
    assert len(result.vs["result"]["per_repeat"]) == 2


def test_limit_below_the_resident_weights_is_refused(model_dir, tmp_path):
    with pytest.raises(ValueError, match="resident"):
        run_bench(_request(model_dir, tmp_path, memory_limit=1024))


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        get_workload("nope")
    with pytest.raises(ValueError, match="repeats"):
        BenchRequest(Path("."), EngineConfig(), get_workload("decode-short"), repeats=0)


def test_median_ci_and_ratio_ci():
    values = [10.0, 11.0, 9.0, 10.5, 9.5]
    median, low, high = median_ci(values)
    assert median == 10.0 and low <= median <= high and high - low <= 2.0
    ratio, low, high = ratio_ci([20.0, 22.0, 18.0], [10.0, 11.0, 9.0])
    assert ratio == 2.0 and low == high == 2.0  # every pair has the same ratio


def test_slowest_window_finds_a_throttled_stretch():
    steps = [0.1] * 50 + [0.4] * 10 + [0.1] * 40  # tokens 50-59 four times slower
    window, span = slowest_window(steps)
    assert window < 5.0  # the fast stretches run at 10 tok/s
    assert span > 0


def test_the_reference_is_computed_once_per_model_and_workload(model_dir, tmp_path):
    run_bench(_request(model_dir, tmp_path, repeats=1, cold=False))
    references = list((tmp_path / "references").iterdir())
    assert len(references) == 1
    stamp = references[0].stat().st_mtime_ns
    run_bench(_request(model_dir, tmp_path, repeats=1, cold=False, config=EngineConfig(top_k=2)))
    assert [p.stat().st_mtime_ns for p in (tmp_path / "references").iterdir()] == [stamp]
    run_bench(_request(model_dir, tmp_path, repeats=1, cold=False, workload=get_workload("score-512")))
    assert len(list((tmp_path / "references").iterdir())) == 2


def test_reference_key_changes_with_model_or_workload(model_dir):
    from engine.bench.fingerprint import model_identity
    from engine.bench.quality import reference_key

    identity = model_identity(model_dir)
    key = reference_key(identity, "decode-short", 1)
    assert key == reference_key(identity, "decode-short", 1)
    assert key != reference_key(identity, "decode-short", 2)
    assert key != reference_key(identity, "decode-long", 1)
    assert key != reference_key({**identity, "config_sha256": "0"}, "decode-short", 1)


def test_cache_and_prefetch_metrics(model_dir, tmp_path):
    expert = 3 * SHAPE.hidden_size * SHAPE.moe_intermediate_size * 4
    config = EngineConfig(cache_policy="lru", cache_bytes=4 * expert, predictor="gate_lookahead", prefetch_extra=1)
    result = run_bench(_request(model_dir, tmp_path, config=config, repeats=1, cold=False))
    assert 0 <= result.hit_rate <= 1
    assert result.cached_experts_per_layer == 4 / SHAPE.num_layers  # float32 experts: the dequantized format
    assert f"{4 / SHAPE.num_layers:.3g} experts per MoE layer on average, as dequantized" in result.summary()
    assert 0 <= result.prefetch_precision <= 1 and 0 <= result.prefetch_recall <= 1
    assert 0 <= result.prefetch_timeliness <= 1
    assert result.wasted_bytes_per_token >= 0
    assert result.quality_top1 == 1.0  # caching and prefetching never change the output
    for line in ("hit rate", "prefetch precision", "prefetch recall", "prefetch timeliness"):
        assert line in result.summary()


def test_quality_of_repacked_weights_is_against_the_original(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))  # children inherit it
    config = EngineConfig(weights="int4")
    result = run_bench(_request(model_dir, tmp_path, config=config, repeats=1, cold=False))
    assert result.config["weights"] == "int4" and result.quality_kl > 0
    copy = weights_dir(model_dir, "int4")
    assert run_bench(_request(copy, tmp_path, repeats=1, cold=False)).quality_kl == pytest.approx(result.quality_kl)


def test_a_repacked_model_without_its_source_cannot_measure_quality(model_dir, tmp_path):
    source = shutil.copytree(model_dir, tmp_path / "source")
    copy = tmp_path / "int8"
    repack(source, copy, "int8")
    shutil.rmtree(source)
    with pytest.raises(ValueError, match=f"{copy} is repacked, and the checkpoint it was made from .* is gone"):
        run_bench(_request(copy, tmp_path, repeats=1, cold=False))
    assert run_bench(_request(copy, tmp_path, repeats=1, cold=False, cache_dir=None)).quality_kl is None
