"""Checkpoints whose routed experts are stored quantized, run as stored: compressed-tensors' pack-quantized int4
(Kimi K2.5, Kimi K2 Thinking), written and read back by the compressed-tensors library itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from engine import load_model, score
from engine.architectures.spec import WeightQuantization
from engine.config import EngineConfig
from engine.errors import CheckpointError, UnsupportedModelError
from engine.formats.quant import FP8_VALUES, INT4_OFFSET, dequantize, quantize
from engine.formats.repack import repack
from tests.engine.model.test_parity import _prompt
from tests.engine.tiny_models import (
    CLASSES,
    build,
    compress_experts,
    fp8_blocks,
    int4_quantization_config,
    reference_logits,
)

GROUP = 16
STREAMING = [
    EngineConfig(),
    EngineConfig(cache_format="packed", io_mode="direct"),
    EngineConfig(cache_format="packed", io_mode="mmap"),
    EngineConfig(io_mode="mmap"),
    EngineConfig(cache_format="packed", io_mode="direct", cache_bytes=1 << 20, predictor="gate_lookahead"),
]


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """A tiny Kimi-K2.5-like checkpoint (DeepSeek-V3 architecture, int4 experts) and transformers running the
    weights it stores."""
    reference, path = build("deepseek_v3", tmp_path_factory.mktemp("kimi") / "ckpt")
    compress_experts(reference, path, GROUP)
    return reference, path


def test_int4_bf16_is_compressed_tensors_packing():
    w = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    ours = quantize(w, "int4_bf16", GROUP)
    values = np.empty(w.shape, np.int8)
    values[:, 0::2] = (ours.data & 0xF).astype(np.int8) - INT4_OFFSET
    values[:, 1::2] = (ours.data >> 4).astype(np.int8) - INT4_OFFSET
    words = pack_to_int32(torch.from_numpy(values), 4).numpy()
    assert words.view(np.uint8).tobytes() == ours.data.tobytes()
    scales = torch.from_numpy(ours.scales.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(dequantize(ours), values * np.repeat(scales, GROUP, axis=1))


@pytest.mark.parametrize("config", STREAMING, ids=lambda c: f"{c.io_mode}-{c.cache_format}-{c.cache_bytes}")
def test_int4_experts_match_transformers_on_the_stored_weights(kimi, config):
    reference, path = kimi
    ids = _prompt(5, 40)
    ours = score(load_model(path, config), ids)
    np.testing.assert_allclose(ours, reference_logits(reference, ids), atol=1e-4, rtol=0)


def test_other_architectures_take_int4_experts_too(tmp_path):
    reference, path = build("qwen3_moe", tmp_path / "ckpt")
    compress_experts(reference, path, GROUP)
    ids = _prompt(6, 40)
    ours = score(load_model(path, EngineConfig(cache_format="packed")), ids)
    np.testing.assert_allclose(ours, reference_logits(reference, ids), atol=1e-4, rtol=0)


def test_repacking_int4_experts_dequantizes_them_first(kimi, tmp_path):
    reference, path = kimi
    report = repack(path, tmp_path / "int8", "int8")
    assert report.worst_rel_fro_error < 0.01
    ids = _prompt(7, 24)
    ours = score(load_model(tmp_path / "int8"), ids)
    expected = reference_logits(reference, ids)
    assert np.abs(ours - expected).max() < 0.05 * np.abs(expected).max()


def _variant(source, tmp_path, edit_config=None, edit_tensors=None):
    """A copy of ``source`` with its config or its tensors changed."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "variant"
    path.mkdir()
    for file in source.iterdir():
        (path / file.name).write_bytes(file.read_bytes())
    if edit_config:
        config = json.loads((path / "config.json").read_text())
        edit_config(config["quantization_config"])
        (path / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(path / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda q: q.update(quant_method="gptq"), "quantization_config.quant_method"),
        (lambda q: q.update(format="float-quantized"), "quantization_config.format"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=8), "weights.num_bits"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False), "weights.symmetric"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=None), "weights.group_size"),
        (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8}), "input_activations"),
        (lambda q: q["config_groups"].update(group_1={}), "quantization_config.config_groups"),
        (lambda q: q.update(sparsity_config={"format": "sparse-bitmask"}), "quantization_config.sparsity_config"),
        (lambda q: q.update(novel=1), "quantization_config.novel"),
    ],
)
def test_quantization_the_engine_does_not_implement_is_refused_by_name(kimi, tmp_path, edit, field):
    path = _variant(kimi[1], tmp_path, edit_config=edit)
    with pytest.raises(UnsupportedModelError, match=field.replace(".", r"\.")) as error:
        load_model(path)
    assert str(path) in str(error.value)


def test_quantized_tensors_outside_the_routed_experts_are_refused_by_name(kimi, tmp_path):
    name = "model.layers.0.self_attn.o_proj"

    def quantize_attention(tensors):
        w = tensors.pop(f"{name}.weight")
        tensors[f"{name}.weight_packed"] = torch.zeros((w.shape[0], w.shape[1] // 8), dtype=torch.int32)

    path = _variant(kimi[1], tmp_path, edit_tensors=quantize_attention)
    with pytest.raises(CheckpointError, match=f"{name}.weight_packed.*only for routed experts"):
        load_model(path)


def test_scales_of_another_group_size_are_refused(kimi, tmp_path):
    path = _variant(
        kimi[1], tmp_path, edit_config=lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=32)
    )
    with pytest.raises(CheckpointError, match=r"weight_scale.*shape"):
        load_model(path)


def test_experts_stored_as_floats_under_a_quantization_config_are_refused(tmp_path):
    _, path = build("deepseek_v3", tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"quantization_config": int4_quantization_config(GROUP)}))
    with pytest.raises(CheckpointError, match=r"experts\.0\.gate_proj\.weight.*stored as floats.*quantization_config"):
        load_model(path)


def test_kimi_k25_checkpoints_run_their_text_model(kimi, tmp_path):
    """Kimi K2.5 is the multimodal model: the text model's config (with its quantization_config) in text_config,
    its tensors under language_model, a vision tower and projector the engine leaves unread."""
    from safetensors.torch import load_file, save_file

    reference, source = kimi
    path = tmp_path / "k25"
    path.mkdir()
    tensors = {f"language_model.{name}": value for name, value in load_file(source / "model.safetensors").items()}
    tensors |= {"vision_tower.patch_embed.proj.weight": torch.ones(8, 3), "mm_projector.proj.0.weight": torch.ones(4)}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    text = json.loads((source / "config.json").read_text())
    text |= {"model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"]}
    outer = {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config"},
        "bos_token_id": 0,
        "eos_token_id": text.pop("eos_token_id"),
        "pad_token_id": 1,
        "media_placeholder_token_id": 2,
        "ignore_index": -100,
        "vision_config": {"hidden_size": 8},
        "text_config": text,
    }
    (path / "config.json").write_text(json.dumps(outer))
    ids = _prompt(8, 40)
    model = load_model(path, EngineConfig(cache_format="packed", io_mode="direct"))
    spec = model.decoder.spec
    assert spec.eos_token_ids == (outer["eos_token_id"],) and spec.quantization == WeightQuantization("int4", GROUP)
    np.testing.assert_allclose(score(model, ids), reference_logits(reference, ids), atol=1e-4, rtol=0)


# --- block fp8 (DeepSeek-V3, Kimi K2 Instruct, Qwen's FP8 releases)

FP8_BLOCK = 8  # 128 in the published checkpoints; 8 divides every dimension of the tiny models


def test_fp8_decodes_as_torch_does():
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(FP8_VALUES, values)
    w = np.random.default_rng(1).standard_normal((20, 40)).astype(np.float32)
    ours = quantize(w, "fp8", FP8_BLOCK)
    theirs = torch.from_numpy(w) / torch.from_numpy(np.repeat(np.repeat(ours.scales, 8, 0), 8, 1)[:20, :40])
    np.testing.assert_array_equal(ours.data, theirs.to(torch.float8_e4m3fn).view(torch.uint8).numpy())


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_5_moe"])
def fp8_model(request, tmp_path_factory):
    """A tiny FP8 checkpoint, and transformers running it (it dequantizes FP8 checkpoints on a CPU)."""
    arch = request.param
    _, path = build(arch, tmp_path_factory.mktemp(f"fp8-{arch}") / "ckpt")
    fp8_blocks(path, FP8_BLOCK)
    reference = CLASSES[arch][1].from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return arch, path, reference


@pytest.mark.parametrize("config", STREAMING[:3], ids=lambda c: f"{c.io_mode}-{c.cache_format}")
def test_fp8_checkpoints_match_transformers(fp8_model, config):
    arch, path, reference = fp8_model
    ids = _prompt(9, 80 if arch == "qwen3_5_moe" else 40)
    model = load_model(path, config)
    assert model.decoder.spec.quantization == WeightQuantization("fp8", FP8_BLOCK)
    np.testing.assert_allclose(score(model, ids), reference_logits(reference, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"fmt": "e5m2"}, "quantization_config.fmt"),
        ({"weight_block_size": [128, 64]}, "quantization_config.weight_block_size"),
        ({"activation_scheme": "static"}, "quantization_config.activation_scheme"),
        ({"scale_fmt": "ue8m0"}, "quantization_config.scale_fmt"),
    ],
)
def test_fp8_the_engine_does_not_implement_is_refused_by_name(fp8_model, tmp_path, edit, field):
    path = _variant(fp8_model[1], tmp_path, edit_config=lambda q: q.update(edit))
    with pytest.raises(UnsupportedModelError, match=field.replace(".", r"\.")):
        load_model(path)
