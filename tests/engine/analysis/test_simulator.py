"""Traces and the simulator: a replay's counters are the engine's own, run for run, for every knob it replays."""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine import load_model
from engine.analysis.simulator import simulate
from engine.analysis.trace import RECORDED_EXTRA, TRACE_VERSION, TraceError, load_trace, record_trace
from engine.analysis.trace_report import write_report
from engine.bench import worker
from engine.bench.worker import measure
from engine.bench.workloads import get_workload
from engine.config import CACHE_POLICIES, PREDICTORS, EngineConfig
from engine.errors import FileError
from engine.synth import SynthShape, synthesize
from search.cli import main

SHAPE = SynthShape("qwen3_moe", 64, 4, 4, 2, 16, 16, 2, 32, 512)
WORKLOAD = get_workload("decode-short")
DEQUANTIZED_ENTRY = 3 * 64 * 32 * 4
EXACT = ("hits", "misses", "experts_loaded", "prefetch_issued", "prefetch_used", "prefetch_wasted")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # small shards and bf16: experts span files, and ranges are not page-aligned (direct reads widen them)
    return synthesize(tmp_path_factory.mktemp("sim") / "m", SHAPE, dtype="bf16", shard_bytes=64 << 10)


@pytest.fixture(scope="module")
def trace_path(model_dir: Path, tmp_path_factory) -> Path:
    trace = record_trace(model_dir, WORKLOAD, EngineConfig())
    return trace.save(tmp_path_factory.mktemp("trace") / "decode-short.npz")


def engine_decode_counters(model_dir: Path, config: EngineConfig) -> dict:
    """The store's counters over the decode steps of the second pass, as the benchmark measures a repeat."""
    model = load_model(model_dir, config)
    try:
        prompt = WORKLOAD.tokens(model)
        measure(model, WORKLOAD, prompt)
        return measure(model, WORKLOAD, prompt)["decode"]
    finally:
        model.close()


def configs() -> list[EngineConfig]:
    out = []
    for policy in CACHE_POLICIES:
        for predictor in PREDICTORS:
            out.append(
                EngineConfig(
                    cache_policy=policy, cache_bytes=16 * DEQUANTIZED_ENTRY, predictor=predictor, prefetch_depth=2
                )
            )
    out += [
        EngineConfig(cache_policy="lru", cache_bytes=6 * DEQUANTIZED_ENTRY, cache_scope="per_layer"),
        EngineConfig(cache_policy="slru", cache_bytes=200_000, cache_format="packed", io_mode="direct"),
        EngineConfig(cache_policy="lfu", cache_bytes=100_000, cache_format="packed", io_mode="mmap"),
        EngineConfig(io_mode="direct", predictor="gate_lookahead", prefetch_extra=3, prefetch_depth=3),
    ]
    return out


@pytest.mark.parametrize("config", configs(), ids=lambda c: json.dumps(c.to_dict(), separators=(",", ":")))
def test_replay_counts_what_the_engine_counts(model_dir, trace_path, config) -> None:
    engine = engine_decode_counters(model_dir, config)
    sim = simulate(load_trace(trace_path), config)  # infinite bandwidth: every read done at once
    for name in EXACT:
        assert sim.counters[name] == engine[name], name
    if config.predictor == "none":  # every read is waited for: the engine is synchronous
        assert engine["bytes_read"] == sim.counters["bytes_read"]
    else:  # the engine skips what a cancel reaches before it is read, and counts reads when they land
        edges = 2 * config.prefetch_depth * (SHAPE.top_k + config.prefetch_extra) * 16384  # the window's two ends
        needed = sim.counters["bytes_read"] - sim.counters["wasted_bytes"]  # every read a layer then used
        assert needed - edges <= engine["bytes_read"] <= sim.counters["bytes_read"] + edges
    assert sim.hits <= sim.optimal_hit_rate * sim.accesses + 1e-9
    assert sim.decode_tokens == WORKLOAD.new_tokens - 1


def test_bound_is_reached_by_a_cache_that_holds_everything(trace_path) -> None:
    config = EngineConfig(cache_policy="lru", cache_bytes=SHAPE.num_layers * 16 * DEQUANTIZED_ENTRY)
    sim = simulate(load_trace(trace_path), config)
    assert sim.hit_rate == sim.optimal_hit_rate == 1.0  # after a warm-up pass, nothing is ever evicted


def test_timing_model_serves_reads_at_the_bandwidth(trace_path) -> None:
    trace = load_trace(trace_path)
    config = EngineConfig(io_mode="direct")
    reads_only = simulate(trace, config, bandwidth=1e8, decode_seconds_per_token=0.0)
    assert reads_only.predicted_decode_tok_s == pytest.approx(1e8 / reads_only.bytes_read_per_token, rel=1e-9)
    assert reads_only.io_stall_frac == pytest.approx(1.0)
    both = simulate(trace, config, bandwidth=1e8, decode_seconds_per_token=0.01)
    serial = 1 / (0.01 + both.bytes_read_per_token / 1e8)  # no overlap at all
    assert serial <= both.predicted_decode_tok_s <= min(100.0, 1e8 / both.bytes_read_per_token)
    assert 0 < both.io_stall_frac < 1
    compute_only = simulate(trace, config, decode_seconds_per_token=0.01)
    assert compute_only.predicted_decode_tok_s == pytest.approx(100.0) and compute_only.io_stall_frac == 0


def test_prefetch_hides_reads_behind_compute(trace_path) -> None:
    trace = load_trace(trace_path)
    plain = simulate(trace, EngineConfig(io_mode="direct"), bandwidth=1e8, decode_seconds_per_token=0.01)
    ahead = EngineConfig(io_mode="direct", predictor="gate_lookahead", prefetch_extra=2)
    prefetched = simulate(trace, ahead, bandwidth=1e8, decode_seconds_per_token=0.01)
    assert prefetched.io_stall_frac < plain.io_stall_frac
    assert prefetched.prefetch_timely > 0


def test_cache_aware_routing_replays_from_the_recorded_candidates(trace_path) -> None:
    trace = load_trace(trace_path)
    exact = simulate(trace, EngineConfig(cache_policy="lru", cache_bytes=8 * DEQUANTIZED_ENTRY))
    tolerant = simulate(
        trace, EngineConfig(cache_policy="lru", cache_bytes=8 * DEQUANTIZED_ENTRY, cache_routing_tolerance=0.5)
    )
    assert tolerant.hit_rate > exact.hit_rate


def test_trace_round_trips(model_dir, trace_path) -> None:
    trace = load_trace(trace_path)
    assert trace.meta["version"] == TRACE_VERSION and trace.meta["workload"]["name"] == WORKLOAD.name
    assert trace.call_tokens.tolist() == [WORKLOAD.prompt_tokens] + [1] * (WORKLOAD.new_tokens - 1)
    n, layers, r = trace.top_ids.shape
    assert (n, layers) == (len(trace.token_ids), SHAPE.num_layers) and r == SHAPE.top_k + RECORDED_EXTRA
    assert (np.diff(trace.top_probs, axis=2) <= 0).all()  # best first
    assert trace.lookahead_ids[:, -1].max() == -1  # nothing after the last layer
    again = trace.save(trace_path.with_name("again.npz"))
    assert load_trace(again).meta == trace.meta


def test_the_recorded_pass_follows_a_warm_up(model_dir, monkeypatch) -> None:
    """Compiling at first use must not count as the trace's compute time."""
    passes: list[bool] = []

    def counting(model, workload, prompt):
        passes.append(model.decoder.route_observer is not None)
        return measure(model, workload, prompt)

    monkeypatch.setattr(worker, "measure", counting)
    trace = record_trace(model_dir, WORKLOAD, EngineConfig())
    assert passes == [False, True]
    assert trace.call_tokens.tolist() == [WORKLOAD.prompt_tokens] + [1] * (WORKLOAD.new_tokens - 1)


def test_bad_traces_name_the_file_and_field(trace_path, tmp_path) -> None:
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "missing.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(trace_path.read_bytes()[:1000])
    with pytest.raises(FileError, match=r"truncated\.npz: not a trace"):
        load_trace(truncated)
    with np.load(trace_path) as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(str(arrays["meta"]))
    for field, change in (
        ("version", lambda a, m: m.update(version=99)),
        ("top_ids", lambda a, m: a.pop("top_ids")),
        ("top_probs", lambda a, m: a.update(top_probs=a["top_probs"][:-1])),
        ("call_tokens", lambda a, m: a.update(call_tokens=a["call_tokens"] + 1)),
        ("decode_seconds_per_token", lambda a, m: m.pop("decode_seconds_per_token")),
        ("moe_layers", lambda a, m: m.update(moe_layers=48)),
        ("extra", lambda a, m: a.update(extra=np.zeros(3))),
        ("lookahead_ids", lambda a, m: a["lookahead_ids"].__setitem__((0, 0, 0, 0), -1)),
    ):
        bad_arrays = {name: array.copy() for name, array in arrays.items()}
        bad_meta = json.loads(json.dumps(meta))
        change(bad_arrays, bad_meta)
        bad_arrays["meta"] = np.asarray(json.dumps(bad_meta))
        path = tmp_path / f"bad-{field}.npz"
        with path.open("wb") as f:
            np.savez(f, **bad_arrays)
        with pytest.raises(TraceError, match=rf"bad-{field}\.npz: field '{field}'"):
            load_trace(path)
    assert zipfile.is_zipfile(trace_path)


def test_configs_the_trace_cannot_replay_are_errors(trace_path) -> None:
    trace = load_trace(trace_path)
    with pytest.raises(ValueError, match="recorded with weights 'original'"):
        simulate(trace, EngineConfig(weights="int8"))
    with pytest.raises(ValueError, match="top_k 3 exceeds the 2"):
        simulate(trace, EngineConfig(top_k=3))
    with pytest.raises(ValueError, match="prefetch_depth 9 exceeds"):
        simulate(trace, EngineConfig(predictor="gate_lookahead", prefetch_depth=9))
    with pytest.raises(ValueError, match="prefetch_extra 9 needs 11 candidates per layer; the trace recorded 10"):
        simulate(trace, EngineConfig(predictor="previous_token", prefetch_extra=9))


def test_report_trace_writes_a_page_with_its_plots(trace_path, tmp_path) -> None:
    page = write_report(load_trace(trace_path), tmp_path, "decode-short")
    text = page.read_text()
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert len(images) == 5
    for image in images:
        assert (tmp_path / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "optimal" in text and "| lru |" in text
    lookahead = simulate(load_trace(trace_path), EngineConfig(predictor="gate_lookahead"), optimal=False)
    assert f"| gate_lookahead | {100 * lookahead.prefetch_precision:.1f}% | " in text


def test_cli_records_simulates_and_reports(model_dir, tmp_path, capsys) -> None:
    trace = tmp_path / "t.npz"
    assert main(["trace", "--model", str(model_dir), "--workload", "decode-short", "--out", str(trace)]) == 0
    config = tmp_path / "engine.toml"
    config.write_text('[engine]\ncache_policy = "lru"\ncache_bytes = "200KiB"\npredictor = "coactivation"\n')
    assert main(["simulate", "--trace", str(trace), "--config", str(config), "--bandwidth", "1GB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["predicted_decode_tok_s"] > 0 and 0 < result["hit_rate"] <= result["optimal_hit_rate"]
    assert main(["simulate", "--trace", str(trace), "--config", str(config), "--reader", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["bandwidth"] > 0
    assert main(["report-trace", str(trace), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "t.md").exists()
    assert main(["simulate", "--trace", str(tmp_path / "nope.npz")]) == 2
    assert "nope.npz: no such trace file" in capsys.readouterr().err


def test_mmap_reads_are_page_faults_at_compute_time(trace_path) -> None:
    trace = load_trace(trace_path)
    mapped = EngineConfig(io_mode="mmap", cache_format="packed", predictor="gate_lookahead")
    sim = simulate(trace, mapped, bandwidth=1e8, decode_seconds_per_token=0.01)
    direct = EngineConfig(io_mode="direct", cache_format="packed", predictor="gate_lookahead")
    ahead = simulate(trace, direct, bandwidth=1e8, decode_seconds_per_token=0.01)
    assert sim.counters["bytes_read"] == 0  # as the engine counts it: the mapping is the data
    assert sim.predicted_decode_tok_s < ahead.predicted_decode_tok_s  # faults one at a time, nothing read ahead


def test_the_default_int4_group_size_is_the_same_format(trace_path) -> None:
    trace = load_trace(trace_path)
    meta = {**trace.meta, "recorded_with": {**trace.meta["recorded_with"], "weights": "int4"}}
    int4 = dataclasses.replace(trace, meta=meta)
    assert simulate(int4, EngineConfig(weights="int4", group_size=64)).accesses > 0
    with pytest.raises(ValueError, match="int4-g64"):
        simulate(int4, EngineConfig(weights="int4", group_size=32))
