"""Synthetic checkpoint shapes: named presets, per-architecture defaults, and sizing a shape to a byte target."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3", "qwen3_5_moe")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
EXPERT_FORMATS = ("dtype", "int4")  # routed experts in the checkpoint's dtype, or as Kimi K2.5 ships them
INT4_GROUP_SIZE = 32  # Kimi K2.5's
INT4_BYTES_PER_PARAM = 0.5 + 2 / INT4_GROUP_SIZE  # a nibble, and a bfloat16 scale per group


@dataclass(frozen=True)
class SynthShape:
    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    vocab_size: int  # asked of the tokenizer trainer; the checkpoint records the size it reached
    dense_layers: int = 0  # deepseek_v3: the first layers have a dense MLP instead of experts
    shared_experts: int = 0  # deepseek_v3, qwen3_5_moe: experts every token goes through, besides its top-k

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)} but got {self.arch!r}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            minimum = 0 if field.name in ("dense_layers", "shared_experts") else 1
            if field.name != "arch" and (not isinstance(value, int) or value < minimum):
                raise ValueError(f"{field.name} must be an integer >= {minimum} but got {value!r}")
        if self.arch != "deepseek_v3" and self.dense_layers:
            raise ValueError("dense_layers are deepseek_v3's")
        if self.arch not in ("deepseek_v3", "qwen3_5_moe") and self.shared_experts:
            raise ValueError("shared_experts are deepseek_v3's and qwen3_5_moe's")
        if self.arch == "qwen3_5_moe" and (self.head_dim % 8 or self.num_heads % 2):
            raise ValueError("qwen3_5_moe needs a head_dim divisible by 8 and an even num_heads")
        if self.arch == "deepseek_v3" and (self.head_dim % 2 or self.num_kv_heads != self.num_heads):
            raise ValueError("deepseek_v3 needs an even head_dim and num_kv_heads equal to num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads {self.num_kv_heads} must divide num_heads {self.num_heads}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")

    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    def latent_dims(self) -> dict[str, int]:
        """deepseek_v3's attention dims, in DeepSeek-V3's and Kimi K2's proportions to a head_dim of 128."""
        d = self.head_dim
        return {"q_lora_rank": 12 * d, "kv_lora_rank": 4 * d, "qk_nope_head_dim": d, "qk_rope_head_dim": d // 2,
                "v_head_dim": d}  # fmt: skip

    def delta_net_dims(self) -> dict[str, int]:
        """qwen3_5_moe's linear-attention dims, in Qwen3.5-397B-A17B's proportions to its attention (32 heads of
        256: 16 key heads and 64 value heads of 128)."""
        d = self.head_dim // 2
        return {"linear_num_key_heads": self.num_heads // 2, "linear_num_value_heads": 2 * self.num_heads,
                "linear_key_head_dim": d, "linear_value_head_dim": d, "linear_conv_kernel_dim": 4}  # fmt: skip

    def is_linear(self, layer: int) -> bool:
        """qwen3_5_moe: every fourth layer is full attention, the others Gated DeltaNet."""
        return self.arch == "qwen3_5_moe" and (layer + 1) % 4 != 0

    def dense_intermediate_size(self) -> int:
        """deepseek_v3's dense layers: DeepSeek-V3's 18432 to its experts' 2048."""
        return 9 * self.moe_intermediate_size

    def layer_params(self, layer: int) -> int:
        h, d = self.hidden_size, self.head_dim
        if self.arch == "deepseek_v3":
            m, heads = self.latent_dims(), self.num_heads
            q_dim = heads * (m["qk_nope_head_dim"] + m["qk_rope_head_dim"])
            attention = (
                (h + 1 + q_dim) * m["q_lora_rank"]
                + (m["kv_lora_rank"] + m["qk_rope_head_dim"]) * h
                + m["kv_lora_rank"] * (1 + heads * (m["qk_nope_head_dim"] + m["v_head_dim"]))
                + h * heads * m["v_head_dim"]
            )
            if layer < self.dense_layers:
                return attention + 2 * h + 3 * h * self.dense_intermediate_size()
            experts = self.num_experts * (h + 1 + self.expert_params()) + self.shared_experts * self.expert_params()
            return attention + 2 * h + experts
        if self.arch == "qwen3_5_moe":
            m = self.delta_net_dims()
            if self.is_linear(layer):
                key = m["linear_num_key_heads"] * m["linear_key_head_dim"]
                value = m["linear_num_value_heads"] * m["linear_value_head_dim"]
                channels, heads = 2 * key + value, m["linear_num_value_heads"]
                attention = (channels + value + 2 * heads) * h + channels * 4 + 2 * heads + m["linear_value_head_dim"]
                attention += value * h
            else:
                attention = 3 * h * self.num_heads * d + 2 * h * self.num_kv_heads * d + 2 * d
            experts = self.num_experts * (h + self.expert_params()) + self.shared_experts * self.expert_params() + h
            return attention + 2 * h + experts
        attention = 2 * h * self.num_heads * d + 2 * h * self.num_kv_heads * d
        norms = 2 * h + (2 * d if self.arch == "qwen3_moe" else 0)
        return attention + norms + self.num_experts * h + self.num_experts * self.expert_params()

    def total_params(self) -> int:
        layers = sum(self.layer_params(i) for i in range(self.num_layers))
        return 2 * self.vocab_size * self.hidden_size + self.hidden_size + layers

    def layer_bytes(self, layer: int, dtype: str, experts: str = "dtype") -> int:
        """A layer's stored bytes: every tensor in ``dtype``, routed experts int4 if ``experts`` says so."""
        itemsize = DTYPE_BYTES[dtype]
        routed = self.num_experts * self.expert_params() if self.is_moe(layer) and experts == "int4" else 0
        return (self.layer_params(layer) - routed) * itemsize + round(routed * INT4_BYTES_PER_PARAM)

    def total_bytes(self, dtype: str, experts: str = "dtype") -> int:
        layers = sum(self.layer_bytes(i, dtype, experts) for i in range(self.num_layers))
        return (2 * self.vocab_size * self.hidden_size + self.hidden_size) * DTYPE_BYTES[dtype] + layers

    def is_moe(self, layer: int) -> bool:
        return layer >= self.dense_layers


PRESETS = {
    "tiny": SynthShape("qwen3_moe", 64, 2, 4, 2, 16, 8, 2, 32, 512),
    # Qwen3-30B-A3B's 1/16 of experts active; 782 MiB, twice the quickstart's budget, so experts really stream
    "quickstart": SynthShape("qwen3_moe", 512, 8, 8, 4, 64, 64, 4, 512, 1024),
}

# The shapes ``--size`` scales by depth: real proportions (Qwen3-30B-A3B's 1/16 of experts active, Mixtral's
# 8 experts top-2) at a width whose experts are a few MiB, so a checkpoint of a few GiB has tens of layers.
SIZED_DEFAULTS = {
    "qwen3_moe": SynthShape("qwen3_moe", 1024, 1, 16, 4, 64, 64, 4, 768, 1024),
    "mixtral": SynthShape("mixtral", 1024, 1, 16, 4, 64, 8, 2, 2816, 1024),
    # Kimi K2.5's proportions (384 experts, top-8, one shared expert, the first layer dense, latent attention)
    "deepseek_v3": SynthShape("deepseek_v3", 1024, 1, 8, 8, 64, 384, 8, 256, 1024, dense_layers=1, shared_experts=1),
    # Qwen3.5-397B-A17B's at a quarter of its width (512 experts, top-10, a shared expert; 3 Gated DeltaNet layers
    # to each gated attention layer, 8 query heads to 2 KV heads)
    "qwen3_5_moe": SynthShape("qwen3_5_moe", 1024, 1, 8, 2, 64, 512, 10, 256, 1024, shared_experts=1),
}


def sized_shape(arch: str, size_bytes: int, dtype: str, experts: str = "dtype", **overrides: int) -> SynthShape:
    """The arch's default shape (with ``overrides``) deepened to the most layers that fit in ``size_bytes``
    (``experts``: see ``EXPERT_FORMATS``)."""
    if arch not in SIZED_DEFAULTS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)} but got {arch!r}")
    if "num_layers" in overrides:
        raise ValueError("give either a size or num_layers, not both: the size sets the depth")
    base = dataclasses.replace(SIZED_DEFAULTS[arch], **overrides)
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"experts must be one of {', '.join(EXPERT_FORMATS)} but got {experts!r}")
    first = dataclasses.replace(base, num_layers=base.dense_layers + 1)  # the first layer with experts
    smallest = first.total_bytes(dtype, experts)
    if smallest > size_bytes:
        raise ValueError(f"size {size_bytes} bytes is below one MoE layer of this shape ({smallest} bytes at {dtype})")
    more = (size_bytes - smallest) // base.layer_bytes(base.dense_layers, dtype, experts)
    return dataclasses.replace(base, num_layers=first.num_layers + int(more))
