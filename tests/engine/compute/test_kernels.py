"""Packed formats (engine.formats.quant) and the fused dequantize-and-multiply kernels (engine.compute.kernels)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numba
import numpy as np
import pytest
from numba import njit

from engine.compute import int4_kernel, kernels
from engine.formats.checkpoint import to_float32
from engine.formats.quant import (
    ALIGN,
    ALL_FORMATS,
    PackedMatrix,
    byte_size,
    dequantize,
    from_bytes,
    quantization_error,
    quantize,
    to_bytes,
)


def weights(out: int, cols: int, seed: int = 0) -> np.ndarray:
    """Signed weights of mixed magnitudes per row, with row 1 all zeros."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, cols)).astype(np.float32) * rng.uniform(0.01, 2, (out, 1)).astype(np.float32)
    w[1] = 0
    return w


def assert_same(a: PackedMatrix, b: PackedMatrix) -> None:
    assert (a.format, a.shape, a.group_size) == (b.format, b.shape, b.group_size)
    for x, y in ((a.data, b.data), (a.scales, b.scales)):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


# --- quantize / dequantize


def test_bf16_checkpoint_bits_dequantize_exactly():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 16, (7, 40), dtype=np.uint16)
    bits[(bits & 0x7F80) == 0x7F80] = 0x3F80  # no inf/nan: checkpoints hold finite weights
    p = from_bytes(bits.view(np.uint8).reshape(-1), "bf16", bits.shape)
    w = dequantize(p)
    np.testing.assert_array_equal(w, to_float32(bits.view(np.uint8).reshape(-1), "BF16").reshape(bits.shape))
    np.testing.assert_array_equal(quantize(w, "bf16").data, bits)


@pytest.mark.parametrize(
    ("fp32_bits", "bf16_bits"),
    [
        (0x3F808000, 0x3F80),  # halfway, lower neighbour even: stays
        (0x3F818000, 0x3F82),  # halfway, lower neighbour odd: rounds up to even
        (0x3F808001, 0x3F81),  # above halfway
        (0x3F807FFF, 0x3F80),  # below halfway
        (0xBF818000, 0xBF82),  # the sign does not change the rounding
    ],
)
def test_bf16_rounds_to_nearest_even(fp32_bits, bf16_bits):
    w = np.array([[fp32_bits]], np.uint32).view(np.float32)
    assert quantize(w, "bf16").data[0, 0] == bf16_bits


def test_fp16_is_numpy_rounding():
    w = weights(4, 32)
    np.testing.assert_array_equal(dequantize(quantize(w, "fp16")), w.astype(np.float16).astype(np.float32))


def test_int8_error_within_half_a_step():
    w = weights(9, 70)
    p = quantize(w, "int8")
    assert p.data.dtype == np.int8 and p.scales.shape == (9,)
    np.testing.assert_allclose(p.scales, np.abs(w).max(axis=1) / 127, rtol=1e-7)
    np.testing.assert_array_equal(np.abs(p.data).max(axis=1)[p.scales > 0], 127)
    error = np.abs(w - dequantize(p))
    assert (error <= p.scales[:, None] / 2 * (1 + 1e-6)).all()
    np.testing.assert_array_equal(dequantize(p)[1], 0)


@pytest.mark.parametrize("group_size", [2, 32, 64])
def test_int4_error_within_half_a_step(group_size):
    w = weights(6, 128)
    p = quantize(w, "int4", group_size)
    assert p.data.shape == (6, 64) and p.scales.dtype == np.float16 and p.scales.shape == (6, 128 // group_size)
    scales = np.repeat(p.scales.astype(np.float32), group_size, axis=1)
    error = np.abs(w - dequantize(p))
    assert (error <= scales / 2 * (1 + 1e-6)).all()
    np.testing.assert_array_equal(dequantize(p)[1], 0)


def test_int4_layout_low_nibble_first():
    w = np.array([[-7, 7, 1, 0], [0, 0, 0, 0]], np.float32)
    p = quantize(w, "int4", group_size=4)
    np.testing.assert_array_equal(p.scales, np.array([[1], [0]], np.float16))
    assert p.data.tolist() == [[(-7 + 8) | (7 + 8) << 4, (1 + 8) | (0 + 8) << 4], [0x88, 0x88]]
    np.testing.assert_array_equal(dequantize(p), w)


def test_int4_quantizes_against_the_float16_scale():
    s32 = np.float32(0.1) / np.float32(7)
    s16 = np.float32(np.float16(s32))
    w = np.array([[0.1, 2.5 * (s16 + s32) / 2]], np.float32)  # 2.5 steps of one scale is < 2.5 of the other
    assert np.rint(w[0, 1] / s16) != np.rint(w[0, 1] / s32)
    p = quantize(w, "int4", group_size=2)
    assert p.scales[0, 0] == s16
    np.testing.assert_array_equal(dequantize(p), s16 * np.rint(w / s16))


def test_quantization_error():
    w = weights(5, 64)
    assert quantization_error(w, quantize(w, "fp32")) == {"max_abs": 0.0, "rel_fro": 0.0}
    errors = {f: quantization_error(w, quantize(w, f, 32)) for f in ("fp16", "bf16", "int8", "int4")}
    assert 0 < errors["fp16"]["rel_fro"] < errors["bf16"]["rel_fro"] < errors["int8"]["rel_fro"] < 0.01
    assert 0.01 < errors["int4"]["rel_fro"] < 0.2
    p = quantize(w, "int8")
    assert errors["int8"]["max_abs"] == pytest.approx(np.abs(w - dequantize(p)).max())
    assert quantization_error(np.zeros((2, 4), np.float32), quantize(np.zeros((2, 4), np.float32), "int4", 2)) == {
        "max_abs": 0.0,
        "rel_fro": 0.0,
    }


# --- byte layout


@pytest.mark.parametrize("format", ALL_FORMATS)
def test_bytes_round_trip_as_a_view(format):
    p = quantize(weights(5, 96), format, group_size=32)
    raw = to_bytes(p)
    assert len(raw) == byte_size(format, (5, 96), 32) == -(-p.data.nbytes // ALIGN) * ALIGN + p.scales.nbytes
    buffer = np.frombuffer(raw, np.uint8).copy()
    q = from_bytes(buffer, format, (5, 96), 32)
    assert_same(q, p)
    assert np.shares_memory(q.data, buffer) and (q.scales.size == 0 or np.shares_memory(q.scales, buffer))
    assert q.nbytes == p.nbytes


def test_scales_start_16_byte_aligned():
    raw = to_bytes(quantize(weights(3, 10), "int8"))  # 30 data bytes, padded to 32
    assert len(raw) == 32 + 3 * 4
    assert raw[30:32] == b"\0\0"


# --- kernels


def assert_matches_float64(y: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """|y - x @ w.T| <= 1e-6 * sqrt(in) * (|x| @ |w|.T): float32 accumulation error, with a 16x margin."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    bound = 1e-6 * np.sqrt(x.shape[1]) * (np.abs(x64) @ np.abs(w64).T)
    assert y.dtype == np.float32 and y.shape == (x.shape[0], w.shape[0])
    assert (np.abs(y - x64 @ w64.T) <= bound).all()


# [out, in, group size]; groups of 20 and 2 leave int4 bytes past its vector steps of 8 (groups of 16 values)
SHAPES = [(5, 128, 32), (37, 96, 32), (64, 256, 64), (300, 64, 64), (9, 256, 128), (7, 80, 20), (3, 48, 2)]


def test_token_counts_cover_both_paths():
    assert all(3 < tokens <= 17 for tokens in kernels.BLAS_TOKENS.values())


@pytest.mark.parametrize("format", ALL_FORMATS)
@pytest.mark.parametrize("tokens", [1, 3, 17, 300])  # 1 and 3: fused kernels; 17 and 300: BLAS
@pytest.mark.parametrize(("out", "cols", "group_size"), SHAPES)
def test_matmul_matches_the_reference(format, tokens, out, cols, group_size):
    p = quantize(weights(out, cols), format, group_size)
    x = np.random.default_rng(1).standard_normal((tokens, cols)).astype(np.float32)
    y = kernels.matmul(x, p)
    assert_matches_float64(y, x, dequantize(p))
    np.testing.assert_array_equal(y[:, 1], 0)  # the zero row


@njit
def _int4_rows_counted(x_even, x_odd, data, scales, y):
    for r in range(0, data.shape[0], 2):
        y[r], y[r + 1] = int4_kernel._two_any(data, scales, r, x_even, x_odd)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_groups_unrolled_give_the_bits_of_the_counted_loop(group_size):
    p = quantize(weights(6, 512), "int4", group_size)
    x = np.random.default_rng(4).standard_normal(512).astype(np.float32)
    x_even, x_odd, scales = x[0::2].copy(), x[1::2].copy(), p.scales.view(np.uint16)
    unrolled, counted = np.empty(6, np.float32), np.empty(6, np.float32)
    int4_kernel.int4_rows(x_even, x_odd, p.data, scales, 0, 6, unrolled)
    _int4_rows_counted(x_even, x_odd, p.data, scales, counted)
    np.testing.assert_array_equal(unrolled, counted)


@pytest.mark.parametrize("format", ["fp32", "bf16", "fp16"])
def test_decode_equals_numpy_to_float32_rounding(format):
    p = quantize(weights(48, 512), format)
    x = np.random.default_rng(2).standard_normal((1, 512)).astype(np.float32)
    np.testing.assert_allclose(kernels.matmul(x, p), x @ dequantize(p).T, rtol=1e-5, atol=1e-6)


def test_matmul_writes_into_out():
    p = quantize(weights(8, 64), "int4", 32)
    x = np.ones((2, 64), np.float32)
    out = np.full((2, 8), np.nan, np.float32)
    assert kernels.matmul(x, p, out) is out
    np.testing.assert_array_equal(out, kernels.matmul(x, p))


@pytest.mark.parametrize("format", ALL_FORMATS)
def test_thread_count_does_not_change_results(format):
    p = quantize(weights(40, 256), format)
    x = np.random.default_rng(3).standard_normal((3, 256)).astype(np.float32)
    try:
        kernels.set_threads(1)
        one = kernels.matmul(x, p)
        kernels.set_threads(kernels.max_threads())
        np.testing.assert_array_equal(kernels.matmul(x, p), one)
    finally:
        kernels.set_threads(kernels.max_threads())


# --- bad arguments


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: quantize(weights(2, 8), "int3"), "format"),
        (lambda: quantize(weights(2, 8).astype(np.float64), "int8"), "w"),
        (lambda: quantize(np.zeros(8, np.float32), "int8"), "w"),
        (lambda: quantize(np.full((2, 8), np.inf, np.float32), "bf16"), "w"),
        (lambda: quantize(weights(2, 8), "int4", group_size=3), "group_size"),
        (lambda: quantize(weights(2, 8), "int4", group_size=16), "group_size"),
        (lambda: quantize(weights(2, 8), "int4", group_size=0), "group_size"),
        (lambda: byte_size("fp16", (0, 8)), "shape"),
        (lambda: from_bytes(np.zeros(31, np.uint8), "fp16", (2, 8)), "buffer"),
        (lambda: from_bytes(np.zeros(32, np.uint16), "fp16", (2, 8)), "buffer"),
        (lambda: from_bytes(np.zeros(64, np.uint8)[::2], "fp16", (2, 8)), "buffer"),
        (lambda: kernels.matmul(np.zeros((1, 9), np.float32), quantize(weights(2, 8), "int8")), "x"),
        (lambda: kernels.matmul(np.zeros((1, 8), np.float64), quantize(weights(2, 8), "int8")), "x"),
        (lambda: kernels.matmul(np.zeros(8, np.float32), quantize(weights(2, 8), "int8")), "x"),
        (
            lambda: kernels.matmul(np.zeros((1, 8), np.float32), quantize(weights(2, 8), "int8"), np.zeros((1, 3))),
            "out",
        ),
        (lambda: kernels.set_threads(0), "threads"),
        (lambda: kernels.set_threads(kernels.max_threads() + 1), "threads"),
    ],
)
def test_bad_arguments_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        call()


def test_kernels_vectorise_512_bits_wide_where_the_cpu_can() -> None:
    import llvmlite.binding

    host = llvmlite.binding.get_host_cpu_features().flatten()
    if "+avx512f" not in host.split(",") or os.environ.get("NUMBA_CPU_FEATURES"):
        pytest.skip("no AVX-512 here, or the user chose the features")
    assert host + ",-prefer-256-bit" == kernels.numba.config.CPU_FEATURES


def test_the_users_numba_cpu_features_are_kept() -> None:
    code = "import engine, numba; print(numba.config.CPU_FEATURES)"
    env = {**os.environ, "NUMBA_CPU_FEATURES": "+sse2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "+sse2"


def test_each_shape_keeps_the_faster_thread_count_with_the_same_results():
    p = quantize(weights(48, 256), "bf16")
    x = np.random.default_rng(4).standard_normal((1, 256)).astype(np.float32)
    threads = kernels.max_threads()
    key = ("bf16", False, p.shape, 1, threads)
    kernels.THREAD_CHOICE.ways.pop(key, None)
    results = [kernels.matmul(x, p) for _ in range(2 * kernels._ThreadChoice.CALLS + 2)]
    for result in results:
        np.testing.assert_array_equal(result, results[0])
    if threads > 1:
        assert kernels.THREAD_CHOICE.serial(key) is not None


@pytest.mark.skipif(kernels.max_threads() < 2, reason="one thread: no choice to make")
def test_a_thread_choice_is_revisited_when_the_other_way_becomes_faster():
    choice = kernels._ThreadChoice()
    slow = {"serial": True}

    def kernel() -> None:
        if (numba.get_num_threads() == 1) == slow["serial"]:
            time.sleep(0.002)

    key = ("test", kernels.max_threads())
    for _ in range(2 * choice.CALLS):
        choice.run(key, kernel, ())
    assert choice.serial(key) is False
    slow["serial"] = False  # the machine changed: now the parallel calls are the slow ones
    for _ in range(choice.WINDOW * choice.RECHECK):  # until the fast one-thread rechecks fill half its window
        choice.run(key, kernel, ())
    assert choice.serial(key) is True
