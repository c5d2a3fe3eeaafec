"""``import-trace``: a routing log (JSON Lines) and a config.json make a trace that replays as the engine's own
recording of the same routing does; a bad line is an error naming its line number and field."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest

from engine.analysis.simulator import format_result, simulate
from engine.analysis.trace import Trace, TraceError, load_trace, record_trace
from engine.analysis.trace_import import import_trace
from engine.analysis.trace_report import write_report
from engine.bench.workloads import get_workload
from engine.config import EngineConfig
from engine.synth import SynthShape, synthesize
from search.cli import main

SHAPE = SynthShape("qwen3_moe", 64, 4, 4, 2, 16, 16, 2, 32, 512)  # 4 layers, 16 experts, top-2
ENTRY = 3 * 64 * 32 * 4  # a dequantized expert: the cache's charge per expert


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, Trace]:
    model = synthesize(tmp_path_factory.mktemp("import") / "m", SHAPE, dtype="bf16")
    return model, record_trace(model, get_workload("decode-short"), EngineConfig())


def _log(trace: Trace, path: Path, sequences: int = 2) -> Path:
    """The trace's routing as a routing log: its tokens split into ``sequences``, lines shuffled."""
    k, n = trace.top_k, len(trace.token_ids)
    lines = []
    for t in range(n):
        sequence, token = divmod(t, -(-n // sequences))
        for li, layer in enumerate(trace.moe_layers):
            experts, probs = trace.top_ids[t, li, :k].tolist(), trace.top_probs[t, li, :k].tolist()
            lines.append({"token_idx": token, "layer": layer, "experts": experts[::-1], "gating_probs": probs[::-1],
                          "problem_id": f"p{sequence}"})  # fmt: skip
    random.Random(0).shuffle(lines)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_an_imported_log_replays_as_the_recording(recorded, tmp_path) -> None:
    model, trace = recorded
    log = _log(trace, tmp_path / "r.jsonl")
    imported = load_trace(import_trace(log, model / "config.json").save(tmp_path / "t.npz"))
    k = trace.top_k
    assert imported.meta["workload"]["sequences"] == 2 and imported.depth == 0 and imported.candidates == k
    assert (np.sort(imported.top_ids, axis=2) == np.sort(trace.top_ids[:, :, :k], axis=2)).all()
    assert (imported.top_probs == trace.top_probs[:, :, :k]).all()  # best first, as recorded
    assert (imported.expert_nbytes.sum(axis=2) == trace.expert_nbytes.sum(axis=2)).all()

    # The recording as the import sees it: one token per forward call, no candidates beyond the top-k.
    n, layers = len(trace.token_ids), len(trace.moe_layers)
    same = dataclasses.replace(trace, call_tokens=np.ones(n, np.int32), top_ids=trace.top_ids[:, :, :k],
                               top_probs=trace.top_probs[:, :, :k],
                               lookahead_ids=np.zeros((n, layers, 0, k), np.int16))  # fmt: skip
    config = EngineConfig(cache_policy="lru", cache_scope="per_layer", cache_bytes=2 * len(trace.moe_layers) * ENTRY,
                          predictor="previous_token")  # fmt: skip
    ours, theirs = simulate(imported, config, 1e9, 0.001), simulate(same, config, 1e9, 0.001)
    assert ours.counters == theirs.counters and ours.optimal_hit_rate == theirs.optimal_hit_rate
    assert ours.cached_experts_per_layer == 2.0
    assert "2 experts per MoE layer (24 KiB each as dequantized)" in format_result(ours)
    with pytest.raises(ValueError, match="predictor 'gate_lookahead' replays gate_lookahead's proposals"):
        simulate(imported, dataclasses.replace(config, predictor="gate_lookahead"), 1e9)


def test_the_report_of_an_imported_log_gives_the_replays_prefetch_figures(recorded, tmp_path) -> None:
    model, trace = recorded
    imported = load_trace(
        import_trace(_log(trace, tmp_path / "r.jsonl"), model / "config.json").save(tmp_path / "t.npz")
    )
    text = write_report(imported, tmp_path / "report", "t").read_text()
    learned = simulate(imported, EngineConfig(predictor="coactivation"), optimal=False)
    assert 0 < learned.prefetch_precision < 1 and 0 < learned.prefetch_recall < 1
    assert f"| coactivation | {100 * learned.prefetch_precision:.1f}% | {100 * learned.prefetch_recall:.1f}% |" in text
    assert "| gate_lookahead | n/a: the trace has no lookahead | |" in text


def test_the_cli_imports_and_simulates(recorded, tmp_path, capsys) -> None:
    model, trace = recorded
    log, out = _log(trace, tmp_path / "r.jsonl", sequences=1), tmp_path / "t.npz"
    assert main(["import-trace", str(log), "--model-config", str(model / "config.json"), "--out", str(out)]) == 0
    assert "1 sequence(s), 4 MoE layers, top-2 of 16; no gate_lookahead" in capsys.readouterr().out
    assert main(["simulate", "--trace", str(out), "--bandwidth", "1GB"]) == 0
    printed = capsys.readouterr()
    assert "holds no compute time" in printed.err and "cache holds" in printed.out


GOOD = {"token_idx": 0, "layer": 1, "experts": [3, 5], "gating_probs": [0.7, 0.3]}


@pytest.mark.parametrize(
    ("bad", "field", "says"),
    [
        ("{not json", None, "not JSON"),
        ({k: v for k, v in GOOD.items() if k != "experts"}, "experts", "missing"),
        ({**GOOD, "experts": [3, 5, 7]}, "experts", "expected a list of the model's top_k = 2, got 3 entries"),
        ({**GOOD, "gating_probs": [1.0]}, "gating_probs", "top_k = 2, got 1 entries"),
        ({**GOOD, "layer": 4}, "layer", "4 is not one of the model's MoE layers (0 to 3)"),
        ({**GOOD, "experts": [3, 16]}, "experts", "16 is not an expert id in [0, 16)"),
        ({**GOOD, "token_idx": -1}, "token_idx", "expected an integer >= 0"),
        ({**GOOD, "layer": 0}, "layer", "token 0 already has layer 0"),
        ({**GOOD, "sequence": 1, "problem_id": "a"}, "sequence", "both problem_id and sequence"),
    ],
)
def test_a_bad_line_is_named_by_its_number(recorded, tmp_path, bad, field, says) -> None:
    model, _ = recorded
    lines = [json.dumps({**GOOD, "layer": layer}) for layer in range(4)]
    lines.insert(2, bad if isinstance(bad, str) else json.dumps(bad))
    log = tmp_path / "r.jsonl"
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError) as caught:
        import_trace(log, model / "config.json")
    assert caught.value.path == f"{log}:3" and caught.value.field == field and says in caught.value.message


def test_a_token_missing_a_layer_is_an_error(recorded, tmp_path) -> None:
    model, _ = recorded
    log = tmp_path / "r.jsonl"
    log.write_text("".join(json.dumps({**GOOD, "layer": layer}) + "\n" for layer in (0, 2, 3)))
    with pytest.raises(TraceError, match=r"r.jsonl:1: field 'layer': token 0 has no line for layer 1"):
        import_trace(log, model / "config.json")
