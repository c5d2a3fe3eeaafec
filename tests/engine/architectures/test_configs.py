"""Published configs of the supported model families parse into the right DecoderSpec (no weights needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.architectures import parse_config
from engine.architectures.spec import WeightQuantization
from engine.errors import UnsupportedModelError

COMMON = {
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "output_router_logits": False,
    "use_cache": True,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}

QWEN3_30B_A3B = COMMON | {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "use_sliding_window": False,
    "transformers_version": "4.51.0",
    "vocab_size": 151936,
}
MIXTRAL_8X7B = COMMON | {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "transformers_version": "4.36.0.dev0",
    "vocab_size": 32000,
}
OLMOE_1B_7B = COMMON | {
    "architectures": ["OlmoeForCausalLM"],
    "model_type": "olmoe",
    "attention_bias": False,
    "bos_token_id": None,
    "clip_qkv": None,
    "eos_token_id": 50279,
    "hidden_size": 2048,
    "intermediate_size": 1024,
    "max_position_embeddings": 4096,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 16,
    "num_key_value_heads": 16,
    "pad_token_id": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.01,
    "transformers_version": "4.43.0.dev0",
    "vocab_size": 50304,
}
QWEN15_MOE_A27B = COMMON | {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "decoder_sparse_step": 1,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "moe_intermediate_size": 1408,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "transformers_version": "4.40.0.dev0",
    "vocab_size": 151936,
}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            QWEN3_30B_A3B,
            dict(
                num_layers=48,
                head_dim=128,
                num_experts=128,
                top_k=8,
                qk_norm="per_head",
                norm_topk_prob=True,
                sparse_layers=(True,) * 48,
                sliding_windows=(None,) * 48,
            ),
        ),
        (
            MIXTRAL_8X7B,
            dict(
                num_layers=32,
                head_dim=128,
                num_experts=8,
                top_k=2,
                moe_intermediate_size=14336,
                norm_topk_prob=True,
                moe_prefix="block_sparse_moe",
                expert_names=("w1", "w3", "w2"),
            ),
        ),
        (OLMOE_1B_7B, dict(num_experts=64, top_k=8, qk_norm="full", clip_qkv=None, moe_intermediate_size=1024)),
        (
            QWEN15_MOE_A27B,
            dict(
                num_experts=60,
                top_k=4,
                qkv_bias=True,
                shared_expert_intermediate_size=5632,
                sliding_windows=(None,) * 24,
                eos_token_ids=(151643,),
            ),
        ),
    ],
    ids=["qwen3-30b-a3b", "mixtral-8x7b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b"],
)
def test_published_configs(config, expected):
    spec = parse_config(dict(config), Path("config.json"))
    assert {key: getattr(spec, key) for key in expected} == expected


def test_quantization_the_engine_does_not_implement_is_refused():
    config = dict(MIXTRAL_8X7B, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(UnsupportedModelError, match=r"quantization_config\.quant_method.*'gptq'"):
        parse_config(config, Path("config.json"))


# Kimi K2.5's text model (DeepSeek-V3's architecture at Kimi K2's sizes), its quantization_config inside text_config.
KIMI_K25_TEXT = COMMON | {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 163840, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 64,
    "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 384, "routed_scaling_factor": 2.827,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": True, "scoring_func": "sigmoid", "rms_norm_eps": 1e-05,
    "rope_theta": 50000.0, "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
    "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}, "eos_token_id": 163585,
    "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "kv_cache_scheme": None, "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*"],
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 32, "strategy": "group",
                        "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}}},
    },
}  # fmt: skip
KIMI_K25 = {
    "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25", "bos_token_id": 163584,
    "eos_token_id": 163585, "pad_token_id": 163839, "media_placeholder_token_id": 163605, "ignore_index": -100,
    "vision_config": {"patch_size": 14}, "text_config": KIMI_K25_TEXT,
}  # fmt: skip


def test_kimi_k25_is_its_int4_text_model():
    spec = parse_config(KIMI_K25, Path("config.json"))
    assert (spec.num_layers, spec.num_experts, spec.top_k, spec.moe_intermediate_size) == (61, 384, 8, 2048)
    assert spec.quantization == WeightQuantization("int4", 32) and spec.sparse_layers == (False,) + (True,) * 60


def test_quantization_config_given_twice_is_refused():
    config = dict(KIMI_K25, quantization_config=KIMI_K25_TEXT["quantization_config"])
    with pytest.raises(UnsupportedModelError, match="given twice"):
        parse_config(config, Path("config.json"))


def test_errors_in_kimi_k25s_quantization_config_name_its_place():
    quantization = {**KIMI_K25_TEXT["quantization_config"], "quant_method": "gptq"}
    config = {**KIMI_K25, "text_config": {**KIMI_K25_TEXT, "quantization_config": quantization}}
    with pytest.raises(UnsupportedModelError, match=r"text_config\.quantization_config\.quant_method.*'gptq'"):
        parse_config(config, Path("config.json"))
