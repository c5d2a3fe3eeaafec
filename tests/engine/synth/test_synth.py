"""Synthetic checkpoints: real files both engines load identically, sized as asked, routing like real models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine import load_model, score
from engine.analysis.output_stats import output_stats
from engine.analysis.routing_stats import REFERENCE_RANGES, RoutingRecorder, lru_hit_rate
from engine.architectures.spec import WeightQuantization
from engine.bench.quality import top1_agreement
from engine.bench.workloads import get_workload, topic_stream
from engine.synth import RoutingKnobs, SynthShape, sized_shape, synthesize
from engine.synth.weights import DEFAULT_KNOBS
from tests.engine.tiny_models import CLASSES, reference_logits

# Narrow and shallow, with the sized defaults' expert counts (64 top-4, 8 top-2), so the statistics apply.
STATS_SHAPES = {
    "qwen3_moe": SynthShape("qwen3_moe", 128, 4, 4, 2, 32, 64, 4, 32, 1024),
    "mixtral": SynthShape("mixtral", 256, 8, 4, 2, 64, 8, 2, 32, 1024),
    "deepseek_v3": SynthShape("deepseek_v3", 128, 5, 4, 4, 32, 64, 4, 32, 1024, dense_layers=1, shared_experts=1),
    "qwen3_5_moe": SynthShape("qwen3_5_moe", 128, 4, 4, 2, 32, 64, 4, 32, 1024, shared_experts=1),
}


@pytest.mark.parametrize("arch", list(STATS_SHAPES))
def test_synthetic_checkpoint_loads_identically_in_transformers(tmp_path, arch):
    shape = dataclasses.replace(STATS_SHAPES[arch], num_layers=4, moe_intermediate_size=16)
    path = synthesize(tmp_path / arch, shape, dtype="fp32", shard_bytes=200_000)
    assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 1
    model = load_model(path)
    ids = model.encode("The expert cache holds the experts used most often.")
    reference = CLASSES[arch][1].from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    np.testing.assert_allclose(score(model, ids), reference_logits(reference, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", list(STATS_SHAPES))
def test_default_routing_statistics_fall_in_real_models_ranges(tmp_path, arch):
    path = synthesize(tmp_path / arch, STATS_SHAPES[arch], dtype="fp32", knobs=DEFAULT_KNOBS[arch])
    model = load_model(path)
    with RoutingRecorder(model.decoder) as recorder:
        logits = score(model, get_workload("score-2048").tokens(model))
    stats = recorder.stats(STATS_SHAPES[arch].num_experts)
    assert stats.tokens == 2048
    assert stats.outside_reference() == {}, (stats, REFERENCE_RANGES)
    outputs = output_stats(logits)  # a trained model's entropy and top-1 probability, and no near-ties
    assert outputs.outside_reference() == {}, outputs


def test_every_token_has_its_own_output_row(tmp_path):
    shape = STATS_SHAPES["qwen3_moe"]
    path = synthesize(tmp_path / "m", shape, dtype="fp32", knobs=RoutingKnobs())
    decoder = load_model(path).decoder
    assert len(np.unique(decoder.lm_head, axis=0)) == decoder.spec.vocab_size
    flat = synthesize(tmp_path / "flat", shape, dtype="fp32", knobs=RoutingKnobs(logit_spread=0.0))
    assert len(np.unique(load_model(flat).decoder.lm_head, axis=0)) == RoutingKnobs().topics  # what format 1 had


def test_locality_and_skew_knobs_move_the_statistics(tmp_path):
    shape = STATS_SHAPES["qwen3_moe"]
    measured = {}
    for name, knobs in {
        "hostile": RoutingKnobs(locality=0.1, skew=0.0),
        "default": RoutingKnobs(),
        "friendly": RoutingKnobs(locality=0.95, skew=0.3),
    }.items():
        model = load_model(synthesize(tmp_path / name, shape, dtype="fp32", knobs=knobs))
        with RoutingRecorder(model.decoder) as recorder:
            score(model, get_workload("score-512").tokens(model))
        measured[name] = recorder.stats(shape.num_experts)
    for stat in ("adjacent_reuse_ratio", "lru_gain_points_25", "lru_gain_points_50"):
        values = [getattr(measured[n], stat) for n in ("hostile", "default", "friendly")]
        assert values == sorted(values), (stat, values)
    # over 512 tokens the busiest share has a sampling floor near 1.5-2x, so only the extremes are ordered
    assert measured["friendly"].busiest_share_ratio > measured["hostile"].busiest_share_ratio + 0.5


@pytest.mark.parametrize(
    ("arch", "dims"),
    [
        ("mixtral", {"hidden_size": 256, "moe_intermediate_size": 512}),
        ("deepseek_v3", {"hidden_size": 128, "num_experts": 64, "moe_intermediate_size": 64}),  # a dense first layer
        ("qwen3_5_moe", {"hidden_size": 128, "num_experts": 64, "moe_intermediate_size": 64}),  # two kinds of layer
    ],
)
def test_sized_shape_fills_the_size_without_exceeding_it(tmp_path, arch, dims):
    size = 48 << 20
    shape = sized_shape(arch, size, "bf16", **dims)
    path = synthesize(tmp_path / "sized", shape, shard_bytes=16 << 20)
    written = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    one_layer = shape.layer_params(shape.num_layers - 1) * 2
    assert size - one_layer < written <= size + 64 * 1024  # headers add a few KiB
    with pytest.raises(ValueError, match="below one MoE layer"):
        sized_shape("qwen3_moe", 1 << 20, "bf16")
    with pytest.raises(ValueError, match="num_layers"):
        sized_shape("qwen3_moe", 1 << 30, "bf16", num_layers=3)


def test_int4_experts_are_the_same_model_stored_as_kimi_k25_stores_them(tmp_path):
    """The same seed with int4 experts: the experts decompress (by the compressed-tensors library) to within
    int4's rounding of the bf16 ones, everything else is byte for byte the same, and the engine runs it."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    shape = dataclasses.replace(STATS_SHAPES["deepseek_v3"], num_layers=3)
    plain = synthesize(tmp_path / "bf16", shape)
    packed = synthesize(tmp_path / "int4", shape, experts="int4")
    a = {k: v for f in sorted(plain.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted(packed.glob("*.safetensors")) for k, v in load_file(f).items()}
    name = "model.layers.1.mlp.experts.5.down_proj"
    w = a[f"{name}.weight"].float()
    q = unpack_from_int32(b[f"{name}.weight_packed"], 4, torch.Size(b[f"{name}.weight_shape"].tolist()))
    scale = b[f"{name}.weight_scale"].float()
    steps = scale.repeat_interleave(32, dim=1)
    # half an int4 step, plus the bf16 checkpoint's own truncation of the same float32 weights
    assert ((q.float() * steps - w).abs() <= 0.5 * steps + w.abs() * 2**-7).all()
    assert {k for k in a if ".experts." not in k} == {k for k in b if ".experts." not in k}
    assert all(torch.equal(a[k], b[k]) for k in a if ".experts." not in k)
    model = load_model(packed)
    assert model.decoder.spec.quantization == WeightQuantization("int4", 32)
    ids = model.encode("The expert cache holds the experts used most often.")
    ours, theirs = score(model, ids), score(load_model(plain), ids)
    top1, excluded = top1_agreement(theirs, ours)
    assert excluded < 0.05 and top1 >= 0.9


def test_int4_sized_shape_fills_the_size(tmp_path):
    size = 24 << 20
    shape = sized_shape("deepseek_v3", size, "bf16", "int4", hidden_size=128, num_experts=64, moe_intermediate_size=64)
    assert shape.num_layers > sized_shape("deepseek_v3", size, "bf16", hidden_size=128, num_experts=64,
                                          moe_intermediate_size=64).num_layers  # fmt: skip
    path = synthesize(tmp_path / "sized", shape, shard_bytes=16 << 20, experts="int4")
    written = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    assert size - shape.layer_bytes(shape.num_layers - 1, "bf16", "int4") < written <= size + 256 * 1024


def test_topic_stream_keeps_its_topic_at_the_locality_rate():
    knobs = RoutingKnobs(locality=0.8, topics=16)
    ids = np.array(topic_stream(knobs, 1024, frozenset({0}), 4000, seed=3))
    assert 0 not in ids
    stay = np.mean(ids[1:] % 16 == ids[:-1] % 16)
    assert 0.77 < stay < 0.83  # locality plus the 1/16 chance that a jump lands on the same topic, minus noise


def test_lru_reference_model():
    experts = np.array([[0, 1], [0, 2], [3, 1], [0, 3]])
    # capacity 2: [0,1] miss miss; [0,2] hit 0, evict 1; [3,1] miss miss; [0,3] hit 3 (0 was evicted)
    assert lru_hit_rate(experts, 2) == 2 / 8


@pytest.mark.parametrize(
    ("knobs", "message"),
    [({"locality": 1.0}, "locality"), ({"skew": -1}, "skew"), ({"topics": 1}, "topics")],
)
def test_bad_knobs_are_refused(knobs, message):
    with pytest.raises(ValueError, match=message):
        RoutingKnobs(**knobs)
