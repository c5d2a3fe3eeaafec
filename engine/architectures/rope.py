"""Rotary position embedding (Su et al. 2021): its frequencies, as a checkpoint's config sets them (``spec``'s
``read_rope``), and the rotations the decoder applies."""

from __future__ import annotations

import numpy as np


class Rope:
    """Rotary position embedding (Su et al. 2021), "rotate half" layout as in Hugging Face checkpoints."""

    def __init__(self, inv_freq: np.ndarray, attention_scaling: float = 1.0):
        self.inv_freq = inv_freq.astype(np.float32)  # [D/2]
        self.attention_scaling = attention_scaling

    def tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin tables, each [T, D], for integer ``positions`` [T]."""
        freqs = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        return np.cos(emb) * self.attention_scaling, np.sin(emb) * self.attention_scaling

    @staticmethod
    def apply(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotate ``x`` [heads, T, D] by the tables [T, d]: its first d dims, the rest as they are (d < D under
        a partial rotary factor)."""
        d = cos.shape[-1]
        if d < x.shape[-1]:
            return np.concatenate([Rope.apply(x[..., :d], cos, sin), x[..., d:]], axis=-1)
        half = d // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    @staticmethod
    def apply_interleaved(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotate ``x`` [heads, T, D] whose rotary pairs are adjacent, (x0, x1), (x2, x3), ... (DeepSeek's layout);
        the result has the pairs' first elements, then their second ones (the same for queries and keys, so their
        dot products are those of the interleaved rotation)."""
        half = x.shape[-1] // 2
        cos, sin = cos[..., :half], sin[..., :half]
        even, odd = x[..., 0::2], x[..., 1::2]
        return np.concatenate([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
