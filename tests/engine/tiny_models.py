"""Tiny random Hugging Face MoE checkpoints built with transformers, the reference for the engine's numerics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers

from engine.synth.archs import int4_quantization_config

VOCAB = 96

BASE: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "mixtral": dict(
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    "olmoe": dict(
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "qwen2_moe": dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "deepseek_v3": dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        routed_scaling_factor=2.5,
    ),
    "qwen3_5_moe": dict(
        hidden_size=64,
        num_hidden_layers=4,  # three Gated DeltaNet layers, then full attention
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_conv_kernel_dim=4,
        # Qwen3.5's key and value heads are as wide as each other (128): with heads of 8 and 12 the gated norm
        # divided some outputs by an rms of 1e-3, multiplying their float32 rounding, so that transformers' own
        # fp32 logits were 1.2e-4 from its float64 ones and no fp32 implementation agreed with it to 1e-4
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
    ),
}

CLASSES = {
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
    "qwen3_5_moe": (transformers.Qwen3_5MoeTextConfig, transformers.Qwen3_5MoeForCausalLM),
}


def build(
    arch: str,
    out: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    fused: bool = False,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> tuple[torch.nn.Module, Path]:
    """Save a random ``arch`` model to ``out``; return it (float32, eval mode) and the directory."""
    config_cls, model_cls = CLASSES[arch]
    kwargs = (
        dict(
            vocab_size=VOCAB, eos_token_id=VOCAB - 1, bos_token_id=None, pad_token_id=None, attn_implementation="eager"
        )
        | BASE[arch]
        | overrides
    )
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    randomize(model)
    save_kwargs: dict[str, Any] = {"save_original_format": not fused}
    if max_shard_size:
        save_kwargs["max_shard_size"] = max_shard_size
    model.to(dtype).save_pretrained(out, **save_kwargs)
    return model.float(), out


def randomize(model: torch.nn.Module) -> None:
    """Weights large enough that routing is decisive and every parameter (norms, biases) matters.

    Every norm scales by about 1: Qwen3.5's zero-centred norms, which scale by 1 + weight, get weights around 0
    (around 1 they would double each layer's activations, and the tiny model would be so ill-conditioned that
    transformers' own fp32 paths, chunked and token by token, disagreed by 1e-3 to 1e-2).
    """
    zero_centred = model.config.model_type.startswith("qwen3_5")
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's router: a choice bias, zero when new
                buffer.copy_(0.1 * torch.randn_like(buffer))
        for name, p in model.named_parameters():
            if "norm" in name:
                plain = not zero_centred or "linear_attn.norm" in name  # the DeltaNet's gated norm is plain
                p.copy_(float(plain) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn_like(p) * 1.5 / fan_in**0.5)


def reference_logits(model: torch.nn.Module, ids: list[int]) -> Any:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def reference_greedy(model: torch.nn.Module, ids: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id
        )
    tokens = out[0, len(ids) :].tolist()
    eos = model.config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def compress_experts(model: torch.nn.Module, path: Path, group_size: int = 32) -> None:
    """Store ``path``'s routed experts (per-expert tensors) as compressed-tensors' pack-quantized int4, with the
    library's own compressor, and set ``model``'s experts to the library's own decompression of what was stored:
    the engine's reference is then transformers running exactly the weights on disk."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file, save_file

    scheme = QuantizationScheme.model_validate(int4_quantization_config(group_size)["config_groups"]["group_0"])
    experts: dict[str, torch.Tensor] = {}  # module name -> its dequantized weight
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file)
        for name in [n for n in tensors if ".mlp.experts." in n and n.endswith(".weight")]:
            w = tensors.pop(name).float()
            groups = w.reshape(w.shape[0], -1, group_size)
            scale = (groups.abs().amax(-1) / 7).to(torch.bfloat16)
            module = name.removesuffix(".weight")
            stored = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
            tensors |= {f"{module}.{key}": value.contiguous() for key, value in stored.items()}
            restored = PackedQuantizationCompressor.decompress(stored | {"weight_scale": scale.float()}, scheme)
            experts[module] = restored["weight"].float()
        save_file(tensors, file, metadata={"format": "pt"})
    _rewrite_index(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(
        json.dumps(config | {"quantization_config": int4_quantization_config(group_size)})
    )
    _set_experts(model, experts)


def _rewrite_index(path: Path) -> None:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if not index.exists():
        return
    weight_map = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            weight_map |= dict.fromkeys(f.keys(), file.name)
    data = json.loads(index.read_text())
    index.write_text(json.dumps(data | {"weight_map": weight_map}))


def _set_experts(model: torch.nn.Module, experts: dict[str, torch.Tensor]) -> None:
    """Write per-expert weights (``...mlp.experts.E.gate_proj``) into transformers' fused expert parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for module, w in experts.items():
            prefix, expert, proj = module.rsplit(".", 2)
            e = int(expert)
            if proj == "down_proj":
                params[f"{prefix}.down_proj"][e].copy_(w)
            else:
                rows = w.shape[0]
                gate_up = params[f"{prefix}.gate_up_proj"][e]
                (gate_up[:rows] if proj == "gate_proj" else gate_up[rows:]).copy_(w)


def fp8_blocks(path: Path, block: int) -> None:
    """Store ``path``'s linear weights as DeepSeek-V3's FP8 checkpoints do: float8 e4m3 with a float32
    ``weight_scale_inv`` per ``block`` x ``block`` (the router, norms, embeddings and head stay as they are)."""
    from safetensors.torch import load_file, save_file

    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file)
        for name in [n for n in tensors if _fp8_converted(n, tensors[n])]:
            w = tensors.pop(name).float()
            rows, cols = w.shape
            padded = torch.zeros(-(-rows // block) * block, -(-cols // block) * block)
            padded[:rows, :cols] = w
            blocks = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block)
            scale = blocks.abs().amax(dim=(1, 3)) / 448
            full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
            tensors[name] = torch.where(full > 0, w / full, 0).to(torch.float8_e4m3fn)
            tensors[f"{name}_scale_inv"] = scale.contiguous()
        save_file(tensors, file, metadata={"format": "pt"})
    _rewrite_index(path)
    config = json.loads((path / "config.json").read_text())
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [block, block], "modules_to_not_convert": FP8_NOT_CONVERTED}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config | {"quantization_config": quantization}))


# As Qwen's FP8 releases, the small projections stay unconverted (here: those with fewer rows than a block).
FP8_NOT_CONVERTED = ["lm_head", "mlp.gate", "shared_expert_gate", "in_proj_a", "in_proj_b"]


def _fp8_converted(name: str, tensor: torch.Tensor) -> bool:
    module = name.removesuffix(".weight")
    kept = any(module.endswith(s) for s in FP8_NOT_CONVERTED) or "embed_tokens" in name or "norm" in name
    return tensor.dim() == 2 and name.endswith(".weight") and not kept
