"""OLMoE (OLMoE-1B-7B): q/k RMSNorm over all heads at once, optional q/k/v clipping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.architectures.spec import ConfigFields, DecoderSpec, read_common, read_num_experts


def parse(config: dict[str, Any], path: Path) -> DecoderSpec:
    f = ConfigFields(config, path)
    common = read_common(f)
    if common["head_dim"] * common["num_heads"] != common["hidden_size"]:
        raise f.error("head_dim", "OLMoE's q/k norms span hidden_size, so head_dim * heads must equal it")
    n = common["num_layers"]
    bias = f.get("attention_bias", bool, False)
    clip = f.get("clip_qkv", float, None)
    if clip is not None and clip <= 0:
        raise f.error("clip_qkv", f"must be positive, got {clip}")
    intermediate = f.count("intermediate_size")
    spec = DecoderSpec(
        **common,
        qk_norm="full",
        qkv_bias=bias,
        o_bias=bias,
        clip_qkv=clip,
        sliding_windows=(None,) * n,
        sparse_layers=(True,) * n,
        dense_intermediate_size=intermediate,
        num_experts=read_num_experts(f),
        moe_intermediate_size=intermediate,
        norm_topk_prob=f.get("norm_topk_prob", bool, False),
    )
    f.finish()
    return spec
