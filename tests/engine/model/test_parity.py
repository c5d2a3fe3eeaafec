"""The engine's logits and greedy tokens against transformers on the same tiny random checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from engine import generate, load_model, score
from tests.engine.tiny_models import BASE, CLASSES, VOCAB, build, randomize, reference_greedy, reference_logits

SEQ = 40  # longer than every sliding window below, so windows are exercised
WINDOW = 7

CASES = {
    "qwen3_moe": [
        {},
        {"norm_topk_prob": True},
        {"mlp_only_layers": [1]},
        {"decoder_sparse_step": 2},
        {"attention_bias": True, "tie_word_embeddings": True},
        {"use_sliding_window": True, "sliding_window": WINDOW},
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}},
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
        {"fused": True},
        {"max_shard_size": "40KB"},
    ],
    "mixtral": [
        {},
        {"sliding_window": WINDOW},
        {"fused": True, "max_shard_size": "40KB"},
        {"num_experts_per_tok": 3},
    ],
    "olmoe": [
        {},
        {"norm_topk_prob": True},
        {"clip_qkv": 0.5, "attention_bias": True},
        {"fused": True},
        {"max_shard_size": "40KB"},
    ],
    "qwen2_moe": [
        {},
        {"norm_topk_prob": True, "qkv_bias": False},
        {"decoder_sparse_step": 2},
        {"mlp_only_layers": [0]},
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
        {"fused": True},
        {"max_shard_size": "40KB"},
    ],
    "deepseek_v3": [
        {},  # grouped routing (keep 1 of 2 groups), a dense first layer, low-rank queries, a shared expert
        {"q_lora_rank": None, "norm_topk_prob": False},
        {"n_group": 1, "topk_group": 1, "first_k_dense_replace": 0},  # Kimi K2's routing, every layer MoE
        {"n_group": 4, "topk_group": 2, "n_shared_experts": 2, "first_k_dense_replace": 2},
        {"rope_interleave": False, "attention_bias": True},
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "mscale": 0.8,
                "mscale_all_dim": 1.0,
                "beta_fast": 32,
                "beta_slow": 1,
            }
        },
        {"fused": True, "max_shard_size": "40KB"},
    ],
    "qwen3_5_moe": [
        {},  # per-expert tensors under model.language_model, as transformers saves the original format
        {"fused": True},  # fused expert tensors, as Qwen3.5's checkpoints store them
        {"layer_types": ["linear_attention", "full_attention"] * 2, "attention_bias": True},
        {"linear_num_key_heads": 4, "linear_conv_kernel_dim": 3, "max_shard_size": "40KB"},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.5}},
    ],
}
# Longer than transformers' chunk of the gated delta rule (64), so its chunked prefill is compared too.
SEQ_BY_ARCH = {"qwen3_5_moe": 80}
PARAMS = [pytest.param(arch, case, id=f"{arch}-{i}") for arch, cases in CASES.items() for i, case in enumerate(cases)]


def _prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB - 1, length).tolist()  # avoid eos (VOCAB - 1)


@pytest.mark.parametrize(("arch", "case"), PARAMS)
def test_fp32_logits_token_by_token_and_greedy_tokens_match_transformers(tmp_path, arch, case):
    reference, path = build(arch, tmp_path / "ckpt", **case)
    if case.get("max_shard_size"):
        assert (path / "model.safetensors.index.json").exists()
    model = load_model(path)
    ids = _prompt(1, SEQ_BY_ARCH.get(arch, SEQ))

    expected = reference_logits(reference, ids)
    np.testing.assert_allclose(score(model, ids), expected, atol=1e-4, rtol=0)
    cache = model.decoder.new_cache()  # one token at a time: the decode paths (compiled attention, routed experts)
    stepped = np.concatenate([model.decoder.forward(np.asarray([token]), cache) for token in ids])
    np.testing.assert_allclose(stepped, expected, atol=1e-4, rtol=0)

    prompt = ids[:8]
    expected = reference_greedy(reference, prompt, 16)
    assert generate(model, prompt, 16).tokens == expected


@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_checkpoints(tmp_path, arch, dtype):
    """The engine computes in fp32 from the stored 16-bit values, so its reference is transformers running
    fp32 math on the same stored values: 1e-4, as for fp32 checkpoints.

    Transformers' own 16-bit math is compared more loosely, for a reason measured on these models: it
    rounds every activation to 8 (bf16) or 11 (fp16) significant bits, a relative step of 0.4% or 0.05%,
    and where two experts' router scores lie closer than that, it routes the token to another expert.
    Such a flip moves that token's logits by up to ~65% (bf16) / ~40% (fp16) of the logits' largest
    magnitude, so a max-error bound says nothing. Over 3 seeds x 4 architectures the mean error was at
    most 3.2% (bf16) / 1.6% (fp16) of that magnitude and top-1 agreement at least 80% / 90%; the bounds
    below leave a margin over those figures.
    """
    _, path = build(arch, tmp_path / "ckpt", dtype=dtype)
    model = load_model(path)
    ids = _prompt(2, SEQ)
    ours = score(model, ids)

    model_cls = CLASSES[arch][1]
    upcast = model_cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    expected = reference_logits(upcast, ids)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    cache = model.decoder.new_cache()  # the decode paths: bf16 matrices stay packed, the MLPs run as one expert
    stepped = np.concatenate([model.decoder.forward(np.asarray([token]), cache) for token in ids])
    np.testing.assert_allclose(stepped, expected, atol=1e-4, rtol=0)
    if dtype == torch.bfloat16:
        layers = model.decoder.layers
        assert all((layer.shared_expert is None) == (layer.shared_expert_one is None) for layer in layers)
        assert all((layer.dense is None) == (layer.dense_expert is None) for layer in layers)

    native = model_cls.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    theirs = reference_logits(native, ids)
    scale = np.abs(theirs).max()
    mean_bound, top1_bound = (0.05, 0.75) if dtype == torch.bfloat16 else (0.025, 0.85)
    assert np.abs(ours - theirs).mean() <= mean_bound * scale
    assert np.mean(ours.argmax(-1) == theirs.argmax(-1)) >= top1_bound


def test_kimi_k2_configs_run_as_deepseek_v3(tmp_path):
    """Kimi K2 ships the DeepSeek-V3 architecture under its own model_type, with its remote code's keys."""
    reference, path = build("deepseek_v3", tmp_path / "ckpt", n_group=1, topk_group=1)
    config = json.loads((path / "config.json").read_text())
    config |= {"model_type": "kimi_k2", "auto_map": {"AutoModel": "modeling_deepseek.DeepseekV3Model"},
               "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    ids = _prompt(3, SEQ)
    np.testing.assert_allclose(score(load_model(path), ids), reference_logits(reference, ids), atol=1e-4, rtol=0)


def test_qwen3_5_multimodal_checkpoints_run_their_text_model(tmp_path):
    """Qwen3.5's published checkpoints are the multimodal model: the text model's settings in text_config, its
    tensors under model.language_model, a vision tower the engine leaves unread."""
    text = {"vocab_size": VOCAB, "eos_token_id": VOCAB - 1, "bos_token_id": None, "pad_token_id": None,
            **BASE["qwen3_5_moe"]}  # fmt: skip
    vision = {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64}
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision, attn_implementation="eager")
    torch.manual_seed(0)
    reference = transformers.Qwen3_5MoeForConditionalGeneration(config).eval()
    randomize(reference)
    reference.save_pretrained(tmp_path / "ckpt")
    ids = _prompt(4, SEQ_BY_ARCH["qwen3_5_moe"])
    ours = score(load_model(tmp_path / "ckpt"), ids)
    np.testing.assert_allclose(ours, reference_logits(reference, ids), atol=1e-4, rtol=0)
