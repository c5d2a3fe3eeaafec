"""Packed weight formats for one matrix W [out, in]: their reference (de)quantization and byte layout.

| format | data | scales | w |
| --- | --- | --- | --- |
| ``fp32`` | float32 [out, in] | none | data |
| ``bf16`` | uint16 [out, in], the top half of a float32 | none | data << 16, exact |
| ``fp16`` | float16 [out, in] | none | data |
| ``int8`` | int8 [out, in] | float32 [out] | data * scale[row], scale = max|w_row| / 127 |
| ``int4`` | uint8 [out, in / 2] | float16 [out, in / G] | (nibble - 8) * scale[row, k // G] |
| ``int4_bf16`` | as ``int4`` | bfloat16 [out, in / G], as uint16 | as ``int4`` |
| ``fp8`` | uint8 [out, in], e4m3fn | float32 [ceil(out / B), ceil(in / B)] | e4m3(data) * scale[r // B, k // B] |

``bf16`` quantizes with round-to-nearest-even; a checkpoint's bf16 bits are used as they are.
``int4`` is symmetric and group-wise along ``in`` (group size G even and dividing ``in``): element 2j of a
row is the low nibble of byte j, element 2j + 1 the high nibble, each holding q + 8 for q in [-8, 7] (quantize
uses [-7, 7]). The scale max|w_group| / 7 is rounded to float16 (``int4_bf16``: bfloat16) before quantizing, so
dequantizing reproduces exactly what was quantized against. A zero row (int8) or group (int4) has scale 0. Groups
whose float16 scale falls below its normal range (max|w_group| < 4.3e-4) lose scale precision.

``int4_bf16`` is how compressed-tensors' ``pack-quantized`` checkpoints (Kimi K2.5's experts) store symmetric
int4: their int32 words hold eight values from the lowest bits up, each plus 8, which read as little-endian bytes
is ``int4``'s nibble order, and their group scales are bfloat16.

``fp8`` is DeepSeek-V3's block quantization (its checkpoints, Kimi K2's and Qwen's FP8 releases): float8 e4m3fn
values (4 exponent bits with bias 7, 3 mantissa bits, no infinities, 0x7F/0xFF NaN, largest 448) with a float32
scale (the checkpoint's ``weight_scale_inv``) per B x B block, the last blocks of a row or column partial. Its
``group_size`` is B. quantize scales each block by max|w_block| / 448 and rounds to the nearest e4m3 value, ties to
the even one.

Byte layout (``to_bytes`` / ``from_bytes``), one contiguous range per matrix: the data array's bytes
(C order, little-endian), zero-padded to a multiple of 16 bytes, then the scales' bytes. ``fp32``, ``bf16``
and ``fp16`` have no scales, so their range is the data alone, padded. A buffer that starts 16-byte aligned
keeps both arrays aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMATS = ("fp32", "bf16", "fp16", "int8", "int4")  # what repack writes
ALL_FORMATS = (*FORMATS, "int4_bf16", "fp8")  # the last two only as quantized checkpoints store them
INT4_FORMATS = ("int4", "int4_bf16")
GROUPED_FORMATS = (*INT4_FORMATS, "fp8")  # the formats with a group (or block) size
ALIGN = 16
INT8_MAX = 127
INT4_MAX = 7
INT4_OFFSET = 8
FP8_MAX = 448.0


def _e4m3_values() -> np.ndarray:
    """The float32 value of each float8 e4m3fn byte."""
    bits = np.arange(256)
    exponent, mantissa = (bits >> 3) & 0xF, (bits & 7).astype(np.float64)
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    magnitude[(exponent == 15) & (mantissa == 7)] = np.nan
    return np.where(bits >> 7, -magnitude, magnitude).astype(np.float32)


FP8_VALUES = _e4m3_values()

_DTYPES = {  # format: (data, scales)
    "fp32": (np.dtype(np.float32), np.dtype(np.float32)),
    "bf16": (np.dtype(np.uint16), np.dtype(np.float32)),
    "fp16": (np.dtype(np.float16), np.dtype(np.float32)),
    "int8": (np.dtype(np.int8), np.dtype(np.float32)),
    "int4": (np.dtype(np.uint8), np.dtype(np.float16)),
    "int4_bf16": (np.dtype(np.uint8), np.dtype(np.uint16)),
    "fp8": (np.dtype(np.uint8), np.dtype(np.float32)),
}


@dataclass(frozen=True, eq=False)
class PackedMatrix:
    """W [out, in] = ``shape`` in ``format``; ``group_size`` is 0 for every format but the grouped ones.

    ``scales`` is empty (float32 [0]) for the formats without scales.
    """

    format: str
    shape: tuple[int, int]
    group_size: int
    data: np.ndarray
    scales: np.ndarray

    @property
    def nbytes(self) -> int:
        """Packed bytes, data and scales: what a kernel reads."""
        return self.data.nbytes + self.scales.nbytes


def quantize(w: np.ndarray, format: str, group_size: int = 64) -> PackedMatrix:
    """Pack the finite float32 matrix ``w`` [out, in]; ``group_size`` matters only for the grouped formats."""
    if not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.ndim != 2:
        raise ValueError(f"w must be a 2-D float32 array, got {_describe(w)}")
    group_size = _check(format, w.shape, group_size)
    if not np.isfinite(w).all():
        raise ValueError("w must be finite")
    w = np.ascontiguousarray(w)
    no_scales = np.empty(0, np.float32)
    if format == "fp32":
        return PackedMatrix(format, w.shape, 0, w.copy(), no_scales)
    if format == "fp16":
        return PackedMatrix(format, w.shape, 0, w.astype(np.float16), no_scales)
    if format == "bf16":
        return PackedMatrix(format, w.shape, 0, _bf16_bits(w), no_scales)
    if format == "int8":
        scales = np.abs(w).max(axis=1) / np.float32(INT8_MAX)
        q = _round(w, scales[:, None], INT8_MAX)
        return PackedMatrix(format, w.shape, 0, q.astype(np.int8), scales)
    if format == "fp8":
        return _quantize_fp8(w, group_size)
    out, cols = w.shape
    groups = w.reshape(out, cols // group_size, group_size)
    exact = np.abs(groups).max(axis=2) / np.float32(INT4_MAX)
    scales = exact.astype(np.float16) if format == "int4" else _bf16_bits(exact)
    if not np.isfinite(_scales_float32(format, scales)).all():
        raise ValueError(f"w has values too large for int4's float16 scales (|w| > {INT4_MAX * 65504})")
    q = _round(groups, _scales_float32(format, scales)[:, :, None], INT4_MAX).reshape(out, cols)
    nibbles = (q + INT4_OFFSET).astype(np.uint8)
    return PackedMatrix(format, w.shape, group_size, nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scales)


def dequantize(p: PackedMatrix) -> np.ndarray:
    """The float32 [out, in] matrix that ``p`` stands for: the reference the kernels are tested against."""
    if p.format == "fp32":
        return p.data.copy()
    if p.format == "fp16":
        return p.data.astype(np.float32)
    if p.format == "bf16":
        return (p.data.astype(np.uint32) << 16).view(np.float32)
    if p.format == "int8":
        return p.data.astype(np.float32) * p.scales[:, None]
    if p.format == "fp8":
        return FP8_VALUES[p.data] * _block_scales(p.scales, p.shape, p.group_size)
    out, cols = p.shape
    q = np.empty(p.shape, np.float32)
    q[:, 0::2] = p.data & 0xF
    q[:, 1::2] = p.data >> 4
    q -= INT4_OFFSET
    groups = q.reshape(out, cols // p.group_size, p.group_size) * _scales_float32(p.format, p.scales)[:, :, None]
    return groups.reshape(p.shape)


def scales_dtype(format: str) -> np.dtype:
    """The element type of ``format``'s scales."""
    return _DTYPES[format][1]


def scales_shape_of(format: str, shape: tuple[int, int], group_size: int) -> tuple[int, ...]:
    """The shape of the scales of a [out, in] = ``shape`` matrix in ``format``."""
    out, cols = shape
    if format == "int8":
        return (out,)
    if format in INT4_FORMATS:
        return (out, cols // group_size)
    if format == "fp8":
        return (-(-out // group_size), -(-cols // group_size))
    return (0,)


def byte_size(format: str, shape: tuple[int, int], group_size: int = 64) -> int:
    """Length of the byte range ``to_bytes`` writes for a matrix of this format and shape."""
    return _layout(format, shape, _check(format, shape, group_size))[3]


def to_bytes(p: PackedMatrix) -> bytes:
    """``p`` in the byte layout of this module's docstring."""
    data = p.data.tobytes()
    return data + bytes(-len(data) % ALIGN) + p.scales.tobytes()


def from_bytes(buffer: np.ndarray, format: str, shape: tuple[int, int], group_size: int = 64) -> PackedMatrix:
    """A PackedMatrix viewing (not copying) ``buffer``, a contiguous uint8 array laid out as ``to_bytes`` writes."""
    group_size = _check(format, shape, group_size)
    data_shape, scales_shape, scales_offset, nbytes = _layout(format, shape, group_size)
    if not isinstance(buffer, np.ndarray) or buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise ValueError(f"buffer must be a 1-D uint8 array, got {_describe(buffer)}")
    if not buffer.flags.c_contiguous or buffer.nbytes != nbytes:
        raise ValueError(f"buffer must be {nbytes} contiguous bytes for {format} {list(shape)}, got {buffer.nbytes}")
    data_dtype, scales_dtype = _DTYPES[format]
    data = buffer[: data_shape[0] * data_shape[1] * data_dtype.itemsize].view(data_dtype).reshape(data_shape)
    scales = buffer[scales_offset:].view(scales_dtype).reshape(scales_shape)
    return PackedMatrix(format, (int(shape[0]), int(shape[1])), group_size, data, scales)


def quantization_error(w: np.ndarray, p: PackedMatrix) -> dict[str, float]:
    """``max_abs``: the largest |w - dequantize(p)|; ``rel_fro``: ||w - dequantize(p)||_F / ||w||_F (0 for w = 0)."""
    w = w.astype(np.float64)
    error = w - dequantize(p)
    norm = np.linalg.norm(w)
    return {
        "max_abs": float(np.abs(error).max(initial=0.0)),
        "rel_fro": float(np.linalg.norm(error) / norm) if norm else 0.0,
    }


def _check(format: str, shape: tuple[int, ...], group_size: int) -> int:
    """The group size to record for this format (0 unless grouped), after checking all three arguments."""
    if format not in ALL_FORMATS:
        raise ValueError(f"format must be one of {ALL_FORMATS}, got {format!r}")
    if len(shape) != 2 or not all(isinstance(n, int | np.integer) and n > 0 for n in shape):
        raise ValueError(f"shape must be two positive sizes [out, in], got {shape}")
    if format not in GROUPED_FORMATS:
        return 0
    if format == "fp8":
        if not isinstance(group_size, int | np.integer) or group_size <= 0:
            raise ValueError(f"group_size (the block's side) must be a positive integer for fp8, got {group_size!r}")
        return int(group_size)
    if not isinstance(group_size, int | np.integer) or group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even integer for {format}, got {group_size!r}")
    if shape[1] % group_size:
        raise ValueError(f"group_size {group_size} must divide in = {shape[1]} for {format}")
    return int(group_size)


def _layout(format: str, shape: tuple[int, int], group_size: int) -> tuple[tuple[int, int], tuple[int, ...], int, int]:
    """(data shape, scales shape, scales' byte offset, total bytes) of the ``to_bytes`` layout."""
    out, cols = shape
    data_shape = (out, cols // 2) if format in INT4_FORMATS else (out, cols)
    scales_shape = scales_shape_of(format, shape, group_size)
    data_dtype, scales_dtype = _DTYPES[format]
    data_nbytes = data_shape[0] * data_shape[1] * data_dtype.itemsize
    scales_offset = data_nbytes + -data_nbytes % ALIGN
    return data_shape, scales_shape, scales_offset, scales_offset + int(np.prod(scales_shape)) * scales_dtype.itemsize


def _quantize_fp8(w: np.ndarray, block: int) -> PackedMatrix:
    scales = np.zeros(scales_shape_of("fp8", w.shape, block), np.float32)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            scales[i, j] = np.abs(w[i * block : (i + 1) * block, j * block : (j + 1) * block]).max() / FP8_MAX
    full = _block_scales(scales, w.shape, block)
    scaled = np.divide(w, full, out=np.zeros_like(w), where=full > 0)
    positive = FP8_VALUES[:127]  # bytes 0x00-0x7E: every finite non-negative value, increasing
    above = np.clip(np.searchsorted(positive, np.abs(scaled)), 1, 126)
    below = above - 1
    gap_below, gap_above = np.abs(scaled) - positive[below], positive[above] - np.abs(scaled)
    nearest = np.where((gap_below < gap_above) | ((gap_below == gap_above) & (below % 2 == 0)), below, above)
    data = (nearest | np.where(scaled < 0, 0x80, 0)).astype(np.uint8)
    return PackedMatrix("fp8", w.shape, block, data, scales)


def _block_scales(scales: np.ndarray, shape: tuple[int, int], block: int) -> np.ndarray:
    """fp8's block scales repeated to one per element of a [out, in] matrix."""
    return np.repeat(np.repeat(scales, block, axis=0), block, axis=1)[: shape[0], : shape[1]]


def _bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 ``w`` rounded to bfloat16 (to nearest, ties to even), as the uint16 top halves."""
    bits = np.ascontiguousarray(w).view(np.uint32)
    round_half_even = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + round_half_even) >> 16).astype(np.uint16)


def _scales_float32(format: str, scales: np.ndarray) -> np.ndarray:
    """An int4 format's group scales as float32 (exact for both)."""
    if format == "int4":
        return scales.astype(np.float32)
    return (scales.astype(np.uint32) << 16).view(np.float32)


def _round(w: np.ndarray, scales: np.ndarray, limit: int) -> np.ndarray:
    """round(w / scales) clipped to [-limit, limit], 0 where the scale is 0."""
    q = np.divide(w, scales, out=np.zeros_like(w), where=scales > 0)
    return np.clip(np.rint(q), -limit, limit)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.ndim}-D {value.dtype}"
    return type(value).__name__
