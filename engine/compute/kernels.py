"""Fused dequantize-and-multiply: ``matmul(x, p)`` = x @ dequantize(p).T without the dequantized matrix.

Decode (fewer than ``BLAS_TOKENS[format]`` tokens) runs numba kernels that split the output rows between threads
and decode each weight once per token, accumulating in float32. Prefill dequantizes blocks of ``BLAS_ROWS`` rows
into a float32 scratch on one thread and multiplies them with BLAS; ``fp32`` always uses BLAS. ``set_threads``
sets the kernels' threads; BLAS keeps its own. A matrix too small to gain from splitting runs on one thread
(``_ThreadChoice``: chosen per shape by timing the calls).

Sums are reordered and fused into FMAs so that they vectorise, so results differ from numpy's by float32 rounding:
|matmul(x, p) - x @ dequantize(p).T| <= 1e-6 * sqrt(in) * (|x| @ |dequantize(p)|.T), against float64 (tested).

numba's OpenMP workers spin after each parallel kernel (``engine.numba_config`` sets how long), which would take
the cores from BLAS threads started right after them (measured: a decode layer 10x slower), so the decoder runs
BLAS on the calling thread (``model/decoder.py``), and the dequantizing of the prefill path is single-threaded.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numba
import numpy as np
from numba import njit, prange

from engine.compute.float_bits import bf16_to_f32, f16_to_f32, scale_to_f32
from engine.compute.int4_kernel import int4_rows
from engine.compute.int8_activations import int4_rows_int8, quantize_activations, rounded_activations
from engine.compute.int8_activations import supported as int8_supported
from engine.formats.quant import FP8_VALUES, INT4_FORMATS, INT4_OFFSET, PackedMatrix

# From this many tokens on (measured crossovers on a 2-core Xeon), dequantizing into a scratch and multiplying
# with BLAS beats the fused kernels, which decode every weight once per token.
BLAS_TOKENS = {"bf16": 16, "fp16": 16, "int8": 16, "int4": 8, "int4_bf16": 8, "fp8": 16}
BLAS_ROWS = 256  # rows dequantized per BLAS call: the scratch stays in L2
FASTMATH = {"reassoc", "contract"}
_ROW_BLOCK = 16


def max_threads() -> int:
    return numba.config.NUMBA_NUM_THREADS


def set_threads(threads: int) -> None:
    """Threads for the numba kernels, from 1 to ``max_threads()``; numba keeps this per calling thread."""
    if not isinstance(threads, int) or not 1 <= threads <= max_threads():
        raise ValueError(f"threads must be an integer from 1 to {max_threads()}, got {threads!r}")
    numba.set_num_threads(threads)


def matmul(x: np.ndarray, p: PackedMatrix, out: np.ndarray | None = None, int8_activations: bool = False) -> np.ndarray:
    """x [T, in] float32 @ dequantize(p).T: float32 [T, out], written into ``out`` when given. ``int8_activations``
    (int4 only): x rounded to int8 per group first (``engine.compute.int8_activations``), for every T."""
    rows, cols = p.shape
    if int8_activations and (p.format not in INT4_FORMATS or not int8_supported(p.group_size)):
        raise ValueError(f"int8 activations need int4 in groups of a multiple of 32, not {p.format} g{p.group_size}")
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != cols:
        raise ValueError(f"x must be a float32 [tokens, {cols}] array, got {_describe(x)}")
    tokens = x.shape[0]
    if out is None:
        out = np.empty((tokens, rows), np.float32)
    elif out.dtype != np.float32 or out.shape != (tokens, rows) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous float32 [{tokens}, {rows}] array, got {_describe(out)}")
    x = np.ascontiguousarray(x)
    data, scales = _kernel_views(p)
    if p.format == "fp32":
        np.matmul(x, p.data.T, out=out)
    elif tokens < BLAS_TOKENS[p.format]:
        _fused(p, x, data, scales, out, int8_activations)
    else:
        if int8_activations:
            x = rounded_activations(x, p.group_size)
        scratch = np.empty((min(BLAS_ROWS, rows), cols), np.float32)
        for start in range(0, rows, BLAS_ROWS):
            block = scratch[: min(BLAS_ROWS, rows - start)]
            _DEQUANTIZE[p.format](data, scales, p.group_size, start, block)
            np.matmul(x, block.T, out=out[:, start : start + len(block)])
    return out


class _ThreadChoice:
    """Whether a fused kernel call of a given shape runs faster on one thread than on the ones it was given.

    Starting a parallel region costs tens of microseconds where OpenMP's workers sleep between regions (as they
    must here, see above), which is more than a small matrix saves by being split: measured on a 2-core EPYC,
    a bf16 1536x1024 decode took 64 µs on one thread and 95 on two. Which wins depends on the shape, the machine
    and what else runs (reader threads, another process), so every call is timed: the first calls of each
    (format, shape, tokens, threads) alternate between one thread and all of them, then the faster so far runs,
    and one call in ``RECHECK`` runs the other way, so that a choice made on noisy first calls is revisited (a
    choice fixed after 5 calls of each once kept a decode token's bf16 experts on one thread: 34 ms per token
    against 26). The medians of each way's latest ``WINDOW`` timings decide. Rows are summed on one thread either
    way: the result does not depend on the choice.
    """

    CALLS = 5  # timed calls of each way before the first choice (the first may include compiling)
    RECHECK = 32
    WINDOW = 8

    def __init__(self) -> None:
        self.ways: dict[tuple, _Ways] = {}

    def serial(self, key: tuple) -> bool | None:
        """The way calls of ``key`` run now: on one thread (True), on all of them (False); None before a choice."""
        ways = self.ways.get(key)
        return None if ways is None or len(ways.parallel) < self.CALLS else ways.serial

    def run(self, key: tuple, kernel: Callable[..., None], args: tuple) -> None:
        ways = self.ways.get(key)
        if ways is None:
            ways = self.ways[key] = _Ways(self.WINDOW)
        ways.calls += 1
        choosing = len(ways.parallel) < self.CALLS
        recheck = ways.calls % self.RECHECK == 0
        serial = len(ways.one) <= len(ways.parallel) if choosing else ways.serial != recheck
        began = time.perf_counter()
        if serial:
            _call_with_threads(kernel, args, 1)
        else:
            kernel(*args)
        (ways.one if serial else ways.parallel).append(time.perf_counter() - began)
        if choosing or serial != ways.serial:
            ways.serial = _median(ways.one) < _median(ways.parallel)


class _Ways:
    """One kernel shape's latest timings on one thread and on all, and the way chosen."""

    def __init__(self, window: int) -> None:
        self.one: deque[float] = deque(maxlen=window)
        self.parallel: deque[float] = deque(maxlen=window)
        self.serial = True
        self.calls = 0


def _median(timings: deque[float]) -> float:
    ordered = sorted(timings)
    return ordered[len(ordered) // 2] if ordered else float("inf")


def _call_with_threads(kernel: Callable[..., None], args: tuple, threads: int) -> None:
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(before)


THREAD_CHOICE = _ThreadChoice()


def _fused(
    p: PackedMatrix, x: np.ndarray, data: np.ndarray, scales: np.ndarray, out: np.ndarray, int8_activations: bool
) -> None:
    kernel = _fused_int4_int8 if int8_activations else _FUSED[p.format]
    threads = numba.get_num_threads()
    if threads == 1:
        kernel(x, data, scales, p.group_size, out)
        return
    key = (p.format, int8_activations, p.shape, x.shape[0], threads)
    THREAD_CHOICE.run(key, kernel, (x, data, scales, p.group_size, out))


def _kernel_views(p: PackedMatrix) -> tuple[np.ndarray, np.ndarray]:
    """numba has no float16 or bfloat16 arrays: float16 data and scales go in as their uint16 bits, bfloat16 scales
    as int16 bits (``scale_to_f32`` tells them apart by type)."""
    data = np.ascontiguousarray(p.data.view(np.uint16) if p.format == "fp16" else p.data)
    scales = _SCALE_BITS.get(p.format)
    return data, np.ascontiguousarray(p.scales if scales is None else p.scales.view(scales))


_SCALE_BITS = {"int4": np.uint16, "int4_bf16": np.int16}  # see _kernel_views


@njit(cache=True)
def nibbles(byte):
    """The two int4 values of a byte, low nibble first, as float32.

    uint8 and int8 arithmetic throughout (numba widens integer arithmetic to int64, which vectorises 4x worse).
    """
    low = np.int8(np.int8(byte & np.uint8(15)) - np.int8(INT4_OFFSET))
    high = np.int8(np.int8(byte >> np.uint8(4)) - np.int8(INT4_OFFSET))
    return np.float32(low), np.float32(high)


@njit(fastmath=FASTMATH, cache=True)
def bf16_dot(x, w):
    """x · w for float32 x and a row w of bfloat16 bits (uint16)."""
    acc = np.float32(0)
    for k in range(len(w)):
        acc += x[k] * bf16_to_f32(w[k])
    return acc


@njit(fastmath=FASTMATH, cache=True)
def f16_dot(x, w):
    """x · w for float32 x and a row w of float16 bits (uint16)."""
    acc = np.float32(0)
    for k in range(len(w)):
        acc += x[k] * f16_to_f32(w[k])
    return acc


@njit(fastmath=FASTMATH, cache=True)
def int8_dot(x, w):
    """x · w for float32 x and an int8 row w (before its scale)."""
    acc = np.float32(0)
    for k in range(len(w)):
        acc += x[k] * np.float32(w[k])
    return acc


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _fused_bf16(x, data, scales, group_size, y):
    for r in prange(data.shape[0]):
        for t in range(x.shape[0]):
            y[t, r] = bf16_dot(x[t], data[r])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _fused_fp16(x, data, scales, group_size, y):
    for r in prange(data.shape[0]):
        for t in range(x.shape[0]):
            y[t, r] = f16_dot(x[t], data[r])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _fused_int8(x, data, scales, group_size, y):
    for r in prange(data.shape[0]):
        for t in range(x.shape[0]):
            y[t, r] = int8_dot(x[t], data[r]) * scales[r]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _fused_int4(x, data, scales, group_size, y):
    rows = data.shape[0]
    # x split into its even and odd elements, so the low and high nibbles each meet contiguous x
    x_even = np.ascontiguousarray(x[:, 0::2])
    x_odd = np.ascontiguousarray(x[:, 1::2])
    for block in prange((rows + _ROW_BLOCK - 1) // _ROW_BLOCK):
        first, last = block * _ROW_BLOCK, min(rows, (block + 1) * _ROW_BLOCK)
        for t in range(x.shape[0]):
            int4_rows(x_even[t], x_odd[t], data, scales, first, last, y[t, first:last])


@njit(parallel=True, cache=True)
def _fused_int4_int8(x, data, scales, group_size, y):
    tokens, cols = x.shape
    rows, groups = data.shape[0], cols // group_size
    values = np.empty((tokens, cols), np.int8)
    x_scales = np.empty((tokens, groups), np.float32)
    offsets = np.empty((tokens, groups, 8), np.int32)
    for t in range(tokens):
        quantize_activations(x[t], group_size, values[t], x_scales[t], offsets[t])
    for block in prange((rows + _ROW_BLOCK - 1) // _ROW_BLOCK):
        first, last = block * _ROW_BLOCK, min(rows, (block + 1) * _ROW_BLOCK)
        for t in range(tokens):
            int4_rows_int8(values[t], x_scales[t], offsets[t], data, scales, first, last, y[t, first:last])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _fused_fp8(x, data, scales, group_size, y):
    cols = data.shape[1]
    for r in prange(data.shape[0]):
        for t in range(x.shape[0]):
            acc = np.float32(0)
            for block in range(scales.shape[1]):
                part = np.float32(0)
                for k in range(block * group_size, min(cols, (block + 1) * group_size)):
                    part += x[t, k] * FP8_VALUES[data[r, k]]
                acc += part * scales[r // group_size, block]
            y[t, r] = acc


@njit(cache=True)
def _dequantize_bf16(data, scales, group_size, start, w):
    for i in range(w.shape[0]):
        for k in range(w.shape[1]):
            w[i, k] = bf16_to_f32(data[start + i, k])


@njit(cache=True)
def _dequantize_fp16(data, scales, group_size, start, w):
    for i in range(w.shape[0]):
        for k in range(w.shape[1]):
            w[i, k] = f16_to_f32(data[start + i, k])


@njit(cache=True)
def _dequantize_int8(data, scales, group_size, start, w):
    for i in range(w.shape[0]):
        for k in range(w.shape[1]):
            w[i, k] = np.float32(data[start + i, k]) * scales[start + i]


@njit(cache=True)
def _dequantize_int4(data, scales, group_size, start, w):
    pairs = group_size // 2
    for r in range(w.shape[0]):
        for g in range(scales.shape[1]):
            scale = scale_to_f32(scales[start + r, g])
            for i in range(pairs):
                j = g * pairs + i
                low, high = nibbles(data[start + r, j])
                w[r, 2 * j] = low * scale
                w[r, 2 * j + 1] = high * scale


@njit(cache=True)
def _dequantize_fp8(data, scales, group_size, start, w):
    for i in range(w.shape[0]):
        for k in range(w.shape[1]):
            w[i, k] = FP8_VALUES[data[start + i, k]] * scales[(start + i) // group_size, k // group_size]


_FUSED = {
    "bf16": _fused_bf16,
    "fp16": _fused_fp16,
    "int8": _fused_int8,
    "int4": _fused_int4,
    "int4_bf16": _fused_int4,
    "fp8": _fused_fp8,
}
_DEQUANTIZE = {
    "bf16": _dequantize_bf16,
    "fp16": _dequantize_fp16,
    "int8": _dequantize_int8,
    "int4": _dequantize_int4,
    "int4_bf16": _dequantize_int4,
    "fp8": _dequantize_fp8,
}


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__
