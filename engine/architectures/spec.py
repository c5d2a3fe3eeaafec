"""DecoderSpec: what the shared MoE decoder needs, read strictly from a Hugging Face config.json.

Each architecture module turns its config into a DecoderSpec. Every config key is either honoured,
known not to change inference (``INERT_FIELDS``), or refused: an unknown key may change the math,
so it is an error rather than a silent approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.architectures.rope import Rope
from engine.errors import UnsupportedModelError

# Keys that describe training, bookkeeping or tooling, never the forward pass.
INERT_FIELDS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "initializer_range", "use_cache", "output_router_logits", "router_aux_loss_coef", "router_z_loss_coef",
    "router_jitter_noise", "attention_dropout", "bos_token_id", "pad_token_id", "max_position_embeddings",
    "return_dict", "output_hidden_states", "output_attentions", "tie_encoder_decoder", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "use_bfloat16",
})  # fmt: skip

_MISSING = object()


class ConfigFields:
    """Typed, tracked access to config.json; ``finish`` refuses every key nobody read."""

    def __init__(self, config: dict[str, Any], path: Path, extra_inert: frozenset[str] = frozenset()):
        self.config = config
        self.path = path
        self.used: set[str] = set()
        self.inert = INERT_FIELDS | extra_inert

    def error(self, name: str, message: str) -> UnsupportedModelError:
        return UnsupportedModelError(self.path, message, field=name)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        self.used.add(name)
        value = self.config.get(name, default)
        if value is _MISSING:
            raise self.error(name, "required field is missing")
        if value is None and default is None:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise self.error(name, f"expected {_kind_name(kind)}, got {value!r}")
        return value

    def count(self, name: str, default: Any = _MISSING, minimum: int = 1) -> int:
        value = self.get(name, int, default)
        if value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value}")
        return value

    def expect(self, name: str, allowed: tuple[Any, ...], default: Any = _MISSING) -> Any:
        """A field whose value the engine supports only from ``allowed``."""
        self.used.add(name)
        value = self.config.get(name, default)
        if value is _MISSING:
            raise self.error(name, "required field is missing")
        if value not in allowed:
            raise self.error(name, f"value {value!r} is not supported; the engine implements {list(allowed)}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.config) - self.used - self.inert)
        if unknown:
            raise self.error(
                unknown[0],
                "unknown config key; it may change the model's math, so the engine "
                f"refuses it rather than ignore it (all unknown: {unknown})",
            )


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


@dataclass(frozen=True)
class LatentAttention:
    """Multi-head latent attention (DeepSeek-V2/V3): queries through an optional low-rank projection, keys and
    values from one shared latent of ``kv_lora_rank`` plus a rotary part of ``qk_rope_head_dim`` shared by the
    heads; the KV cache keeps only those two."""

    q_lora_rank: int | None  # None: one full q projection
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    interleaved_rope: bool  # rotary pairs are (x0, x1), (x2, x3), ... rather than the two halves
    softmax_scale: float
    bias: bool  # q_a_proj, kv_a_proj_with_mqa and o_proj carry biases


@dataclass(frozen=True)
class GroupedSigmoidRouter:
    """DeepSeek-V3's router: sigmoid scores; the choice adds a per-expert correction bias and keeps to the
    ``topk_group`` best of ``n_group`` expert groups (a group scores the sum of its two best); the weights are
    the chosen experts' plain scores, optionally renormalised, times ``routed_scaling_factor``."""

    n_group: int
    topk_group: int
    routed_scaling_factor: float


@dataclass(frozen=True)
class GatedDeltaNet:
    """Qwen3.5's linear attention (Yang et al. 2024, "Gated Delta Networks"): a causal depthwise convolution over
    the q, k, v projections, then per value head a [key_head_dim, value_head_dim] state decayed and corrected by
    the delta rule each token; query and key heads are shared by groups of value heads."""

    conv_kernel: int
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int


@dataclass(frozen=True)
class WeightQuantization:
    """How a quantized checkpoint stores its weights (read by ``models/quantization.py``)."""

    format: str  # "int4": compressed-tensors' pack-quantized int4 (routed experts); "fp8": DeepSeek's block fp8
    group_size: int  # int4's group along the input, fp8's block side


@dataclass(frozen=True)
class DecoderSpec:
    """Everything the shared decoder needs; weight names follow the Hugging Face checkpoint."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: Rope
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    top_k: int
    num_experts: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    dense_intermediate_size: int
    sparse_layers: tuple[bool, ...]  # per layer: MoE block, else a dense MLP
    sliding_windows: tuple[int | None, ...]  # per layer
    qk_norm: str = "none"  # or "per_head" (Qwen3), "full" (OLMoE: over all heads at once)
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    shared_expert_name: str = "shared_expert"  # DeepSeek: "shared_experts"
    shared_expert_gated: bool = True  # Qwen2-MoE's sigmoid gate; DeepSeek adds its shared experts as they are
    latent_attention: LatentAttention | None = None
    grouped_router: GroupedSigmoidRouter | None = None  # None: softmax over the router logits
    gated_delta_net: GatedDeltaNet | None = None
    linear_layers: tuple[bool, ...] = ()  # per layer: Gated DeltaNet instead of attention (empty: none)
    attention_output_gate: bool = False  # Qwen3.5: q_proj also gives a per-head sigmoid gate on the output
    zero_centered_norms: bool = False  # Qwen3.5: the RMSNorms scale by 1 + weight
    moe_prefix: str = "mlp"  # Mixtral's original saves use "block_sparse_moe"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert gate, up, down
    quantization: WeightQuantization | None = None  # None: every weight a float tensor

    @property
    def moe_layers(self) -> list[int]:
        """The indices of the layers with a MoE block, in order."""
        return [i for i, sparse in enumerate(self.sparse_layers) if sparse]


def read_eos(fields: ConfigFields) -> tuple[int, ...]:
    eos = fields.get("eos_token_id", (int, list), None)
    if eos is None:
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) for i in ids):
        raise fields.error("eos_token_id", f"expected an integer or a list of integers, got {eos!r}")
    return tuple(ids)


def read_layer_set(fields: ConfigFields, name: str, num_layers: int) -> frozenset[int]:
    layers = fields.get(name, list, None) or []
    if not all(isinstance(i, int) and 0 <= i < num_layers for i in layers):
        raise fields.error(name, f"expected layer indices in [0, {num_layers}), got {layers!r}")
    return frozenset(layers)


def read_rope(fields: ConfigFields, head_dim: int, partial: bool = False) -> Rope:
    """RoPE from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (older saves).

    ``partial``: the architecture rotates only the first ``partial_rotary_factor`` of each head (Qwen3.5), whose
    multimodal rope sections all see the same position in text, so they are plain RoPE there.
    """
    params = fields.get("rope_parameters", dict, None)
    scaling = fields.get("rope_scaling", dict, None)
    name = "rope_parameters" if params is not None else "rope_scaling"
    params = dict(params if params is not None else (scaling or {}))
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = fields.get("rope_theta", float, 10000.0)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    factor = params.pop("partial_rotary_factor", 1.0)
    if partial:
        params.pop("mrope_section", None), params.pop("mrope_interleaved", None)
        head_dim = int(head_dim * factor)
        if head_dim < 2 or head_dim % 2:
            raise fields.error(name, f"partial_rotary_factor {factor} leaves {head_dim} rotary dims, not an even count")
    elif factor != 1.0:
        raise fields.error(name, "partial_rotary_factor other than 1.0 is not supported for this architecture")
    base = float(theta)
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)

    def take(key: str, default: Any = _MISSING) -> float:
        value = params.pop(key, default)
        if value is _MISSING:
            raise fields.error(name, f"rope_type '{rope_type}' needs '{key}'")
        return value

    attention_scaling = 1.0
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv_freq = inv_freq / take("factor")
    elif rope_type == "llama3":
        inv_freq = _llama3(
            inv_freq,
            take("factor"),
            take("low_freq_factor"),
            take("high_freq_factor"),
            take("original_max_position_embeddings"),
        )
    elif rope_type == "yarn":
        original = take("original_max_position_embeddings", fields.config.get("max_position_embeddings"))
        inv_freq, attention_scaling = _yarn(
            base,
            head_dim,
            take("factor"),
            original,
            take("attention_factor", None),
            take("mscale", None),
            take("mscale_all_dim", None),
            take("beta_fast", None) or 32,
            take("beta_slow", None) or 1,
            take("truncate", True),
        )
    else:
        raise fields.error(
            name, f"rope_type '{rope_type}' is not supported; the engine implements default, linear, llama3 and yarn"
        )
    if params:
        raise fields.error(name, f"unknown keys {sorted(params)} for rope_type '{rope_type}'")
    return Rope(inv_freq, attention_scaling)


def _llama3(
    inv_freq: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float, old_context: float
) -> np.ndarray:
    """Llama 3.1 frequency-dependent scaling, as in Meta's reference code."""
    low_wavelen = old_context / low_freq_factor
    high_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched ``factor`` times."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(
    base: float,
    dim: int,
    factor: float,
    original: int,
    attention_factor: float | None,
    mscale: float | None,
    mscale_all_dim: float | None,
    beta_fast: float,
    beta_slow: float,
    truncate: bool,
) -> tuple[np.ndarray, float]:
    """YaRN (Peng et al. 2023, arXiv:2309.00071), section 3.4, as Hugging Face implements it."""

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as the reference: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def read_common(fields: ConfigFields, rope_dim: int | None = None, partial_rope: bool = False) -> dict[str, Any]:
    """The fields every supported architecture shares, as DecoderSpec keyword arguments.

    ``rope_dim``: the rotary dimension when it is not the head dimension (latent attention); a ``head_dim`` in
    the config must then equal it, as transformers saves it so. ``partial_rope``: see ``read_rope``.
    """
    fields.expect("hidden_act", ("silu",), "silu")
    hidden = fields.count("hidden_size")
    heads = fields.count("num_attention_heads")
    kv_heads = fields.get("num_key_value_heads", int, None) or heads
    if heads % kv_heads:
        raise fields.error("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}")
    head_dim = fields.get("head_dim", int, None) or rope_dim or hidden // heads
    if rope_dim is not None and head_dim != rope_dim:
        raise fields.error("head_dim", f"must equal qk_rope_head_dim {rope_dim} for latent attention, got {head_dim}")
    return dict(
        model_type=fields.get("model_type", str),
        vocab_size=fields.count("vocab_size"),
        hidden_size=hidden,
        num_layers=fields.count("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=fields.get("rms_norm_eps", float, 1e-6),
        rope=read_rope(fields, head_dim, partial_rope),
        tie_word_embeddings=fields.get("tie_word_embeddings", bool, False),
        eos_token_ids=read_eos(fields),
        top_k=fields.count("num_experts_per_tok"),
    )


def read_num_experts(fields: ConfigFields) -> int:
    """``num_experts``, which transformers 5 saves as ``num_local_experts`` for some architectures."""
    values = {n: fields.get(n, int, None) for n in ("num_experts", "num_local_experts")}
    given = {n: v for n, v in values.items() if v is not None}
    if not given:
        raise fields.error("num_experts", "required field is missing")
    if len(set(given.values())) > 1:
        raise fields.error("num_local_experts", f"disagrees with num_experts: {given}")
    count = next(iter(given.values()))
    if count < 1:
        raise fields.error(next(iter(given)), f"must be at least 1, got {count}")
    return count


def sparse_layers(fields: ConfigFields, num_layers: int) -> tuple[bool, ...]:
    """Qwen's rule: a layer is MoE unless listed in ``mlp_only_layers`` or off the ``decoder_sparse_step``."""
    mlp_only = read_layer_set(fields, "mlp_only_layers", num_layers)
    step = fields.count("decoder_sparse_step", 1)
    return tuple(i not in mlp_only and (i + 1) % step == 0 for i in range(num_layers))
