"""Architecture registry: ``model_type`` from config.json picks the module that reads its config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.architectures import deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_5_moe, qwen3_moe
from engine.architectures.quantization import FIELD as QUANTIZATION_FIELD
from engine.architectures.quantization import read_quantization
from engine.architectures.spec import DecoderSpec
from engine.errors import UnsupportedModelError

ARCHITECTURES: dict[str, Callable[[dict[str, Any], Path], DecoderSpec]] = {
    "qwen3_moe": qwen3_moe.parse,
    "mixtral": mixtral.parse,
    "olmoe": olmoe.parse,
    "qwen2_moe": qwen2_moe.parse,
    "deepseek_v3": deepseek_v3.parse,
    "kimi_k2": deepseek_v3.parse,  # Kimi K2's own name for the DeepSeek-V3 architecture
    "kimi_k25": deepseek_v3.parse,  # Kimi K2.5: the multimodal model around it
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
    architecture, quantization, where = _without_quantization(config, path)
    spec = ARCHITECTURES[model_type](architecture, path)
    return replace(spec, quantization=read_quantization(quantization, path, where))


def _without_quantization(config: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The config without its ``quantization_config``, which may sit in ``text_config`` (Kimi K2.5); that field
    alone (an empty dict without one); and where it was: how weights are stored is not the architecture's business."""
    text = config.get("text_config")
    found = {where: part[QUANTIZATION_FIELD] for where, part in (("", config), ("text_config.", text))
             if isinstance(part, dict) and QUANTIZATION_FIELD in part}  # fmt: skip
    if len(found) > 1:
        raise UnsupportedModelError(path, "given twice, at the top and in text_config", field=QUANTIZATION_FIELD)
    rest = {key: value for key, value in config.items() if key != QUANTIZATION_FIELD}
    if "text_config." in found:
        rest["text_config"] = {key: value for key, value in text.items() if key != QUANTIZATION_FIELD}
    where = next(iter(found), "")
    return rest, {QUANTIZATION_FIELD: found[where]} if found else {}, where
