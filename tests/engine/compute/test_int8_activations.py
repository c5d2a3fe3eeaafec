"""int4 rows times activations rounded to int8 (engine.compute.int8_activations) against float64 over the same
rounding."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from engine.compute import int8_activations as i8
from engine.compute import kernels
from engine.compute.kernels import _kernel_views
from engine.formats.quant import dequantize, quantize


def rounded(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """x rounded to int8 per group, spelled in numpy: the values in x's order, and each group's scale."""
    groups = x.reshape(-1, group)
    largest = np.abs(groups).max(axis=1)
    scales = (largest / np.float32(127)).astype(np.float32)
    inverse = np.divide(np.float32(127), largest, out=np.zeros_like(largest), where=largest > 0)
    return np.rint(groups * inverse[:, None]).astype(np.int8).reshape(-1), scales


def quantized(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    groups = len(x) // group
    out = np.empty(len(x), np.int8), np.empty(groups, np.float32), np.empty((groups, 8), np.int32)
    i8.quantize_activations(x, group, *out)
    return out


def in_order(values: np.ndarray) -> np.ndarray:
    """The kernel's order (per block of 32: 16 even elements, then 16 odd) back to x's."""
    blocks = values.reshape(-1, 2, 16)
    return np.stack([blocks[:, 0], blocks[:, 1]], axis=2).reshape(-1)


@pytest.mark.parametrize("group", [32, 64, 96])
def test_activations_round_per_group_half_to_even(group):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4 * group) * rng.uniform(0.01, 10)).astype(np.float32)
    x[:group] = 0  # a group of zeros: scale 0, values 0
    x[group] = 2.5 * np.abs(x[group : 2 * group]).max() / 127  # exactly half way between 2 and 3 after scaling
    values, scales, offsets = quantized(x, group)
    want_values, want_scales = rounded(x, group)
    np.testing.assert_array_equal(in_order(values), want_values)
    np.testing.assert_array_equal(scales, want_scales)
    lanes = values.reshape(-1, 8, 4).sum(axis=2, dtype=np.int32).reshape(len(scales), -1, 8).sum(axis=1)
    np.testing.assert_array_equal(offsets, 8 * lanes)
    assert scales[0] == 0 and not values[:group].any()


@pytest.mark.parametrize("format", ["int4", "int4_bf16"])
@pytest.mark.parametrize(("group", "cols"), [(32, 256), (64, 256), (128, 384), (96, 192), (160, 320)])
def test_rows_equal_float64_over_the_rounded_activations(format, group, cols):
    rng = np.random.default_rng(group)
    rows = 7  # odd: the last row runs alone
    p = quantize((rng.standard_normal((rows, cols)) * 0.3).astype(np.float32), format, group)
    x = rng.standard_normal(cols).astype(np.float32)
    values, scales, offsets = quantized(x, group)
    data, packed_scales = _kernel_views(p)
    got = np.full(rows + 2, np.nan, np.float32)
    i8.int4_rows_int8(values, scales, offsets, data, packed_scales, 1, rows, got[1:rows])
    want_values, want_scales = rounded(x, group)
    x_rounded = (want_values.reshape(-1, group) * want_scales[:, None].astype(np.float64)).reshape(-1)
    want = dequantize(p).astype(np.float64) @ x_rounded
    bound = np.abs(dequantize(p)).astype(np.float64) @ np.abs(x_rounded)
    assert np.isnan(got[0]) and np.isnan(got[rows:]).all()  # rows outside [first, last) untouched
    assert (np.abs(got[1:rows] - want[1:]) <= 1e-6 * bound[1:]).all()
    rounding = np.repeat(want_scales.astype(np.float64) / 2, group)  # each element of x moves by at most this
    unrounded = dequantize(p).astype(np.float64) @ x
    assert (np.abs(got[1:rows] - unrounded[1:]) <= np.abs(dequantize(p)[1:]) @ rounding + 1e-6 * bound[1:]).all()


@pytest.mark.parametrize("tokens", [1, 3, 20])  # fused kernel, and BLAS over the rounded values (prefill)
def test_matmul_rounds_activations_alike_for_any_number_of_tokens(tokens):
    rng = np.random.default_rng(tokens)
    p = quantize(rng.standard_normal((40, 128)).astype(np.float32), "int4", 32)
    x = rng.standard_normal((tokens, 128)).astype(np.float32)
    got = kernels.matmul(x, p, int8_activations=True)
    x_rounded = i8.rounded_activations(x, 32)
    for t in range(tokens):
        values, scales = rounded(x[t], 32)
        np.testing.assert_array_equal(x_rounded[t], (values.reshape(-1, 32) * scales[:, None]).reshape(-1))
    x_rounded = x_rounded.astype(np.float64)
    want, bound = x_rounded @ dequantize(p).T, np.abs(x_rounded) @ np.abs(dequantize(p)).T
    assert (np.abs(got - want) <= 1e-6 * bound).all()
    with pytest.raises(ValueError, match="int8 activations need int4 in groups of a multiple of 32, not int8"):
        kernels.matmul(x, quantize(x, "int8"), int8_activations=True)


FEATURES = i8._features()
# The x86 spellings this CPU runs, each compared with the portable one (none elsewhere: the test is skipped)
RUNNABLE = [s for s, runs in (("avx2", "+avx2" in FEATURES), ("vnni", i8._instructions(FEATURES) == "vnni")) if runs]


@pytest.mark.parametrize("spelling", RUNNABLE)
@pytest.mark.parametrize("group", [32, 64])
def test_each_spelling_of_the_integer_products_gives_the_same_bits(group, spelling):
    portable, other = i8.row_dots_int8(2, None, "ir"), i8.row_dots_int8(2, None, spelling)

    @njit
    def both(data, scales, x, x_scales, x_offsets):
        return portable(data, scales, 0, x, x_scales, x_offsets), other(data, scales, 0, x, x_scales, x_offsets)

    rng = np.random.default_rng(5)
    p = quantize(rng.standard_normal((2, 4 * group)).astype(np.float32), "int4", group)
    x = (rng.standard_normal(4 * group) * 100).astype(np.float32)
    one, two = both(*_kernel_views(p), *quantized(x, group))
    assert np.array(one).tobytes() == np.array(two).tobytes()


def test_the_instructions_follow_the_cpu_features():
    assert i8._instructions({"+avx2", "+avxvnni"}) == "vnni"
    assert i8._instructions({"+avx2", "+avx512vnni", "+avx512vl"}) == "vnni"
    assert i8._instructions({"+avx2", "+avx512vnni", "-avx512vl"}) == "avx2"
    assert i8._instructions({"+neon"}) == "ir"


@pytest.mark.parametrize(("group", "expected"), [(32, True), (64, True), (96, True), (16, False), (48, False)])
def test_supported_groups_are_multiples_of_32(group, expected):
    assert i8.supported(group) is expected
