"""DeepSeek-V3 (and the Kimi K2 models built on it): multi-head latent attention, a sigmoid router with a
choice bias and grouped top-k, shared experts, and dense first layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.architectures.spec import (
    ConfigFields,
    DecoderSpec,
    GroupedSigmoidRouter,
    LatentAttention,
    read_common,
    yarn_mscale,
)

# Training settings, the expert-parallel degree, and the multi-token-prediction layers that follow the model
# (inference without speculative decoding never runs them), plus the remote code's import map.
EXTRA_INERT = frozenset({
    "aux_loss_alpha", "seq_aux", "ep_size", "num_nextn_predict_layers", "num_mtp_layers", "auto_map",
})  # fmt: skip


# Kimi K2.5's multimodal config around its text model: the vision tower, its projector and its special tokens.
MULTIMODAL_INERT = frozenset({
    "vision_config", "media_placeholder_token_id", "ignore_index", "bos_token_id", "pad_token_id", "auto_map",
})  # fmt: skip


def parse(config: dict[str, Any], path: Path) -> DecoderSpec:
    if config.get("model_type") == "kimi_k25":
        return _parse_text(_text_config(config, path), path)
    return _parse_text(config, path)


def _text_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Kimi K2.5's text model config (whose tensors are under ``language_model``), with the outer end-of-text
    token and embedding tying where the text config leaves them out."""
    outer = ConfigFields(config, path, MULTIMODAL_INERT)
    text = outer.get("text_config", dict)
    outer.get("model_type", str)
    eos = outer.get("eos_token_id", (int, list), None)
    tie = outer.get("tie_word_embeddings", bool, None)
    outer.finish()
    if text.get("model_type") not in ("kimi_k2", "deepseek_v3"):
        raise outer.error("text_config.model_type", f"expected kimi_k2 or deepseek_v3, got {text.get('model_type')!r}")
    inherited = {"eos_token_id": eos, "tie_word_embeddings": tie}
    return {**{key: value for key, value in inherited.items() if value is not None}, **text}


def _parse_text(config: dict[str, Any], path: Path) -> DecoderSpec:
    f = ConfigFields(config, path, EXTRA_INERT)
    f.expect("scoring_func", ("sigmoid",), "sigmoid")
    f.expect("topk_method", ("noaux_tc",), "noaux_tc")
    f.expect("moe_layer_freq", (1,), 1)
    f.expect("pretraining_tp", (1, None), 1)
    rope_dim = f.count("qk_rope_head_dim")
    nope_dim = f.count("qk_nope_head_dim")
    qk_dim = f.get("qk_head_dim", int, None)
    if qk_dim is not None and qk_dim != nope_dim + rope_dim:
        raise f.error("qk_head_dim", f"must be qk_nope_head_dim + qk_rope_head_dim = {nope_dim + rope_dim}")
    common = read_common(f, rope_dim=rope_dim)
    if common["num_kv_heads"] != common["num_heads"]:
        raise f.error("num_key_value_heads", "latent attention expands keys and values for every query head")
    n, experts, k = common["num_layers"], f.count("n_routed_experts"), common["top_k"]
    router = _router(f, experts, k)
    dense_layers = f.count("first_k_dense_replace", 0, minimum=0)
    spec = DecoderSpec(
        **common,
        sliding_windows=(None,) * n,
        sparse_layers=tuple(i >= dense_layers for i in range(n)),
        dense_intermediate_size=f.count("intermediate_size"),
        num_experts=experts,
        moe_intermediate_size=(moe := f.count("moe_intermediate_size")),
        norm_topk_prob=f.get("norm_topk_prob", bool, True),
        shared_expert_intermediate_size=moe * f.count("n_shared_experts", 1, minimum=0),
        shared_expert_name="shared_experts",
        shared_expert_gated=False,
        latent_attention=LatentAttention(
            q_lora_rank=f.get("q_lora_rank", int, None),
            kv_lora_rank=f.count("kv_lora_rank"),
            qk_nope_head_dim=nope_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=f.count("v_head_dim"),
            interleaved_rope=f.get("rope_interleave", bool, True),
            softmax_scale=_softmax_scale(f, nope_dim + rope_dim),
            bias=f.get("attention_bias", bool, False),
        ),
        grouped_router=router,
    )
    f.finish()
    return spec


def _router(f: ConfigFields, experts: int, k: int) -> GroupedSigmoidRouter:
    groups = f.get("n_group", int, None) or 1
    best_groups = f.get("topk_group", int, None) or 1
    if experts % groups or experts // groups < 2:
        raise f.error("n_group", f"must divide n_routed_experts {experts} into groups of at least 2, got {groups}")
    if not 1 <= best_groups <= groups:
        raise f.error("topk_group", f"must be between 1 and n_group {groups}, got {best_groups}")
    if k > best_groups * (experts // groups):
        raise f.error("num_experts_per_tok", f"{k} exceeds the {best_groups * (experts // groups)} experts of the "
                      "groups kept")  # fmt: skip
    return GroupedSigmoidRouter(groups, best_groups, f.get("routed_scaling_factor", float, 1.0))


def _softmax_scale(f: ConfigFields, qk_dim: int) -> float:
    """1/sqrt(qk_dim), times YaRN's mscale(factor, mscale_all_dim) squared when the rope is scaled (as the
    reference implementation, since the rotary part alone cannot carry the long-context temperature)."""
    params = f.config.get("rope_parameters") or f.config.get("rope_scaling") or {}
    scale = qk_dim**-0.5
    rope_type = params.get("rope_type", params.get("type", "default"))
    mscale_all_dim = params.get("mscale_all_dim") or 0
    if rope_type != "default" and mscale_all_dim:
        scale *= yarn_mscale(params.get("factor", 1), mscale_all_dim) ** 2
    return scale
