"""Mixtral (8x7B, 8x22B): every layer MoE, top-k weights always renormalised, optional sliding window."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.architectures.spec import ConfigFields, DecoderSpec, read_common, read_num_experts


def parse(config: dict[str, Any], path: Path) -> DecoderSpec:
    f = ConfigFields(config, path)
    common = read_common(f)
    n = common["num_layers"]
    intermediate = f.count("intermediate_size")
    spec = DecoderSpec(
        **common,
        sliding_windows=(f.get("sliding_window", int, None),) * n,
        sparse_layers=(True,) * n,
        dense_intermediate_size=intermediate,
        num_experts=read_num_experts(f),
        moe_intermediate_size=intermediate,
        norm_topk_prob=True,
        moe_prefix="block_sparse_moe",
        expert_names=("w1", "w3", "w2"),
    )
    f.finish()
    return spec
