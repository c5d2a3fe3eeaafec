"""int4 rows times activations rounded to int8: the kernel of ``activations = "int8"`` (llama.cpp's Q4_0 x Q8_0).

``quantize_activations`` rounds x to int8 per group of the weights (a float32 scale each, max |x| / 127, round
half to even); ``int4_rows_int8`` then multiplies integers: 32 weights at a time, the 16 bytes of a group's
nibbles (low nibbles hold even columns) against x's 32 int8 values, with ``pmaddubsw`` and ``pmaddwd`` on AVX2
(unsigned nibbles times signed x, adjacent products summed to 16 and then 32 bits: exact, as no sum can reach
16 bits' limit), or with one ``vpdpbusd`` where the CPU has VNNI (AVX-VNNI, or AVX-512 VNNI: the same exact sums
added to the group's, 10-15% faster on one thread of a 2-core Zen 4 EPYC), and the nibbles' offset taken off once
per group from x's precomputed sums. Each group's eight 32-bit sums are converted to float once and scaled by the
weight's and x's scales together. Per 16 bytes of a row that is about 13 instructions (AVX2), against about 36 for
the float32 kernel (``int4_kernel``), and no conversion per weight: on a 2-core EPYC, one thread, a 256x4096
matrix in cache, 12.3 GB/s against 6.6 in groups of 32, 15 against 7.2 in groups of 64.

The sums are integers and so exact on any CPU; the float steps are fixed by the IR (a fixed lane-sum tree, no
reassociation), so a row's result does not depend on the CPU, the thread count or the vector width. Where AVX2
is missing (Apple Silicon, say), the same integer products are spelled in plain vector IR: identical results,
speed unmeasured. Groups must be a multiple of 32 weights (``supported``); 32, 64 and 128 are unrolled.

What rounding x costs: the relative error of a row's result grows from float32's ~1e-7 to ~5e-3 (x's rounding,
1/254 of each group's largest value). The knob changes the output, and the tuner's quality constraints judge it.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import binding, ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.compute.float_bits import scale_widener
from engine.compute.int4_kernel import _fma, _load, _splat, _sum_lanes
from engine.compute.prefetch import AHEAD, prefetch_rows
from engine.formats.quant import INT4_OFFSET

BLOCK = 32  # weights per vector step: 16 packed bytes, one 256-bit vector of int8 x
_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_BYTES, _X = ir.VectorType(_I8, BLOCK // 2), ir.VectorType(_I8, BLOCK)
_PAIRS, _SUMS, _FLOATS = ir.VectorType(_I16, BLOCK // 2), ir.VectorType(_I32, 8), ir.VectorType(_F32, 8)


def supported(group_size: int) -> bool:
    """Whether int4 in groups of ``group_size`` can run with int8 activations."""
    return group_size > 0 and group_size % BLOCK == 0


def rounded_activations(x: np.ndarray, group_size: int) -> np.ndarray:
    """x [T, in] float32 as ``quantize_activations`` rounds it, back in float32 and x's order (value times scale):
    what BLAS multiplies where the kernels would take the int8 values (prefill)."""
    groups = x.reshape(x.shape[0], -1, group_size)
    largest = np.abs(groups).max(axis=2, keepdims=True)
    inverse = np.divide(np.float32(127), largest, out=np.zeros_like(largest), where=largest > 0)
    return (np.rint(groups * inverse) * (largest / np.float32(127))).reshape(x.shape)


@njit(cache=True)
def quantize_activations(x, group_size, values, scales, offsets):
    """x (float32, its length a multiple of ``group_size``) rounded to int8 per group, as ``int4_rows_int8`` reads
    it, written into ``values`` (int8, each block of 32 as its 16 even then its 16 odd elements), ``scales`` (each
    group's, float32) and ``offsets`` ([groups, 8] int32: ``INT4_OFFSET`` times the sums of each group's values,
    in the eight lanes the kernel's sums fall in)."""
    offsets[:] = 0
    for g in range(len(scales)):
        largest = np.float32(0)
        for k in range(g * group_size, (g + 1) * group_size):
            largest = max(largest, abs(x[k]))
        inverse = np.float32(127) / largest if largest > 0 else np.float32(0)
        scales[g] = largest / np.float32(127)
        for k in range(g * group_size, (g + 1) * group_size):
            value = np.int8(np.rint(x[k] * inverse))
            j = k % BLOCK
            at = k - j + j % 2 * (BLOCK // 2) + j // 2
            values[at] = value
            offsets[g, at % BLOCK // 4] += INT4_OFFSET * np.int32(value)


@njit(cache=True)
def int4_rows_int8(x, x_scales, x_offsets, data, scales, first, last, y):
    """y[r - first] = row r of an int4 matrix (``data`` [rows, in / 2] uint8, ``scales`` [rows, groups] as
    ``scale_to_f32`` reads them, both C-contiguous) times x as ``quantize_activations`` gives it."""
    steps = data.shape[1] // scales.shape[1] // (BLOCK // 2)
    r = first
    while r + 1 < last:
        if steps == 1:
            a, b = _two_1(data, scales, r, x, x_scales, x_offsets)
        elif steps == 2:
            a, b = _two_2(data, scales, r, x, x_scales, x_offsets)
        elif steps == 4:
            a, b = _two_4(data, scales, r, x, x_scales, x_offsets)
        else:
            a, b = _two_any(data, scales, r, x, x_scales, x_offsets)
        y[r - first], y[r + 1 - first] = a, b
        r += 2
    if r < last:
        (y[r - first],) = _one_any(data, scales, r, x, x_scales, x_offsets)


def _features() -> set[str]:
    """The CPU features numba compiles for: the host's, unless NUMBA_CPU_NAME/NUMBA_CPU_FEATURES say else."""
    features = numba.config.CPU_FEATURES
    if features is None:
        if numba.config.CPU_NAME is not None:
            return set()
        features = binding.get_host_cpu_features().flatten()
    return set(features.split(","))


def _instructions(features: set[str]) -> str:
    """How the integer products are spelled: "vnni" (``vpdpbusd``: AVX-VNNI, or AVX-512 VNNI with 256-bit vectors),
    "avx2" (``pmaddubsw`` and ``pmaddwd``) or "ir" (plain vector IR)."""
    if "+avxvnni" in features or {"+avx512vnni", "+avx512vl"} <= features:
        return "vnni"
    return "avx2" if "+avx2" in features else "ir"


def row_dots_int8(count: int, steps: int | None, instructions: str):
    """An intrinsic: rows ``row`` .. ``row + count - 1`` of an int4 matrix times int8 x, as a tuple of float32;
    ``steps`` blocks of 32 per group unrolled (None: counted at run time)."""

    @intrinsic
    def row_dots(typingctx, data, scales, row, x, x_scales, x_offsets):
        if scales.dtype not in (types.uint16, types.int16) or data.layout != "C" or scales.layout != "C":
            return None
        signature = types.UniTuple(types.float32, count)(data, scales, types.intp, x, x_scales, x_offsets)
        return signature, lambda context, builder, sig, args: _codegen(
            context, builder, sig, args, count, steps, instructions
        )

    return row_dots


def _codegen(context, builder: ir.IRBuilder, signature, args, count: int, steps: int | None, instructions: str):
    data_type, scales_type, _, x_type, x_scales_type, offsets_type = signature.args
    data_arg, scales_arg, row, x_arg, x_scales_arg, offsets_arg = args
    data = context.make_array(data_type)(context, builder, data_arg)
    scales = context.make_array(scales_type)(context, builder, scales_arg)
    x = context.make_array(x_type)(context, builder, x_arg).data
    x_scales = context.make_array(x_scales_type)(context, builder, x_scales_arg).data
    offsets = context.make_array(offsets_type)(context, builder, offsets_arg).data
    widen = scale_widener(scales_type.dtype)
    intp = row.type

    def constant(value: int) -> ir.Constant:
        return ir.Constant(intp, value)

    pairs = builder.extract_value(data.shape, 1)
    groups = builder.extract_value(scales.shape, 1)
    group_pairs = builder.udiv(pairs, groups)
    rows = [builder.add(row, constant(i)) for i in range(count)]
    row_data = [builder.gep(data.data, [builder.mul(r, pairs)]) for r in rows]
    row_scales = [builder.gep(scales.data, [builder.mul(r, groups)]) for r in rows]
    totals = [cgutils.alloca_once_value(builder, ir.Constant(_FLOATS, None)) for _ in rows]
    prefetch_rows(builder, data.data, scales.data, builder.add(row, constant(count * AHEAD)), count, pairs, groups)

    def block(at: ir.Value, sums: list[ir.Value]) -> list[ir.Value]:
        """Add the 32 weights from byte ``at`` of each row times x's block there to each row's sums."""
        xs = _load(builder, x, builder.add(at, at), _X)
        out = []
        for i, total in enumerate(sums):
            packed = _load(builder, row_data[i], at, _BYTES)
            shifted = builder.lshr(packed, ir.Constant(_BYTES, [4] * (BLOCK // 2)))
            nibbles = builder.and_(_concatenate(builder, packed, shifted), ir.Constant(_X, [15] * BLOCK))
            out.append(_add_dot_quads(builder, total, nibbles, xs, instructions))
        return out

    with cgutils.for_range(builder, groups) as group:
        start = builder.mul(group.index, group_pairs)
        offset = _load(builder, offsets, builder.mul(group.index, constant(8)), _SUMS)
        sums = [builder.sub(ir.Constant(_SUMS, None), offset)] * count
        if steps is not None:
            for k in range(steps):
                sums = block(builder.add(start, constant(k * BLOCK // 2)), sums)
        else:
            cells = [cgutils.alloca_once_value(builder, s) for s in sums]
            with cgutils.for_range(builder, builder.udiv(group_pairs, constant(BLOCK // 2))) as step:
                at = builder.add(start, builder.mul(step.index, constant(BLOCK // 2)))
                for cell, total in zip(cells, block(at, [builder.load(c) for c in cells]), strict=True):
                    builder.store(total, cell)
            sums = [builder.load(c) for c in cells]
        x_scale = builder.load(builder.gep(x_scales, [group.index]))
        for i in range(count):
            scale = builder.fmul(widen(builder, builder.load(builder.gep(row_scales[i], [group.index]))), x_scale)
            sums_f = builder.sitofp(sums[i], _FLOATS)
            builder.store(_fma(builder, sums_f, _splat(builder, scale, _FLOATS), builder.load(totals[i])), totals[i])
    results = [_sum_lanes(builder, builder.load(t)) for t in totals]
    return context.make_tuple(builder, signature.return_type, results)


def _concatenate(builder: ir.IRBuilder, low: ir.Value, high: ir.Value) -> ir.Value:
    width = low.type.count
    return builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(_I32, 2 * width), list(range(2 * width))))


def _add_dot_quads(
    builder: ir.IRBuilder, total: ir.Value, nibbles: ir.Value, x: ir.Value, instructions: str
) -> ir.Value:
    """``total`` (eight int32) plus 32 unsigned nibbles times 32 int8 values, each four adjacent products summed."""
    if instructions == "vnni":
        quads = [builder.bitcast(v, _SUMS) for v in (nibbles, x)]
        return _call(builder, "llvm.x86.avx512.vpdpbusd.256", _SUMS, [total, *quads])
    return builder.add(total, _dot_quads(builder, nibbles, x, instructions == "avx2"))


def _dot_quads(builder: ir.IRBuilder, nibbles: ir.Value, x: ir.Value, avx2: bool) -> ir.Value:
    """32 unsigned nibbles times 32 int8 values, each four adjacent products summed: eight int32."""
    if avx2:
        pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _PAIRS, [nibbles, x])
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _SUMS, [pairs, ir.Constant(_PAIRS, [1] * (BLOCK // 2))])
    wide = ir.VectorType(_I16, BLOCK)
    products = builder.mul(builder.zext(nibbles, wide), builder.sext(x, wide))
    pairs = _adjacent_sums(builder, products)
    return _adjacent_sums(builder, builder.sext(pairs, ir.VectorType(_I32, BLOCK // 2)))


def _adjacent_sums(builder: ir.IRBuilder, vector: ir.Value) -> ir.Value:
    width = vector.type.count // 2
    even, odd = (
        builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(_I32, width), list(range(k, 2 * width, 2))))
        for k in (0, 1)
    )
    return builder.add(even, odd)


def _call(builder: ir.IRBuilder, name: str, returns: ir.Type, args: list[ir.Value]) -> ir.Value:
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(returns, [a.type for a in args]), name)
    return builder.call(function, args)


_INSTRUCTIONS = _instructions(_features())
_two_1, _two_2, _two_4, _two_any = (row_dots_int8(2, steps, _INSTRUCTIONS) for steps in (1, 2, 4, None))
_one_any = row_dots_int8(1, None, _INSTRUCTIONS)
