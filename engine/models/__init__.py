"""Architecture registry: ``model_type`` from config.json picks the module that reads its config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import UnsupportedModelError
from engine.models import deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_5_moe, qwen3_moe
from engine.models.spec import DecoderSpec

ARCHITECTURES: dict[str, Callable[[dict[str, Any], Path], DecoderSpec]] = {
    "qwen3_moe": qwen3_moe.parse,
    "mixtral": mixtral.parse,
    "olmoe": olmoe.parse,
    "qwen2_moe": qwen2_moe.parse,
    "deepseek_v3": deepseek_v3.parse,
    "kimi_k2": deepseek_v3.parse,  # Kimi K2's own name for the DeepSeek-V3 architecture
    "qwen3_5_moe": qwen3_5_moe.parse,
    "qwen3_5_moe_text": qwen3_5_moe.parse,
}


def parse_config(config: dict[str, Any], path: Path) -> DecoderSpec:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            path,
            f"unknown architecture {model_type!r}; the engine implements {sorted(ARCHITECTURES)}",
            field="model_type",
        )
    return ARCHITECTURES[model_type](config, path)
