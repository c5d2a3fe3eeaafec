"""``trace --backend transformers``: transformers runs the pass, forward hooks keep the routing, and on every
synthetic architecture the trace is the engine's own recording of the same pass."""

from __future__ import annotations

import numpy as np
import pytest

from engine.analysis.trace import load_trace, record_trace
from engine.bench.workloads import get_workload
from engine.config import EngineConfig
from engine.synth import SynthShape, synthesize
from search.cli import main

SHAPES = {
    "qwen3_moe": SynthShape("qwen3_moe", 64, 3, 4, 2, 16, 8, 2, 32, 512),
    "mixtral": SynthShape("mixtral", 64, 3, 4, 2, 16, 8, 2, 32, 512),
    "deepseek_v3": SynthShape("deepseek_v3", 64, 4, 4, 4, 16, 16, 2, 32, 512, dense_layers=1, shared_experts=1),
    "qwen3_5_moe": SynthShape("qwen3_5_moe", 64, 4, 4, 2, 16, 8, 2, 32, 512, shared_experts=1),
}
TIE = 1e-5  # router scores closer than this may rank either way between two implementations


@pytest.mark.parametrize("arch", list(SHAPES))
def test_the_transformers_trace_is_the_engines(arch, tmp_path) -> None:
    model = synthesize(tmp_path / arch, SHAPES[arch], dtype="fp32")
    ours = record_trace(model, get_workload("decode-short"), EngineConfig())
    out = tmp_path / "t.npz"
    assert main(["trace", "--model", str(model), "--backend", "transformers", "--out", str(out)]) == 0
    theirs = load_trace(out)

    assert theirs.meta["recorded_with"]["backend"] == "transformers" and theirs.meta["decode_seconds_per_token"] is None
    assert (theirs.token_ids == ours.token_ids).all() and (theirs.call_tokens == ours.call_tokens).all()
    np.testing.assert_allclose(theirs.top_probs, ours.top_probs, atol=TIE, rtol=0)
    probs = ours.top_probs
    tied = np.zeros(probs.shape, bool)  # a rank whose score is within TIE of a neighbour's
    close = np.abs(np.diff(probs, axis=2)) < TIE
    tied[:, :, 1:] |= close
    tied[:, :, :-1] |= close
    assert ((theirs.top_ids == ours.top_ids) | tied).all()
    # gate_lookahead's rankings are recorded without their scores, so a near-tie cannot be told apart there
    assert (theirs.lookahead_ids == ours.lookahead_ids).mean() > 0.999
    assert (theirs.expert_offsets == ours.expert_offsets).all() and (theirs.expert_nbytes == ours.expert_nbytes).all()
