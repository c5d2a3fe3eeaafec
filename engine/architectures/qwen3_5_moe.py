"""Qwen3.5-MoE (Qwen3.5-397B-A17B, Qwen3.5-35B-A3B): three Gated DeltaNet layers to each gated full-attention
layer, partial rotary embeddings, zero-centred norms, and a gated shared expert beside the routed ones.

``qwen3_5_moe`` is the multimodal checkpoint (the text model's settings in ``text_config``, its tensors under
``model.language_model``; the vision tower is not run), ``qwen3_5_moe_text`` the text model alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.architectures.spec import ConfigFields, DecoderSpec, GatedDeltaNet, read_common, read_num_experts

LAYER_TYPES = ("linear_attention", "full_attention")
# Multimodal checkpoints: the vision tower and the special tokens that place its output in the text.
MULTIMODAL_INERT = frozenset({
    "vision_config", "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
})  # fmt: skip


def parse(config: dict[str, Any], path: Path) -> DecoderSpec:
    if config.get("model_type") == "qwen3_5_moe":
        outer = ConfigFields(config, path, MULTIMODAL_INERT)
        text = outer.get("text_config", dict)
        outer.get("model_type", str)
        tie = outer.get("tie_word_embeddings", bool, False)
        outer.finish()
        return _parse_text({**text, "model_type": "qwen3_5_moe_text", "tie_word_embeddings": tie}, path)
    return _parse_text(config, path)


def _parse_text(config: dict[str, Any], path: Path) -> DecoderSpec:
    f = ConfigFields(config, path)
    common = read_common(f, partial_rope=True)
    n = common["num_layers"]
    layer_types = f.get("layer_types", list, None)
    if layer_types is None:  # transformers' rule for configs saved without layer_types
        interval = f.count("full_attention_interval", 4)
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    if len(layer_types) != n or any(t not in LAYER_TYPES for t in layer_types):
        raise f.error("layer_types", f"expected {n} entries from {list(LAYER_TYPES)}, got {layer_types!r}")
    bias = f.get("attention_bias", bool, False)
    spec = DecoderSpec(
        **common,
        qk_norm="per_head",
        qkv_bias=bias,
        o_bias=bias,
        sliding_windows=(None,) * n,
        sparse_layers=(True,) * n,
        dense_intermediate_size=0,
        num_experts=read_num_experts(f),
        moe_intermediate_size=f.count("moe_intermediate_size"),
        norm_topk_prob=True,  # the router always renormalises its top-k
        shared_expert_intermediate_size=f.count("shared_expert_intermediate_size"),
        gated_delta_net=GatedDeltaNet(
            conv_kernel=f.count("linear_conv_kernel_dim", 4),
            num_key_heads=f.count("linear_num_key_heads"),
            num_value_heads=f.count("linear_num_value_heads"),
            key_head_dim=f.count("linear_key_head_dim"),
            value_head_dim=f.count("linear_value_head_dim"),
        ),
        linear_layers=tuple(t == "linear_attention" for t in layer_types),
        attention_output_gate=True,
        zero_centered_norms=True,
    )
    net = spec.gated_delta_net
    assert net is not None
    if net.num_value_heads % net.num_key_heads:
        raise f.error("linear_num_key_heads", f"{net.num_key_heads} does not divide linear_num_value_heads "
                      f"{net.num_value_heads}")  # fmt: skip
    f.finish()
    return spec
