"""``resident_weights``: the attention projections, shared experts and dense MLPs quantized when loaded, checked
against transformers running the same checkpoint with those matrices quantized and dequantized the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import load_model, score
from engine.config import RESIDENT_GROUP_SIZE, EngineConfig
from engine.errors import ConfigError
from engine.formats.quant import PackedMatrix, dequantize, quantize
from tests.engine.tiny_models import BASE, VOCAB, build, reference_logits

# The resident projections, by their transformers names; routed experts (under .experts.), routers, the latent
# key-value up-projection, DeltaNet's small beta and decay inputs and the output layer stay as stored.
RESIDENT = {
    "q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
    "gate_proj", "up_proj", "down_proj", "in_proj_qkv", "in_proj_z", "out_proj",
}  # fmt: skip
# Every resident matrix's input a whole number of int4 groups of 32 (the tiny models' 24, 48 and 12-wide heads are not)
GROUPABLE = {
    "deepseek_v3": {"q_lora_rank": 32, "v_head_dim": 8},
    "qwen2_moe": {"shared_expert_intermediate_size": 64},
    "qwen3_5_moe": {"shared_expert_intermediate_size": 64},
    "qwen3_moe": {"mlp_only_layers": [1]},  # a dense layer
}
SEQ = 24


def _quantized_reference(model: torch.nn.Module, format: str) -> int:
    """Replace each resident projection's weight by its ``format`` round trip; the number replaced."""
    replaced = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in RESIDENT and ".experts." not in name:
            w = module.weight.detach().numpy().astype(np.float32)
            module.weight.data = torch.from_numpy(dequantize(quantize(w, format, RESIDENT_GROUP_SIZE)))
            replaced += 1
    return replaced


def _stepped(model, ids: list[int]) -> np.ndarray:
    cache = model.decoder.new_cache()
    return np.concatenate([model.decoder.forward(np.asarray([token]), cache) for token in ids])


@pytest.mark.parametrize("format", ["int8", "int4"])
@pytest.mark.parametrize("arch", list(BASE))
def test_quantized_resident_matrices_match_transformers_on_the_same_rounding(tmp_path, arch, format):
    reference, path = build(arch, tmp_path / "ckpt", **GROUPABLE.get(arch, {}))
    ids = np.random.default_rng(3).integers(0, VOCAB - 1, SEQ).tolist()
    original = reference_logits(reference, ids)
    assert _quantized_reference(reference, format) > 0
    expected = reference_logits(reference, ids)
    model = load_model(path, EngineConfig(resident_weights=format))
    try:
        resident = [m for layer in model.decoder.layers for m in vars(layer.attention).values()]
        assert any(isinstance(m, PackedMatrix) and m.format == format for m in resident)
        np.testing.assert_allclose(score(model, ids), expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(_stepped(model, ids), expected, atol=1e-4, rtol=0)  # the decode kernels
    finally:
        model.close()
    assert np.abs(expected - original).max() > 1e-3  # the rounding is there, and the engine followed it


def test_int8_activations_reach_the_resident_int4_matrices_in_prefill_and_decode_alike(tmp_path):
    _, path = build("qwen2_moe", tmp_path / "ckpt", mlp_only_layers=[0], **GROUPABLE["qwen2_moe"])
    ids = np.random.default_rng(4).integers(0, VOCAB - 1, SEQ).tolist()
    experts = {"weights": "int4", "group_size": 32, "cache_format": "packed", "activations": "int8"}
    results = {}
    for resident in ("original", "int4"):
        model = load_model(path, EngineConfig(**experts, resident_weights=resident))
        try:
            results[resident] = score(model, ids), _stepped(model, ids)
        finally:
            model.close()
    prefill, decode = results["int4"]
    np.testing.assert_allclose(prefill, decode, atol=1e-4 * np.abs(decode).max(), rtol=0)
    rounded_experts_only = results["original"][1]
    assert np.abs(decode - rounded_experts_only).max() > 1e-3


def test_a_matrix_int4_cannot_group_is_refused_naming_it(tmp_path):
    _, path = build("deepseek_v3", tmp_path / "ckpt")  # q_lora_rank 24: q_b_proj's input is not in groups of 32
    with pytest.raises(ConfigError, match=r"resident_weights.*groups of 32 columns.*q_b_proj.weight has 24"):
        load_model(path, EngineConfig(resident_weights="int4"))


def test_an_unknown_resident_format_is_refused():
    with pytest.raises(ValueError, match="resident_weights must be one of original, int8, int4 but got 'fp8'"):
        EngineConfig(resident_weights="fp8")
