"""Synthetic checkpoint shapes: named presets, per-architecture defaults, and sizing a shape to a byte target."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ARCHS = ("qwen3_moe", "mixtral")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


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

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)} but got {self.arch!r}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "arch" and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{field.name} must be a positive integer but got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads {self.num_kv_heads} must divide num_heads {self.num_heads}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")

    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    def layer_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attention = 2 * h * self.num_heads * d + 2 * h * self.num_kv_heads * d
        norms = 2 * h + (2 * d if self.arch == "qwen3_moe" else 0)
        return attention + norms + self.num_experts * h + self.num_experts * self.expert_params()

    def total_params(self) -> int:
        return 2 * self.vocab_size * self.hidden_size + self.hidden_size + self.num_layers * self.layer_params()


PRESETS = {
    "tiny": SynthShape("qwen3_moe", 64, 2, 4, 2, 16, 8, 2, 32, 512),
    "quickstart": SynthShape("qwen3_moe", 512, 8, 8, 4, 64, 32, 4, 512, 1024),
}

# The shapes ``--size`` scales by depth: real proportions (Qwen3-30B-A3B's 1/16 of experts active, Mixtral's
# 8 experts top-2) at a width whose experts are a few MiB, so a checkpoint of a few GiB has tens of layers.
SIZED_DEFAULTS = {
    "qwen3_moe": SynthShape("qwen3_moe", 1024, 1, 16, 4, 64, 64, 4, 768, 1024),
    "mixtral": SynthShape("mixtral", 1024, 1, 16, 4, 64, 8, 2, 2816, 1024),
}


def sized_shape(arch: str, size_bytes: int, dtype: str, **overrides: int) -> SynthShape:
    """The arch's default shape (with ``overrides``) deepened to the most layers that fit in ``size_bytes``."""
    if arch not in SIZED_DEFAULTS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)} but got {arch!r}")
    if "num_layers" in overrides:
        raise ValueError("give either a size or num_layers, not both: the size sets the depth")
    base = dataclasses.replace(SIZED_DEFAULTS[arch], **overrides)
    itemsize = DTYPE_BYTES[dtype]
    fixed = (base.total_params() - base.layer_params()) * itemsize
    layers = (size_bytes - fixed) // (base.layer_params() * itemsize)
    if layers < 1:
        smallest = base.total_params() * itemsize
        raise ValueError(f"size {size_bytes} bytes is below one layer of this shape ({smallest} bytes at {dtype})")
    return dataclasses.replace(base, num_layers=int(layers))
