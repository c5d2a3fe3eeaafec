"""A decode token's routed experts in one compiled call (engine.compute.moe_kernel) against the per-expert path."""

from __future__ import annotations

import numpy as np
import pytest

from engine.compute import kernels, moe_kernel
from engine.formats.expert_layout import PackedExpert
from engine.formats.quant import dequantize, quantize

HIDDEN, INTER = 96, 64
FORMATS = ["bf16", "fp16", "int8", "int4", "int4_bf16"]


def experts(format: str, count: int, fused: bool, seed: int = 0) -> list[PackedExpert]:
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int):
        return quantize((rng.standard_normal((rows, cols)) * 0.2).astype(np.float32), format, 32)

    made = []
    for _ in range(count):
        gate_up = (matrix(2 * INTER, HIDDEN),) if fused else (matrix(INTER, HIDDEN), matrix(INTER, HIDDEN))
        made.append(PackedExpert(gate_up, matrix(HIDDEN, INTER), None))
    return made


def reference(x: np.ndarray, chosen: list[PackedExpert], weights: np.ndarray) -> np.ndarray:
    """The weighted sum of SwiGLU experts in float64, from the dequantized matrices."""
    out = np.zeros(HIDDEN)
    for weight, expert in zip(weights, chosen, strict=True):
        gate_up = np.concatenate([dequantize(m) for m in expert.gate_up]).astype(np.float64)
        gate, up = np.split(gate_up @ x, 2)
        out += weight * (dequantize(expert.down).astype(np.float64) @ (gate / (1 + np.exp(-gate)) * up))
    return out


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("fused", [True, False])
def test_routed_experts_match_the_float64_reference(format, fused):
    chosen = experts(format, 3, fused)
    x = np.random.default_rng(1).standard_normal(HIDDEN).astype(np.float32)
    weights = np.array([0.5, 0.3, 0.2], np.float32)
    assert moe_kernel.supported(chosen)
    got = moe_kernel.routed_experts(x, chosen, weights)
    assert got.dtype == np.float32 and got.shape == (HIDDEN,)
    np.testing.assert_allclose(got, reference(x, chosen, weights), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("format", ["int4", "int4_bf16"])
@pytest.mark.parametrize("fused", [True, False])
def test_int8_activations_stay_within_their_rounding(format, fused):
    chosen = experts(format, 3, fused)
    x = np.random.default_rng(1).standard_normal(HIDDEN).astype(np.float32)
    weights = np.array([0.5, 0.3, 0.2], np.float32)
    got = moe_kernel.routed_experts(x, chosen, weights, int8_activations=True)
    want = reference(x, chosen, weights)
    assert not np.allclose(got, moe_kernel.routed_experts(x, chosen, weights), rtol=1e-6, atol=0)  # x was rounded
    assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()  # 1/254 of a group's largest value, at most


@pytest.mark.parametrize(("format", "int8"), [(f, False) for f in FORMATS] + [("int4", True), ("int4_bf16", True)])
def test_thread_count_does_not_change_a_bit(format, int8):
    chosen = experts(format, 4, fused=True, seed=2)
    x = np.random.default_rng(3).standard_normal(HIDDEN).astype(np.float32)
    weights = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    try:
        kernels.set_threads(1)
        one = moe_kernel.routed_experts(x, chosen, weights, int8)
        kernels.set_threads(kernels.max_threads())
        for _ in range(2 * kernels._ThreadChoice.CALLS + 1):  # through the timed choice and after it
            np.testing.assert_array_equal(moe_kernel.routed_experts(x, chosen, weights, int8), one)
    finally:
        kernels.set_threads(kernels.max_threads())


def test_unsupported_experts_go_the_per_expert_way():
    bf16, int8 = experts("bf16", 1, fused=True), experts("int8", 1, fused=True)
    assert not moe_kernel.supported(bf16 + int8)  # mixed formats
    assert not moe_kernel.supported(experts("fp32", 2, fused=True))
    assert not moe_kernel.supported(experts("bf16", 1, fused=True) + experts("bf16", 1, fused=False))
    assert not moe_kernel.supported([])
