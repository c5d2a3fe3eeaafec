"""A routed expert's MLP, from float32 weights (numpy) or from packed ones (the fused kernels)."""

from __future__ import annotations

import numpy as np

from engine.compute import kernels
from engine.formats.expert_layout import ExpertData, ExpertWeights
from engine.model.layers import silu, swiglu


def expert_mlp(x: np.ndarray, expert: ExpertData, int8_activations: bool = False) -> np.ndarray:
    """One routed expert on x [T, H]: numpy on float32 weights, the fused kernels on packed ones (int4 ones with
    their inputs rounded to int8 under ``int8_activations``)."""
    if isinstance(expert, ExpertWeights):
        return swiglu(x, expert.gate_up, expert.down)
    if len(expert.gate_up) == 2:  # gate and up stored apart: no need to join them
        gate, up = (kernels.matmul(x, part, int8_activations=int8_activations) for part in expert.gate_up)
    else:
        gu = kernels.matmul(x, expert.gate_up[0], int8_activations=int8_activations)  # [T, 2I]
        i = gu.shape[-1] // 2
        gate, up = gu[:, :i], gu[:, i:]
    return kernels.matmul(silu(gate) * up, expert.down, int8_activations=int8_activations)
