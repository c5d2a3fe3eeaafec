"""A MoE layer's routed experts for one decode token, in one compiled call.

``kernels.matmul`` three times an expert pays Python's dispatch and a parallel region's start per matrix; at
decode a layer's experts are a few megabytes that one thread cannot stream at memory speed. ``routed_experts``
takes every expert of the token at once: the gate and up rows of all of them, split over the kernel threads;
SwiGLU; then the down rows, each output row summing its experts' contributions in the order given, weighted by
their routing weights. Each output element is computed by one thread in a fixed order, so the result does not
depend on the thread count, nor on where an expert's bytes are (a cache slot, a read buffer, a memory map): the
kernel reads them through their addresses.

Formats: ``bf16``, ``fp16``, ``int8``, ``int4`` and ``int4_bf16``, every expert the same. ``supported`` says
whether a set of experts qualifies; anything else goes through ``expert_mlp``.
"""

from __future__ import annotations

import numpy as np
from numba import carray, get_num_threads, njit, prange, types
from numba.extending import intrinsic

from engine.compute.int4_kernel import int4_rows
from engine.compute.int8_activations import int4_rows_int8, quantize_activations
from engine.compute.kernels import FASTMATH, THREAD_CHOICE, bf16_dot, f16_dot, int8_dot
from engine.compute.prefetch import AHEAD, prefetch_range
from engine.formats.expert_layout import ExpertData, PackedExpert

_FORMATS = {"bf16": 0, "fp16": 1, "int8": 2, "int4": 3, "int4_bf16": 4}
_ROWS = 32  # rows per parallel job


def supported(experts: list[ExpertData]) -> bool:
    """Whether ``routed_experts`` can run these experts: packed, in one of its formats, all alike."""
    if not experts or not all(isinstance(e, PackedExpert) for e in experts):
        return False
    first = experts[0].kind
    return experts[0].format in _FORMATS and all(e.kind == first for e in experts)


def routed_experts(
    x: np.ndarray, experts: list[PackedExpert], weights: np.ndarray, int8_activations: bool = False
) -> np.ndarray:
    """sum_e weights[e] * expert_e(x) for one token ``x`` [H] float32: float32 [H]. ``int8_activations``: int4
    experts multiply x (and their SwiGLU's output) rounded to int8 (``engine.compute.int8_activations``)."""
    down = experts[0].down
    hidden, inter = down.shape
    addresses = np.array([e.addresses for e in experts], np.int64)
    fmt = _FORMATS[down.format]
    out = np.empty(hidden, np.float32)
    args = (fmt, down.group_size, int8_activations, x, addresses, np.asarray(weights, np.float32), inter, out)
    key = ("routed", down.format, int8_activations, len(experts), down.shape, get_num_threads())
    THREAD_CHOICE.run(key, _routed, args)
    return out


def _pointer_intrinsic(element: types.Type):
    @intrinsic
    def pointer(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return types.CPointer(element)(types.int64), codegen

    return pointer


_u16 = _pointer_intrinsic(types.uint16)
_i16 = _pointer_intrinsic(types.int16)
_u8 = _pointer_intrinsic(types.uint8)
_i8 = _pointer_intrinsic(types.int8)
_f32 = _pointer_intrinsic(types.float32)


@njit(fastmath=FASTMATH, cache=True)
def _dot(fmt, x, data, scales, row, cols):
    """Row ``row`` of a bf16, fp16 or int8 [rows, cols] matrix at ``data`` (and ``scales``) times x."""
    if fmt == 0:
        return bf16_dot(x, carray(_u16(data + row * cols * 2), cols))
    if fmt == 1:
        return f16_dot(x, carray(_u16(data + row * cols * 2), cols))
    return int8_dot(x, carray(_i8(data + row * cols), cols)) * carray(_f32(scales + row * 4), 1)[0]


@njit(fastmath=FASTMATH, cache=True)
def _rows(fmt, group, x, floats, ints, data, scales, rows, cols, first, last, y):
    """y[r - first] = row r of a [rows, cols] matrix at ``data`` (and ``scales``) times x, for r in [first, last);
    int4 reads x as ``_int4_inputs`` gives it."""
    if fmt == 3:
        w4 = carray(_u8(data), (rows, cols // 2))
        _int4_rows(floats, ints, w4, carray(_u16(scales), (rows, cols // group)), first, last, y)
    elif fmt == 4:
        w4 = carray(_u8(data), (rows, cols // 2))
        _int4_rows(floats, ints, w4, carray(_i16(scales), (rows, cols // group)), first, last, y)
    else:
        row_bytes = cols * (1 if fmt == 2 else 2)
        for r in range(first, last):
            prefetch_range(data + (r + AHEAD) * row_bytes, row_bytes)
            y[r - first] = _dot(fmt, x, data, scales, r, cols)


@njit(cache=True)
def _int4_rows(floats, ints, data, scales, first, last, y):
    if len(ints[0]):
        int4_rows_int8(ints[0], ints[1], ints[2], data, scales, first, last, y)
    else:
        int4_rows(floats[0], floats[1], data, scales, first, last, y)


@njit(cache=True)
def _int4_inputs(fmt, group, int8, xs):
    """What the int4 kernels read of each row of xs [n, k]: its even and odd elements (float32), or, with int8,
    ``quantize_activations``' three arrays; the others empty (as all are for other formats)."""
    n, k = xs.shape
    rounded = fmt >= 3 and int8
    split = fmt >= 3 and not int8
    groups = k // group if rounded else 0
    even = np.empty((n, k // 2 if split else 0), np.float32)
    odd = np.empty_like(even)
    values = np.empty((n, k if rounded else 0), np.int8)
    scales = np.empty((n, groups), np.float32)
    offsets = np.empty((n, groups, 8), np.int32)
    for e in range(n):
        if rounded:
            quantize_activations(xs[e], group, values[e], scales[e], offsets[e])
        elif split:
            even[e] = xs[e, 0::2]
            odd[e] = xs[e, 1::2]
    return (even, odd), (values, scales, offsets)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _routed(fmt, group, int8, x, addresses, weights, inter, out):
    n, hidden = len(addresses), len(x)
    (x_even, x_odd), (x_values, x_scales, x_offsets) = _int4_inputs(fmt, group, int8, x.reshape(1, hidden))
    floats, ints = (x_even[0], x_odd[0]), (x_values[0], x_scales[0], x_offsets[0])
    gate_up = np.empty((n, 2, inter), np.float32)
    blocks = (inter + _ROWS - 1) // _ROWS
    for job in prange(n * 2 * blocks):  # gate and up rows apart: one stream of weights per job
        e, part, block = job // (2 * blocks), job // blocks % 2, job % blocks
        first, last = block * _ROWS, min(inter, (block + 1) * _ROWS)
        data, scales = addresses[e, 2 * part], addresses[e, 2 * part + 1]
        _rows(fmt, group, x, floats, ints, data, scales, inter, hidden, first, last, gate_up[e, part, first:last])
    gate, up = gate_up[:, 0], gate_up[:, 1]
    act = gate * np.float32(0.5) * (np.float32(1) + np.tanh(np.float32(0.5) * gate)) * up  # SwiGLU, [n, I]
    (act_even, act_odd), (act_values, act_scales, act_offsets) = _int4_inputs(fmt, group, int8, act)
    down = np.empty((n, hidden), np.float32)
    blocks = (hidden + _ROWS - 1) // _ROWS
    for job in prange(n * blocks):  # an expert's down rows per job (measured faster than all experts per row)
        e, block = job // blocks, job % blocks
        first, last = block * _ROWS, min(hidden, (block + 1) * _ROWS)
        data, scales = addresses[e, 4], addresses[e, 5]
        floats, ints = (act_even[e], act_odd[e]), (act_values[e], act_scales[e], act_offsets[e])
        _rows(fmt, group, act[e], floats, ints, data, scales, hidden, inter, first, last, down[e, first:last])
    for r in range(hidden):  # in the experts' order, whatever the threads
        total = np.float32(0)
        for e in range(n):
            total += weights[e] * down[e, r]
        out[r] = total
