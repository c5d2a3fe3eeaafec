"""int4 rows times a vector, written in LLVM vector IR: the decode kernel of Kimi K2.5's stored format.

numba compiles the plain loop over a row's bytes to scalar code (one ``vcvtsi2ss`` per weight: 4-6 GB/s of packed
weights on 2 cores). Here the loop is spelled in vectors: eight bytes at a time are zero-extended to 32-bit lanes,
their low and high nibbles masked and shifted out, offset by ``INT4_OFFSET`` and converted to float, then multiplied
with x's even and odd elements (low nibbles hold even columns) and accumulated with fused multiply-adds, group by
group, each group's sum scaled once. Two rows are taken at a time so that each load of x serves both. On AVX2 this
is ``vpmovzxbd``/``vpand``/``vpsrld``/``vpsubd``/``vcvtdq2ps``/``vfmadd``: ``kernels.matmul`` of a 1536x1024 matrix
in groups of 32 measured 10-12 GB/s on a 2-core EPYC, against 5-7 for the loop before, interleaved in one process.
Tried there: one accumulator per row instead of two, and floats made by or-ing into 2**23's bits, both slower;
the offset subtracted once per group from x's sums, 5-8% faster but with four times the rounding error.

Groups of 32, 64 and 128 weights (2, 4 and 8 vector steps) are unrolled, with each group's sums in registers:
the counted loop's overhead and spills per group had held groups of 32 to 3.4 GB/s on one thread from cache
(6.5 unrolled; groups of 64: 4.3 and 6.5). Each call prefetches the rows ``prefetch.AHEAD`` calls ahead.

Every lane's order of operations is fixed by the IR (explicit ``llvm.fma``, a fixed tree for the final sum), so a
row's result does not depend on the CPU's vector width or the thread count, nor on whether its groups are
unrolled. A group's width need not be a multiple of the eight bytes: the rest of each group runs one byte at a
time, in the same order on every machine.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.compute.float_bits import scale_widener
from engine.compute.prefetch import AHEAD, prefetch_rows
from engine.formats.quant import INT4_OFFSET

LANES = 8  # packed bytes per vector step: 8 low and 8 high nibbles, one 256-bit vector of floats each
_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_BYTES = ir.VectorType(_I8, LANES)
_INTS = ir.VectorType(_I32, LANES)
_FLOATS = ir.VectorType(_F32, LANES)


@njit(cache=True)
def int4_rows(x_even, x_odd, data, scales, first, last, y):
    """y[r - first] = row r of an int4 matrix (``data`` [rows, in / 2] uint8, ``scales`` [rows, groups] as
    ``scale_to_f32`` reads them, both C-contiguous) times x, for r in [first, last); x_even and x_odd are x's
    even and odd elements."""
    group_pairs = data.shape[1] // scales.shape[1]
    steps = group_pairs // LANES if group_pairs % LANES == 0 else 0
    r = first
    while r + 1 < last:
        if steps == 2:
            a, b = _two_2(data, scales, r, x_even, x_odd)
        elif steps == 4:
            a, b = _two_4(data, scales, r, x_even, x_odd)
        elif steps == 8:
            a, b = _two_8(data, scales, r, x_even, x_odd)
        else:
            a, b = _two_any(data, scales, r, x_even, x_odd)
        y[r - first], y[r + 1 - first] = a, b
        r += 2
    if r < last:
        (y[r - first],) = _one_any(data, scales, r, x_even, x_odd)


def _row_dots(count: int, steps: int | None):
    """An intrinsic: rows ``row`` .. ``row + count - 1`` of an int4 matrix times x, as a tuple of float32;
    ``steps`` vector steps per group unrolled, the group a whole number of them (None: counted at run time)."""

    @intrinsic
    def row_dots(typingctx, data, scales, row, x_even, x_odd):
        if scales.dtype not in (types.uint16, types.int16) or data.layout != "C" or scales.layout != "C":
            return None
        signature = types.UniTuple(types.float32, count)(data, scales, types.intp, x_even, x_odd)
        return signature, lambda context, builder, sig, args: _codegen(context, builder, sig, args, count, steps)

    return row_dots


def _codegen(context, builder: ir.IRBuilder, signature, args, count: int, steps: int | None) -> ir.Value:
    data_type, scales_type, _, even_type, odd_type = signature.args
    data_arg, scales_arg, row, even_arg, odd_arg = args
    data = context.make_array(data_type)(context, builder, data_arg)
    scales = context.make_array(scales_type)(context, builder, scales_arg)
    x_even = context.make_array(even_type)(context, builder, even_arg).data
    x_odd = context.make_array(odd_type)(context, builder, odd_arg).data
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

    prefetch_rows(builder, data.data, scales.data, builder.add(row, constant(count * AHEAD)), count, pairs, groups)

    zeros, zero = ir.Constant(_FLOATS, None), ir.Constant(_F32, 0)
    # per row: the running sum over the row of the low and high nibbles' products, vector and scalar
    totals = [[cgutils.alloca_once_value(builder, zeros) for _ in range(2)] for _ in rows]
    total_rest = [cgutils.alloca_once_value(builder, zero) for _ in rows]

    def step(at: ir.Value, sums: list[list[ir.Value]]) -> list[list[ir.Value]]:
        """Add the 16 weights from byte ``at`` of each row times x there to each row's (low, high) sums."""
        x = [_load(builder, x_even, at, _FLOATS), _load(builder, x_odd, at, _FLOATS)]
        out = []
        for i, row_sums in enumerate(sums):
            packed = builder.zext(_load(builder, row_data[i], at, _BYTES), _INTS)
            nibbles = _nibbles(builder, packed, _INTS)
            out.append([_fma(builder, n, xs, s) for n, xs, s in zip(nibbles, x, row_sums, strict=True)])
        return out

    with cgutils.for_range(builder, groups) as group:
        start = builder.mul(group.index, group_pairs)
        sums = [[zeros, zeros] for _ in rows]
        if steps is not None:
            for k in range(steps):
                sums = step(builder.add(start, constant(k * LANES)), sums)
            rests = None  # no bytes past the vector steps
        else:
            cells = [[cgutils.alloca_once_value(builder, v) for v in row_sums] for row_sums in sums]
            vector_steps = builder.udiv(group_pairs, constant(LANES))
            with cgutils.for_range(builder, vector_steps) as k:
                at = builder.add(start, builder.mul(k.index, constant(LANES)))
                loaded = [[builder.load(c) for c in row_cells] for row_cells in cells]
                for row_cells, row_sums in zip(cells, step(at, loaded), strict=True):
                    for c, v in zip(row_cells, row_sums, strict=True):
                        builder.store(v, c)
            sums = [[builder.load(c) for c in row_cells] for row_cells in cells]
            tail = builder.add(start, builder.mul(vector_steps, constant(LANES)))
            rests = _rest(builder, row_data, x_even, x_odd, tail, builder.urem(group_pairs, constant(LANES)))
        for i in range(count):
            scale = widen(builder, builder.load(builder.gep(row_scales[i], [group.index])))
            scales_vector = _splat(builder, scale, _FLOATS)
            for t, s in zip(totals[i], sums[i], strict=True):
                builder.store(_fma(builder, scales_vector, s, builder.load(t)), t)
            if rests is not None:
                builder.store(_fma(builder, scale, rests[i], builder.load(total_rest[i])), total_rest[i])

    results = []
    for i in range(count):
        low, high = (builder.load(t) for t in totals[i])
        results.append(builder.fadd(_sum_lanes(builder, builder.fadd(low, high)), builder.load(total_rest[i])))
    return context.make_tuple(builder, signature.return_type, results)


def _rest(builder: ir.IRBuilder, row_data, x_even, x_odd, start: ir.Value, count: ir.Value) -> list[ir.Value]:
    """Each row's sum of a group's last ``count`` bytes (fewer than ``LANES``) times x, one byte at a time."""
    cells = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0)) for _ in row_data]
    with cgutils.for_range(builder, count) as step:
        at = builder.add(start, step.index)
        x = [builder.load(builder.gep(x_even, [at])), builder.load(builder.gep(x_odd, [at]))]
        for weights, cell in zip(row_data, cells, strict=True):
            packed = builder.zext(builder.load(builder.gep(weights, [at])), _I32)
            for value, xs in zip(_nibbles(builder, packed, _I32), x, strict=True):
                builder.store(_fma(builder, value, xs, builder.load(cell)), cell)
    return [builder.load(c) for c in cells]


def _nibbles(builder: ir.IRBuilder, packed: ir.Value, int_type: ir.Type) -> tuple[ir.Value, ir.Value]:
    """The low and high nibbles of zero-extended bytes, less ``INT4_OFFSET``, as floats."""
    float_type = _FLOATS if isinstance(int_type, ir.VectorType) else _F32

    def constant(value: int) -> ir.Constant:
        return ir.Constant(int_type, [value] * LANES if isinstance(int_type, ir.VectorType) else value)

    low = builder.and_(packed, constant(15))
    high = builder.lshr(packed, constant(4))
    return tuple(builder.sitofp(builder.sub(n, constant(INT4_OFFSET)), float_type) for n in (low, high))


def _load(builder: ir.IRBuilder, base: ir.Value, at: ir.Value, vector_type: ir.VectorType) -> ir.Value:
    return builder.load(builder.bitcast(builder.gep(base, [at]), vector_type.as_pointer()), align=1)


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    name = f"llvm.fma.v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "llvm.fma.f32"
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3), name)
    return builder.call(function, [a, b, c])


def _splat(builder: ir.IRBuilder, value: ir.Value, vector_type: ir.VectorType) -> ir.Value:
    undefined = ir.Constant(vector_type, ir.Undefined)
    first = builder.insert_element(undefined, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, undefined, ir.Constant(ir.VectorType(_I32, vector_type.count), None))


def _sum_lanes(builder: ir.IRBuilder, vector: ir.Value) -> ir.Value:
    """The lanes' sum, halving the vector each step: the same tree on every CPU."""
    width = vector.type.count
    while width > 1:
        width //= 2
        low = builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(_I32, width), list(range(width))))
        high = builder.shuffle_vector(
            vector, vector, ir.Constant(ir.VectorType(_I32, width), list(range(width, 2 * width)))
        )
        vector = builder.fadd(low, high)
    return builder.extract_element(vector, ir.Constant(_I32, 0))


_two_2, _two_4, _two_8, _two_any = (_row_dots(2, steps) for steps in (2, 4, 8, None))
_one_any = _row_dots(1, None)
