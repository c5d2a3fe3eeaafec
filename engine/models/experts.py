"""A routed expert's MLP, from float32 weights (numpy) or from packed ones (the fused kernels)."""

from __future__ import annotations

import numpy as np

from engine import kernels
from engine.expert_layout import ExpertData, ExpertWeights
from engine.models.layers import silu, swiglu


def expert_mlp(x: np.ndarray, expert: ExpertData) -> np.ndarray:
    """One routed expert on x [T, H]: numpy on float32 weights, the fused kernels on packed ones."""
    if isinstance(expert, ExpertWeights):
        return swiglu(x, expert.gate_up, expert.down)
    parts = [kernels.matmul(x, part) for part in expert.gate_up]
    gu = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)  # [T, 2I]
    i = gu.shape[-1] // 2
    return kernels.matmul(silu(gu[:, :i]) * gu[:, i:], expert.down)
