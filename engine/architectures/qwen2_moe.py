"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): a shared expert behind a sigmoid gate, q/k/v biases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.architectures.spec import ConfigFields, DecoderSpec, read_common, read_num_experts, sparse_layers

LAYER_TYPES = ("full_attention", "sliding_attention")


def parse(config: dict[str, Any], path: Path) -> DecoderSpec:
    f = ConfigFields(config, path)
    common = read_common(f)
    n = common["num_layers"]
    spec = DecoderSpec(
        **common,
        qkv_bias=f.get("qkv_bias", bool, True),
        sliding_windows=_windows(f, n),
        sparse_layers=sparse_layers(f, n),
        dense_intermediate_size=f.count("intermediate_size"),
        num_experts=read_num_experts(f),
        moe_intermediate_size=f.count("moe_intermediate_size"),
        norm_topk_prob=f.get("norm_topk_prob", bool, False),
        shared_expert_intermediate_size=f.count("shared_expert_intermediate_size"),
    )
    f.finish()
    return spec


def _windows(f: ConfigFields, n: int) -> tuple[int | None, ...]:
    use = f.get("use_sliding_window", bool, False)
    window = f.get("sliding_window", int, None)
    max_window_layers = f.get("max_window_layers", int, n)
    layer_types = f.get("layer_types", list, None)
    if layer_types is None:  # transformers' rule for configs saved before layer_types existed
        layer_types = [
            "sliding_attention" if use and (i + 1) % 2 and i < max_window_layers else "full_attention" for i in range(n)
        ]
    if len(layer_types) != n or any(t not in LAYER_TYPES for t in layer_types):
        raise f.error("layer_types", f"expected {n} entries from {list(LAYER_TYPES)}, got {layer_types!r}")
    if "sliding_attention" in layer_types and not (use and window):
        raise f.error("layer_types", "names sliding_attention layers but use_sliding_window/sliding_window is off")
    return tuple(window if t == "sliding_attention" else None for t in layer_types)
