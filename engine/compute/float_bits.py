"""16-bit floats in compiled code: numba has no float16 or bfloat16 type, so kernels read their bits as 16-bit
integers and widen them to float32 with these intrinsics (and the IR helpers, for kernels written in LLVM IR)."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def bf16_to_f32(typingctx, bits):
    return types.float32(types.uint16), lambda context, builder, signature, args: widen_bf16(builder, args[0])


@intrinsic
def f16_to_f32(typingctx, bits):
    return types.float32(types.uint16), lambda context, builder, signature, args: widen_f16(builder, args[0])


@intrinsic
def scale_to_f32(typingctx, bits):
    """An int4 group scale as float32: float16 bits given as uint16, bfloat16 bits as int16."""

    def codegen(context, builder, signature, args):
        return scale_widener(signature.args[0])(builder, args[0])

    if bits not in (types.uint16, types.int16):
        return None
    return types.float32(bits), codegen


def scale_widener(bits: types.Type):
    """How to widen an int4 group scale held as ``bits`` (see ``scale_to_f32``)."""
    return widen_f16 if bits == types.uint16 else widen_bf16


def widen_bf16(builder: ir.IRBuilder, bits: ir.Value) -> ir.Value:
    """bfloat16 bits (16-bit integer) to float32: the top half of its bits."""
    wide = builder.shl(builder.zext(bits, ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
    return builder.bitcast(wide, ir.FloatType())


def widen_f16(builder: ir.IRBuilder, bits: ir.Value) -> ir.Value:
    """float16 bits (16-bit integer) to float32."""
    return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())
