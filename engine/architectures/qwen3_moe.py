"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): per-head q/k RMSNorm, optional dense layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.architectures.spec import ConfigFields, DecoderSpec, read_common, read_num_experts, sparse_layers

# transformers' Qwen3-MoE ignores max_window_layers: a sliding window, when on, covers every layer.
EXTRA_INERT = frozenset({"max_window_layers"})


def parse(config: dict[str, Any], path: Path) -> DecoderSpec:
    f = ConfigFields(config, path, EXTRA_INERT)
    common = read_common(f)
    n = common["num_layers"]
    window = f.get("sliding_window", int, None) if f.get("use_sliding_window", bool, False) else None
    f.used.add("sliding_window")
    bias = f.get("attention_bias", bool, False)
    spec = DecoderSpec(
        **common,
        qk_norm="per_head",
        qkv_bias=bias,
        o_bias=bias,
        sliding_windows=(window,) * n,
        sparse_layers=sparse_layers(f, n),
        dense_intermediate_size=f.count("intermediate_size"),
        num_experts=read_num_experts(f),
        moe_intermediate_size=f.count("moe_intermediate_size"),
        norm_topk_prob=f.get("norm_topk_prob", bool, False),
    )
    f.finish()
    return spec
