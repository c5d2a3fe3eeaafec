"""``quantization_config``: the quantized checkpoints the engine runs as stored, and nothing it would misread.

Accepted: compressed-tensors' ``pack-quantized`` format with one scheme, weight-only symmetric int4 in groups
along the input (how Kimi K2.5 and Kimi K2 Thinking ship their routed experts). Which tensors the scheme covers
is read off the checkpoint itself (``weight_packed`` beside ``weight``), not off the ``ignore`` patterns: the
engine reads quantized routed experts and refuses any other quantized tensor by name when it meets it.
Everything else (FP8 blocks, activation quantization, asymmetric or other bit widths) is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.models.spec import ConfigFields

FIELD = "quantization_config"
# Keys that record how the checkpoint was made or which modules it covers (read off the tensors, see above).
INERT = frozenset({"quantization_status", "global_compression_ratio", "ignore", "version", "provider"})
SCHEME_INERT = frozenset({"targets"})
WEIGHTS_INERT = frozenset({"observer", "observer_kwargs"})


def read_expert_group_size(config: dict[str, Any], path: Path) -> int:
    """The int4 group size of a compressed-tensors checkpoint's experts; 0 without ``quantization_config``."""
    fields = ConfigFields(config, path)
    config = fields.get(FIELD, dict, None)
    if config is None:
        return 0
    _expect(fields, config, FIELD, "quant_method", ("compressed-tensors",))
    _expect(fields, config, FIELD, "format", ("pack-quantized",))
    for name in ("kv_cache_scheme", "sparsity_config", "transform_config", "moe_sparsity_config"):
        _expect(fields, config, FIELD, name, (None, {}))
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise fields.error(f"{FIELD}.config_groups", f"expected one quantization scheme, got {groups!r}")
    (group_name, scheme), = groups.items()  # fmt: skip
    where = f"{FIELD}.config_groups.{group_name}"
    if not isinstance(scheme, dict):
        raise fields.error(where, f"expected an object, got {scheme!r}")
    for name in ("input_activations", "output_activations"):
        _expect(fields, scheme, where, name, (None,))
    _expect(fields, scheme, where, "format", (None, "pack-quantized"))
    weights = scheme.get("weights")
    if not isinstance(weights, dict):
        raise fields.error(f"{where}.weights", f"expected an object, got {weights!r}")
    at = f"{where}.weights"
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
    _refuse_unknown(fields, config, FIELD, {"quant_method", "format", "config_groups", "kv_cache_scheme",
                    "sparsity_config", "transform_config", "moe_sparsity_config"} | INERT)  # fmt: skip
    _refuse_unknown(fields, scheme, where, {"input_activations", "output_activations", "format", "weights"}
                    | SCHEME_INERT)  # fmt: skip
    known = {"num_bits", "type", "symmetric", "strategy", "dynamic", "actorder", "block_structure", "scale_dtype",
             "zp_dtype", "group_size"}  # fmt: skip
    _refuse_unknown(fields, weights, at, known | WEIGHTS_INERT)
    return group_size


def _expect(fields: ConfigFields, config: dict[str, Any], where: str, name: str, allowed: tuple[Any, ...]) -> None:
    value = config.get(name)
    if value not in allowed:
        raise fields.error(
            f"{where}.{name}", f"value {value!r} is not supported; the engine runs quantized checkpoints with "
            f"{list(allowed)} here (compressed-tensors pack-quantized int4 weights, as Kimi K2.5 ships)")  # fmt: skip


def _refuse_unknown(fields: ConfigFields, config: dict[str, Any], where: str, known: set[str] | frozenset[str]) -> None:
    unknown = sorted(set(config) - known)
    if unknown:
        message = f"unknown key; it may change how weights are stored (all: {unknown})"
        raise fields.error(f"{where}.{unknown[0]}", message)
