"""Where each expert's bytes are in a checkpoint: one or more contiguous byte ranges per weight matrix.

An expert is a SwiGLU MLP: ``gate_up`` [2I, H] (gate rows, then up rows) and ``down`` [H, I].
On disk it is either three per-expert tensors (gate, up, down) or one slice of each fused
``[E, 2I, H]`` / ``[E, H, I]`` tensor; in both layouts each piece is one contiguous byte range.
A quantized checkpoint stores each per-expert matrix with scales: compressed-tensors' int4 (Kimi K2.5:
``weight_packed``, int32 words of eight values, and ``weight_scale``) or block fp8 (DeepSeek-V3: ``weight`` in
float8 e4m3 and ``weight_scale_inv``); a range then has its scales' range beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

from engine.architectures.spec import WeightQuantization
from engine.buffers import Slot
from engine.errors import CheckpointError
from engine.formats.checkpoint import FLOAT_DTYPES, Checkpoint
from engine.formats.quant import PackedMatrix, scales_dtype, scales_shape_of
from engine.formats.repack_manifest import ExpertEntry, RepackManifest
from engine.formats.safetensors_file import TensorInfo

PACKED_PER_WORD = 8  # int4 values in one int32 word of a compressed-tensors checkpoint
INT4_FORMATS = {"BF16": "int4_bf16", "F16": "int4"}  # an int4 matrix's packed format, by its scales' dtype
QUANTIZED_SUFFIXES = {  # a quantized matrix's tensors, by the checkpoint's quantization
    "int4": ("weight_packed", "weight_scale", "weight_shape"),
    "fp8": ("weight", "weight_scale_inv"),
}


class ExpertWeights(NamedTuple):
    """An expert in float32, what the compute uses under ``cache_format = "dequantized"``."""

    gate_up: np.ndarray  # [2I, H] float32
    down: np.ndarray  # [H, I] float32


@dataclass(frozen=True, eq=False)
class PackedExpert:
    """An expert as stored (``cache_format = "packed"``): ``gate_up`` in one or two parts (fused, or gate then
    up), each a PackedMatrix over the bytes read; ``buffer`` holds them (None for views of a memory map)."""

    gate_up: tuple[PackedMatrix, ...]
    down: PackedMatrix
    buffer: Slot | None

    @cached_property
    def addresses(self) -> tuple[int, ...]:
        """Where the gate, up and down matrices' data and scales start in memory, in that order (a fused
        gate_up's up half starts halfway down its rows): for compiled code that takes an expert by address
        (``moe_kernel``)."""
        if len(self.gate_up) == 2:
            gate, up = self.gate_up
            starts = [_start(gate.data), _start(gate.scales), _start(up.data), _start(up.scales)]
        else:
            (fused,) = self.gate_up
            half = fused.shape[0] // 2
            gate, gate_scales = _start(fused.data), _start(fused.scales)
            scale_row = fused.scales.nbytes // fused.shape[0] if fused.scales.size else 0
            starts = [gate, gate_scales, gate + half * fused.data.strides[0], gate_scales + half * scale_row]
        return (*starts, _start(self.down.data), _start(self.down.scales))

    @cached_property
    def kind(self) -> tuple[tuple[str, tuple[int, int], int], ...]:
        """(format, shape, group size) of each matrix, gate_up's parts then down: experts alike can be computed
        together (``moe_kernel``)."""
        return tuple((m.format, m.shape, m.group_size) for m in (*self.gate_up, self.down))

    @cached_property
    def format(self) -> str | None:
        """The format of all its matrices, or None if they differ."""
        formats = {m.format for m in (*self.gate_up, self.down)}
        return formats.pop() if len(formats) == 1 else None

    def parts(self) -> tuple[PackedMatrix, PackedMatrix]:
        """(gate_up, down) for a one-part gate_up (fused or repacked)."""
        if len(self.gate_up) != 1:
            raise ValueError("gate_up is in two parts")
        return self.gate_up[0], self.down


ExpertData = ExpertWeights | PackedExpert


def _start(array: np.ndarray) -> int:
    if not array.flags.c_contiguous:
        raise ValueError(f"expected a contiguous array, got strides {array.strides}")
    return array.__array_interface__["data"][0]


@dataclass(frozen=True)
class ByteRange:
    """One contiguous piece of an expert in a checkpoint file."""

    path: str
    offset: int
    nbytes: int
    dtype: str
    tensor: str
    scales: ByteRange | None = None  # a quantized matrix's scales: its data is int4 in int32 words, or fp8
    group_size: int = 0  # of the scales: int4's group, fp8's block side

    @property
    def format(self) -> str:
        """The packed format of a quantized matrix (``quant``)."""
        assert self.scales is not None
        return "fp8" if self.dtype == "F8_E4M3" else INT4_FORMATS[self.scales.dtype]

    def packed(self, data: np.ndarray, scales: np.ndarray, columns: int) -> PackedMatrix:
        """This quantized matrix of ``columns`` columns over ``data`` and ``scales``, its bytes (uint8) as read."""
        format = self.format
        rows = data.size // columns if format == "fp8" else data.size * 2 // columns
        scales_shape = scales_shape_of(format, (rows, columns), self.group_size)
        scales = scales.view(scales_dtype(format)).reshape(scales_shape)
        return PackedMatrix(format, (rows, columns), self.group_size, data.reshape(rows, -1), scales)


@dataclass(frozen=True)
class ExpertLayout:
    """Where one expert's bytes are.

    In a checkpoint: ``gate_up`` as one fused range or two (gate, up), then ``down``. In a repacked directory
    (``engine.formats.repack``): one range, ``gate_up[0]``, holding both packed matrices as ``repacked`` describes.
    """

    gate_up: tuple[ByteRange, ...]
    down: ByteRange | None
    repacked: ExpertEntry | None = None

    @property
    def ranges(self) -> tuple[ByteRange, ...]:
        return self.gate_up if self.down is None else (*self.gate_up, self.down)

    @property
    def byte_ranges(self) -> tuple[ByteRange, ...]:
        """Every range a read takes, in order: a quantized matrix's scales right after its data."""
        return tuple(piece for r in self.ranges for piece in ((r,) if r.scales is None else (r, r.scales)))

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.byte_ranges)

    @property
    def packed_on_disk(self) -> bool:
        """Stored packed (repacked, or a quantized checkpoint): converted a whole matrix at a time."""
        return self.repacked is not None or any(r.scales is not None for r in self.ranges)


def repacked_layouts(manifest: RepackManifest) -> dict[tuple[int, int], ExpertLayout]:
    """Each expert's one range in a repacked directory, from its validated manifest."""
    return {
        key: ExpertLayout(
            (
                ByteRange(
                    str(manifest.path / e.file),
                    e.offset,
                    e.nbytes,
                    "U8",
                    f"{e.file}[layer {e.layer}, expert {e.expert}]",
                ),
            ),
            None,
            e,
        )
        for key, e in manifest.experts.items()
    }


def locate_experts(
    checkpoint: Checkpoint,
    prefix: str,
    num_experts: int,
    hidden_size: int,
    intermediate_size: int,
    names: tuple[str, str, str],
    quantization: WeightQuantization | None = None,
) -> dict[int, ExpertLayout]:
    """Find each expert's byte ranges under ``prefix`` (e.g. ``model.layers.3.mlp.experts``).

    ``names`` are the per-expert projection names (gate, up, down): ``gate_proj/up_proj/down_proj``
    or Mixtral's ``w1/w3/w2``. Fused ``gate_up_proj`` / ``down_proj`` tensors are used when present.
    ``quantization``: how the config says the checkpoint is quantized (its experts are then per-expert tensors).
    """
    h, i, e_count = hidden_size, intermediate_size, num_experts
    fused_name = f"{prefix}.gate_up_proj"
    if fused_name in checkpoint.tensors:
        gate_up = checkpoint.info(fused_name, (e_count, 2 * i, h))
        down = checkpoint.info(f"{prefix}.down_proj", (e_count, h, i))
        return {e: ExpertLayout((_slice(gate_up, e, e_count),), _slice(down, e, e_count)) for e in range(e_count)}
    gate, up, down_name = names
    shapes = ((gate, (i, h)), (up, (i, h)), (down_name, (h, i)))
    if quantization is not None and quantization.format == "int4":
        return {e: _int4(checkpoint, f"{prefix}.{e}", shapes, quantization.group_size) for e in range(e_count)}
    if quantization is not None:
        return {e: _fp8(checkpoint, f"{prefix}.{e}", shapes, quantization.group_size) for e in range(e_count)}
    layouts = {}
    for e in range(e_count):
        pieces = [checkpoint.info(f"{prefix}.{e}.{n}.weight", s) for n, s in shapes]
        if pieces[0].dtype != pieces[1].dtype:
            raise CheckpointError(
                pieces[1].path,
                f"dtype {pieces[1].dtype} differs from its gate's {pieces[0].dtype}",
                tensor=pieces[1].name,
            )
        layouts[e] = ExpertLayout(tuple(_whole(p) for p in pieces[:2]), _whole(pieces[2]))
    return layouts


def _int4(
    checkpoint: Checkpoint, prefix: str, shapes: tuple[tuple[str, tuple[int, int]], ...], group_size: int
) -> ExpertLayout:
    ranges = []
    for name, (rows, cols) in shapes:
        if cols % group_size or cols % PACKED_PER_WORD:
            raise CheckpointError(
                checkpoint.path,
                f"int4 groups of {group_size} (and words of {PACKED_PER_WORD}) do not divide the {cols} columns",
                tensor=f"{prefix}.{name}.weight_packed",
            )
        if f"{prefix}.{name}.weight" in checkpoint.tensors:
            raise CheckpointError(
                checkpoint.path, "is stored as floats, but quantization_config says the routed experts are int4",
                tensor=f"{prefix}.{name}.weight")  # fmt: skip
        data = checkpoint.info(f"{prefix}.{name}.weight_packed", (rows, cols // PACKED_PER_WORD), ("I32",))
        scales_shape = scales_shape_of("int4", (rows, cols), group_size)
        scales = checkpoint.info(f"{prefix}.{name}.weight_scale", scales_shape, tuple(INT4_FORMATS))
        ranges.append(ByteRange(data.path, data.start, data.nbytes, data.dtype, data.name, _whole(scales), group_size))
    return ExpertLayout(tuple(ranges[:2]), ranges[2])


def _fp8(
    checkpoint: Checkpoint, prefix: str, shapes: tuple[tuple[str, tuple[int, int]], ...], block: int
) -> ExpertLayout:
    """Block-fp8 matrices; one a checkpoint left in a float dtype (not converted) is read as such."""
    ranges = []
    for name, (rows, cols) in shapes:
        data = checkpoint.info(f"{prefix}.{name}.weight", (rows, cols), ("F8_E4M3", *FLOAT_DTYPES))
        if data.dtype != "F8_E4M3":
            ranges.append(_whole(data))
            continue
        blocks = scales_shape_of("fp8", (rows, cols), block)
        scales = checkpoint.info(f"{prefix}.{name}.weight_scale_inv", blocks, ("F32",))
        ranges.append(ByteRange(data.path, data.start, data.nbytes, data.dtype, data.name, _whole(scales), block))
    return ExpertLayout(tuple(ranges[:2]), ranges[2])


def _whole(info: TensorInfo) -> ByteRange:
    return ByteRange(info.path, info.start, info.nbytes, info.dtype, info.name)


def _slice(info: TensorInfo, expert: int, count: int) -> ByteRange:
    size = info.nbytes // count
    return ByteRange(info.path, info.start + expert * size, size, info.dtype, f"{info.name}[{expert}]")
