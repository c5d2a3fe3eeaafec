"""Synthetic Hugging Face checkpoints: config.json, sharded safetensors with an index, and a tokenizer.

The weights are random (scaled by 1/sqrt(fan_in) so activations stay O(1)); the files are real, so the
engine and transformers both load them. Tensors are generated and written one at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engine.safetensors_file import SafetensorsWriter

_CORPUS = """\
Mixture-of-experts models route every token to a few experts out of many.
Only the chosen experts' weights are needed, so the rest can stay on the disk.
A streaming engine reads the routed experts from the SSD for each token and keeps hot ones in RAM.
The expert cache holds the experts used most often; the page cache holds what the kernel chose.
Prefetching reads the experts of the next layers before the model asks for them.
A good predictor guesses the next layer's experts from the current hidden state.
Quantization makes each expert smaller, so fewer bytes cross the bus for every token.
The tuner tries cache sizes, prefetch depths and block sizes, and measures tokens per second.
Every trial is logged, and the best configuration is exported for this machine.
The quick brown fox jumps over the lazy dog while the model decodes one token at a time.
"""


@dataclass(frozen=True)
class SynthShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    vocab_size: int  # the tokenizer's size when the checkpoint ships one


PRESETS = {
    "tiny": SynthShape(64, 2, 4, 2, 16, 8, 2, 32, 512),
    "quickstart": SynthShape(512, 8, 8, 4, 64, 32, 4, 512, 1024),
}
DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def synthesize(
    out: str | Path, shape: SynthShape, dtype: str = "bf16", seed: int = 0, shard_bytes: int = 256 << 20
) -> Path:
    """Write a qwen3_moe checkpoint of ``shape`` to ``out``; returns the directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(shape.vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    shape = SynthShape(**{**shape.__dict__, "vocab_size": tokenizer.get_vocab_size()})
    rng = np.random.default_rng(seed)
    tensors = _tensor_specs(shape)
    shards = _split(tensors, shard_bytes, 2 if dtype != "fp32" else 4)
    weight_map = {}
    for n, shard in enumerate(shards):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(out / file, [(name, DTYPES[dtype], dims) for name, dims, _ in shard])
        for name, dims, std in shard:
            values = np.ones(dims, np.float32) if std == 0 else rng.standard_normal(dims, np.float32) * std
            writer.write(name, _encode(values, dtype))
            weight_map[name] = file
        writer.close()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(_config(shape, dtype, tokenizer), indent=2))
    return out


def _tensor_specs(s: SynthShape) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, std) for every tensor; std 0 marks a norm weight (all ones)."""
    h, d, i = s.hidden_size, s.head_dim, s.moe_intermediate_size
    specs = [("model.embed_tokens.weight", (s.vocab_size, h), 1.0)]
    for layer in range(s.num_layers):
        p = f"model.layers.{layer}"
        specs += [
            (f"{p}.input_layernorm.weight", (h,), 0.0),
            (f"{p}.self_attn.q_proj.weight", (s.num_heads * d, h), h**-0.5),
            (f"{p}.self_attn.k_proj.weight", (s.num_kv_heads * d, h), h**-0.5),
            (f"{p}.self_attn.v_proj.weight", (s.num_kv_heads * d, h), h**-0.5),
            (f"{p}.self_attn.o_proj.weight", (h, s.num_heads * d), (s.num_heads * d) ** -0.5),
            (f"{p}.self_attn.q_norm.weight", (d,), 0.0),
            (f"{p}.self_attn.k_norm.weight", (d,), 0.0),
            (f"{p}.post_attention_layernorm.weight", (h,), 0.0),
            (f"{p}.mlp.gate.weight", (s.num_experts, h), 2 * h**-0.5),
        ]
        for e in range(s.num_experts):
            q = f"{p}.mlp.experts.{e}"
            specs += [
                (f"{q}.gate_proj.weight", (i, h), h**-0.5),
                (f"{q}.up_proj.weight", (i, h), h**-0.5),
                (f"{q}.down_proj.weight", (h, i), i**-0.5),
            ]
    specs += [("model.norm.weight", (h,), 0.0), ("lm_head.weight", (s.vocab_size, h), h**-0.5)]
    return specs


def _split(specs: list, shard_bytes: int, itemsize: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec[1])) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _encode(values: np.ndarray, dtype: str) -> memoryview:
    if dtype == "fp32":
        return memoryview(values).cast("B")
    if dtype == "fp16":
        return memoryview(values.astype(np.float16)).cast("B")
    bits = values.view(np.uint32)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))  # round to nearest even
    return memoryview((rounded >> 16).astype(np.uint16)).cast("B")


def _config(s: SynthShape, dtype: str, tokenizer: Tokenizer) -> dict:
    eos = tokenizer.token_to_id("<|endoftext|>")
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.moe_intermediate_size * s.top_k,
        "moe_intermediate_size": s.moe_intermediate_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "num_experts": s.num_experts,
        "num_experts_per_tok": s.top_k,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": None,
        "eos_token_id": eos,
        "torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype],
    }


def _train_tokenizer(vocab_size: int):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    return tokenizer
