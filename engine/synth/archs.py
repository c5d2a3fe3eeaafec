"""What each architecture's checkpoint holds: tensor names and shapes, and its config.json.

Every tensor comes with a ``kind`` that tells the weight builder how to fill it: ``ones`` (norms),
``normal`` (i.i.d. Gaussian with the given std), or one of the structured kinds that carry the routing
structure (``embed``, ``router``, ``lm_head``; see ``weights.py``).
"""

from __future__ import annotations

from typing import NamedTuple

from engine.synth.shapes import SynthShape

EXPERT_NAMES = {  # the MoE block, then each expert's gate, up and down projections
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "deepseek_v3": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "qwen3_5_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),  # its routed experts are fused, as it stores them
}
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class TensorSpec(NamedTuple):
    name: str
    dims: tuple[int, ...]
    kind: str
    std: float = 0.0


def tensor_specs(s: SynthShape, residual_scale: float) -> list[TensorSpec]:
    """Every tensor in file order; ``residual_scale`` scales what each block writes into the residual stream."""
    if s.arch == "qwen3_5_moe":
        return _qwen3_5_specs(s, residual_scale)
    h, i = s.hidden_size, s.moe_intermediate_size
    moe, *names = EXPERT_NAMES[s.arch]
    specs = [TensorSpec("model.embed_tokens.weight", (s.vocab_size, h), "embed")]
    for layer in range(s.num_layers):
        p = f"model.layers.{layer}"
        specs.append(TensorSpec(f"{p}.input_layernorm.weight", (h,), "ones"))
        attention = _latent_attention if s.arch == "deepseek_v3" else _attention
        specs += attention(s, p, residual_scale)
        specs.append(TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), "ones"))
        if layer < s.dense_layers:
            specs += _mlp(f"{p}.mlp", names, h, s.dense_intermediate_size(), residual_scale)
            continue
        specs.append(TensorSpec(f"{p}.{moe}.gate.weight", (s.num_experts, h), "router"))
        if s.arch == "deepseek_v3":
            specs.append(TensorSpec(f"{p}.{moe}.gate.e_score_correction_bias", (s.num_experts,), "zeros"))
        for e in range(s.num_experts):
            specs += _mlp(f"{p}.{moe}.experts.{e}", names, h, i, residual_scale)
        if s.shared_experts:
            specs += _mlp(f"{p}.{moe}.shared_experts", names, h, s.shared_experts * i, residual_scale)
    specs += [TensorSpec("model.norm.weight", (h,), "ones"), TensorSpec("lm_head.weight", (s.vocab_size, h), "lm_head")]
    return specs


def is_routed_expert(name: str) -> bool:
    """Whether the tensor ``name`` is a routed expert's per-expert weight (not a shared expert's)."""
    return ".experts." in name and name.endswith(".weight")


def int4_quantization_config(group_size: int) -> dict:
    """Kimi K2.5's ``quantization_config``: its routed experts int4 (compressed-tensors, pack-quantized)."""
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": group_size, "strategy": "group",
               "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}  # fmt: skip
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "kv_cache_scheme": None,
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "input_activations": None,
                "output_activations": None,
                "weights": weights,
            }
        },
    }


def _qwen3_5_specs(s: SynthShape, residual_scale: float) -> list[TensorSpec]:
    """Qwen3.5's text model as its checkpoints hold it: under ``model.language_model``, zero-centred norms (so
    zeros scale by 1), each layer's routed experts in two fused tensors."""
    h, i, d, m = s.hidden_size, s.moe_intermediate_size, s.head_dim, s.delta_net_dims()
    base = "model.language_model"
    specs = [TensorSpec(f"{base}.embed_tokens.weight", (s.vocab_size, h), "embed")]
    for layer in range(s.num_layers):
        p = f"{base}.layers.{layer}"
        specs.append(TensorSpec(f"{p}.input_layernorm.weight", (h,), "zeros"))
        if s.is_linear(layer):
            a = f"{p}.linear_attn"
            key = m["linear_num_key_heads"] * m["linear_key_head_dim"]
            value, heads = m["linear_num_value_heads"] * m["linear_value_head_dim"], m["linear_num_value_heads"]
            kernel = m["linear_conv_kernel_dim"]
            specs += [
                TensorSpec(f"{a}.in_proj_qkv.weight", (2 * key + value, h), "normal", h**-0.5),
                TensorSpec(f"{a}.in_proj_z.weight", (value, h), "normal", h**-0.5),
                TensorSpec(f"{a}.in_proj_b.weight", (heads, h), "normal", h**-0.5),
                TensorSpec(f"{a}.in_proj_a.weight", (heads, h), "normal", h**-0.5),
                TensorSpec(f"{a}.conv1d.weight", (2 * key + value, 1, kernel), "normal", kernel**-0.5),
                TensorSpec(f"{a}.dt_bias", (heads,), "ones"),
                TensorSpec(f"{a}.A_log", (heads,), "zeros"),
                TensorSpec(f"{a}.norm.weight", (m["linear_value_head_dim"],), "ones"),
                TensorSpec(f"{a}.out_proj.weight", (h, value), "normal", residual_scale * value**-0.5),
            ]
        else:
            a, q_dim, kv_dim = f"{p}.self_attn", s.num_heads * d, s.num_kv_heads * d
            specs += [
                TensorSpec(f"{a}.q_proj.weight", (2 * q_dim, h), "normal", h**-0.5),  # queries and their gates
                TensorSpec(f"{a}.k_proj.weight", (kv_dim, h), "normal", h**-0.5),
                TensorSpec(f"{a}.v_proj.weight", (kv_dim, h), "normal", h**-0.5),
                TensorSpec(f"{a}.o_proj.weight", (h, q_dim), "normal", 2 * residual_scale * q_dim**-0.5),
                TensorSpec(f"{a}.q_norm.weight", (d,), "zeros"),
                TensorSpec(f"{a}.k_norm.weight", (d,), "zeros"),
            ]
        moe = f"{p}.mlp"
        specs += [
            TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), "zeros"),
            TensorSpec(f"{moe}.gate.weight", (s.num_experts, h), "router"),
            TensorSpec(f"{moe}.experts.gate_up_proj", (s.num_experts, 2 * i, h), "normal", h**-0.5),
            TensorSpec(f"{moe}.experts.down_proj", (s.num_experts, h, i), "normal", 2 * residual_scale * i**-0.5),
            *_mlp(f"{moe}.shared_expert", EXPERT_NAMES[s.arch][1:], h, s.shared_experts * i, residual_scale),
            TensorSpec(f"{moe}.shared_expert_gate.weight", (1, h), "normal", h**-0.5),
        ]
    return [
        *specs,
        TensorSpec(f"{base}.norm.weight", (h,), "zeros"),
        TensorSpec("lm_head.weight", (s.vocab_size, h), "lm_head"),
    ]


def _attention(s: SynthShape, p: str, residual_scale: float) -> list[TensorSpec]:
    h, d = s.hidden_size, s.head_dim
    q_dim, kv_dim = s.num_heads * d, s.num_kv_heads * d
    specs = [
        TensorSpec(f"{p}.self_attn.q_proj.weight", (q_dim, h), "normal", h**-0.5),
        TensorSpec(f"{p}.self_attn.k_proj.weight", (kv_dim, h), "normal", h**-0.5),
        TensorSpec(f"{p}.self_attn.v_proj.weight", (kv_dim, h), "normal", h**-0.5),
        TensorSpec(f"{p}.self_attn.o_proj.weight", (h, q_dim), "normal", residual_scale * q_dim**-0.5),
    ]
    if s.arch == "qwen3_moe":
        specs += [
            TensorSpec(f"{p}.self_attn.q_norm.weight", (d,), "ones"),
            TensorSpec(f"{p}.self_attn.k_norm.weight", (d,), "ones"),
        ]
    return specs


def _latent_attention(s: SynthShape, p: str, residual_scale: float) -> list[TensorSpec]:
    h, heads, m = s.hidden_size, s.num_heads, s.latent_dims()
    q_rank, kv_rank, rope = m["q_lora_rank"], m["kv_lora_rank"], m["qk_rope_head_dim"]
    q_dim, kv_dim, o_dim = (
        heads * (m["qk_nope_head_dim"] + rope),
        heads * (m["qk_nope_head_dim"] + m["v_head_dim"]),
        heads * m["v_head_dim"],
    )
    a = f"{p}.self_attn"
    return [
        TensorSpec(f"{a}.q_a_proj.weight", (q_rank, h), "normal", h**-0.5),
        TensorSpec(f"{a}.q_a_layernorm.weight", (q_rank,), "ones"),
        TensorSpec(f"{a}.q_b_proj.weight", (q_dim, q_rank), "normal", q_rank**-0.5),
        TensorSpec(f"{a}.kv_a_proj_with_mqa.weight", (kv_rank + rope, h), "normal", h**-0.5),
        TensorSpec(f"{a}.kv_a_layernorm.weight", (kv_rank,), "ones"),
        TensorSpec(f"{a}.kv_b_proj.weight", (kv_dim, kv_rank), "normal", kv_rank**-0.5),
        TensorSpec(f"{a}.o_proj.weight", (h, o_dim), "normal", residual_scale * o_dim**-0.5),
    ]


def _mlp(prefix: str, names: list[str], h: int, i: int, residual_scale: float) -> list[TensorSpec]:
    gate, up, down = names
    return [
        TensorSpec(f"{prefix}.{gate}.weight", (i, h), "normal", h**-0.5),
        TensorSpec(f"{prefix}.{up}.weight", (i, h), "normal", h**-0.5),
        # silu(gate) * up has an rms near 0.5 for unit inputs: the 2 makes one expert's output ~residual_scale
        TensorSpec(f"{prefix}.{down}.weight", (h, i), "normal", 2 * residual_scale * i**-0.5),
    ]


def config(s: SynthShape, dtype: str, eos_token_id: int) -> dict:
    common = {
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "num_experts_per_tok": s.top_k,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "sliding_window": None,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "torch_dtype": TORCH_DTYPES[dtype],
    }
    if s.arch == "deepseek_v3":
        del common["head_dim"], common["sliding_window"]  # DeepSeek's configs imply the one, never use the other
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **common,
            **s.latent_dims(),
            "intermediate_size": s.dense_intermediate_size(),
            "moe_intermediate_size": s.moe_intermediate_size,
            "n_routed_experts": s.num_experts,
            "n_shared_experts": s.shared_experts,
            "first_k_dense_replace": s.dense_layers,
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.0,
            "rope_interleave": True,
            "attention_bias": False,
        }
    if s.arch == "qwen3_5_moe":
        del common["sliding_window"], common["rope_theta"]
        return {
            "architectures": ["Qwen3_5MoeForCausalLM"],
            "model_type": "qwen3_5_moe_text",
            **common,
            **s.delta_net_dims(),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
            "layer_types": ["linear_attention" if s.is_linear(n) else "full_attention" for n in range(s.num_layers)],
            "moe_intermediate_size": s.moe_intermediate_size,
            "shared_expert_intermediate_size": s.shared_experts * s.moe_intermediate_size,
            "num_experts": s.num_experts,
            "attention_bias": False,
        }
    if s.arch == "mixtral":
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            **common,
            "intermediate_size": s.moe_intermediate_size,
            "num_local_experts": s.num_experts,
        }
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **common,
        "intermediate_size": s.moe_intermediate_size * s.top_k,
        "moe_intermediate_size": s.moe_intermediate_size,
        "num_experts": s.num_experts,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "attention_bias": False,
        "use_sliding_window": False,
    }
