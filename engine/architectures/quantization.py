"""``quantization_config``: the quantized checkpoints the engine runs as stored, and nothing it would misread.

Accepted:

- compressed-tensors' ``pack-quantized`` format with one scheme, weight-only symmetric int4 in groups along the
  input: how Kimi K2.5 and Kimi K2 Thinking ship their routed experts. Which tensors the scheme covers is read off
  the checkpoint (``weight_packed`` beside ``weight``), not off the ``ignore`` patterns: the engine reads quantized
  routed experts and refuses any other quantized tensor by name when it meets it.
- ``fp8``: DeepSeek-V3's block quantization (its checkpoints, Kimi K2 Instruct's, Qwen's FP8 releases), float8
  e4m3 weights with a float32 ``weight_scale_inv`` per square block. Which tensors are fp8 is read off their dtype;
  the engine computes from them in float32 (the reference's ``dynamic`` fp8 activations are not applied: what
  transformers does too when it dequantizes such a checkpoint on a CPU).

Everything else (other bit widths, asymmetric or activation quantization, non-square blocks, other scale formats)
is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.architectures.spec import ConfigFields, WeightQuantization

FIELD = "quantization_config"
# Keys that record how the checkpoint was made or which modules it covers (read off the tensors, see above).
INERT = frozenset({"quantization_status", "global_compression_ratio", "ignore", "version", "provider"})
SCHEME_INERT = frozenset({"targets"})
WEIGHTS_INERT = frozenset({"observer", "observer_kwargs"})
FP8_INERT = frozenset({"modules_to_not_convert", "ignored_layers", "modules_to_convert"})  # read off the dtypes


def read_quantization(config: dict[str, Any], path: Path, where: str = "") -> WeightQuantization | None:
    """How ``config`` (holding at most ``quantization_config``) says the weights are stored; None: as floats.
    ``where``: the prefix of the field in config.json (``text_config.`` for Kimi K2.5), for the errors."""
    fields = ConfigFields(config, path)
    config = fields.get(FIELD, dict, None)
    if config is None:
        return None
    top = f"{where}{FIELD}"
    if config.get("quant_method") == "fp8":
        return _fp8(fields, config, top)
    _expect(fields, config, top, "quant_method", ("compressed-tensors", "fp8"))
    _expect(fields, config, top, "format", ("pack-quantized",))
    for name in ("kv_cache_scheme", "sparsity_config", "transform_config", "moe_sparsity_config"):
        _expect(fields, config, top, name, (None, {}))
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise fields.error(f"{top}.config_groups", f"expected one quantization scheme, got {groups!r}")
    (group_name, scheme), = groups.items()  # fmt: skip
    scheme_at = f"{top}.config_groups.{group_name}"
    if not isinstance(scheme, dict):
        raise fields.error(scheme_at, f"expected an object, got {scheme!r}")
    for name in ("input_activations", "output_activations"):
        _expect(fields, scheme, scheme_at, name, (None,))
    _expect(fields, scheme, scheme_at, "format", (None, "pack-quantized"))
    weights = scheme.get("weights")
    if not isinstance(weights, dict):
        raise fields.error(f"{scheme_at}.weights", f"expected an object, got {weights!r}")
    at = f"{scheme_at}.weights"
    _expect(fields, weights, at, "num_bits", (4,))
    _expect(fields, weights, at, "type", ("int",))
    _expect(fields, weights, at, "symmetric", (True,))
    _expect(fields, weights, at, "strategy", ("group",))
    _expect(fields, weights, at, "dynamic", (False,))
    _expect(fields, weights, at, "actorder", (None, False))
    _expect(fields, weights, at, "block_structure", (None,))
    for name in ("scale_dtype", "zp_dtype"):
        _expect(fields, weights, at, name, (None, "torch.bfloat16", "torch.float16", "bfloat16", "float16"))
    group_size = weights.get("group_size")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise fields.error(f"{at}.group_size", f"expected a positive even integer, got {group_size!r}")
    _refuse_unknown(fields, config, top, {"quant_method", "format", "config_groups", "kv_cache_scheme",
                    "sparsity_config", "transform_config", "moe_sparsity_config"} | INERT)  # fmt: skip
    _refuse_unknown(fields, scheme, scheme_at, {"input_activations", "output_activations", "format", "weights"}
                    | SCHEME_INERT)  # fmt: skip
    known = {"num_bits", "type", "symmetric", "strategy", "dynamic", "actorder", "block_structure", "scale_dtype",
             "zp_dtype", "group_size"}  # fmt: skip
    _refuse_unknown(fields, weights, at, known | WEIGHTS_INERT)
    return WeightQuantization("int4", group_size)


def _fp8(fields: ConfigFields, config: dict[str, Any], top: str) -> WeightQuantization:
    _expect(fields, config, top, "fmt", ("e4m3",))
    _expect(fields, config, top, "activation_scheme", ("dynamic",))
    _expect(fields, config, top, "scale_fmt", (None, "float"))
    _expect(fields, config, top, "expert_dtype", (None, "fp8"))
    block = config.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and block[0] == block[1] and isinstance(block[0], int)
            and not isinstance(block[0], bool) and block[0] > 0):  # fmt: skip
        raise fields.error(f"{top}.weight_block_size", f"expected a square block [B, B], got {block!r}")
    known = {"quant_method", "fmt", "activation_scheme", "scale_fmt", "expert_dtype", "weight_block_size"}
    _refuse_unknown(fields, config, top, known | FP8_INERT)
    return WeightQuantization("fp8", block[0])


def _expect(fields: ConfigFields, config: dict[str, Any], where: str, name: str, allowed: tuple[Any, ...]) -> None:
    value = config.get(name)
    if value not in allowed:
        raise fields.error(
            f"{where}.{name}", f"value {value!r} is not supported; the engine runs quantized checkpoints with "
            f"{list(allowed)} here (compressed-tensors' pack-quantized int4, or DeepSeek's block fp8)")  # fmt: skip


def _refuse_unknown(fields: ConfigFields, config: dict[str, Any], where: str, known: set[str] | frozenset[str]) -> None:
    unknown = sorted(set(config) - known)
    if unknown:
        message = f"unknown key; it may change how weights are stored (all: {unknown})"
        raise fields.error(f"{where}.{unknown[0]}", message)
