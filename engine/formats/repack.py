"""Repack a checkpoint for streaming: each routed expert one aligned range of ``experts.bin`` in a packed format.

The layout and its manifest are described in ``repack_manifest.py``. The repack works expert by expert, so its
memory is a few experts in float32 whatever the checkpoint's size, and writes ``repack.json`` last, through a
temporary name, after every other file is on disk: an interrupted repack leaves no manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from engine.architectures import parse_config
from engine.architectures.spec import DecoderSpec
from engine.errors import CheckpointError
from engine.formats import quant
from engine.formats.checkpoint import Checkpoint, to_float32
from engine.formats.expert_layout import QUANTIZED_SUFFIXES, ByteRange, ExpertLayout, locate_experts
from engine.formats.repack_manifest import (
    CONFIG_FILE,
    EXPERTS_FILE,
    MANIFEST_FILE,
    MIN_ALIGN,
    ExpertEntry,
    MatrixEntry,
    RepackManifest,
    check_manifest,
    config_sha256,
    expert_shapes,
    is_repacked,
)
from engine.formats.safetensors_file import SafetensorsWriter
from engine.formats.tensor_names import model_prefix, moe_prefix
from engine.units import format_bytes

RESIDENT_FILE = "model.safetensors"
COPIED_FILES = (CONFIG_FILE, "tokenizer.json", "generation_config.json", "synth.json")


@dataclass(frozen=True)
class RepackReport:
    """What a repack wrote, and how far its experts are from the source's float32 weights.

    The errors are over every expert matrix (gate_up and down): ``max_abs_error`` the largest |w - dequantized|,
    the relative Frobenius errors ||w - dequantized||_F / ||w||_F averaged and at their worst.
    """

    out_dir: Path
    format: str
    group_size: int
    layers: int
    experts: int
    max_abs_error: float
    mean_rel_fro_error: float
    worst_rel_fro_error: float
    worst_matrix: str
    source_expert_bytes: int
    expert_file_bytes: int
    resident_bytes: int
    seconds: float

    @property
    def bytes_written(self) -> int:
        return self.expert_file_bytes + self.resident_bytes

    def summary(self) -> str:
        """A markdown table for people."""
        packing = f"{self.format}, group size {self.group_size}" if self.group_size else self.format
        ratio = self.expert_file_bytes / self.source_expert_bytes
        rows = [
            ("output", str(self.out_dir)),
            ("format", packing),
            ("experts", f"{self.experts} in {self.layers} MoE layers"),
            ("source expert bytes", format_bytes(self.source_expert_bytes)),
            (EXPERTS_FILE, f"{format_bytes(self.expert_file_bytes)} ({ratio:.3f}x the source's experts)"),
            (RESIDENT_FILE, format_bytes(self.resident_bytes)),
            ("max abs error", f"{self.max_abs_error:.3e}"),
            ("mean rel. Frobenius error", f"{self.mean_rel_fro_error:.3e}"),
            ("worst rel. Frobenius error", f"{self.worst_rel_fro_error:.3e} ({self.worst_matrix})"),
            ("time", f"{self.seconds:.1f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
        return "\n".join(lines + [f"| {k:<{width}} | {v} |" for k, v in rows])


class _ErrorTally:
    def __init__(self) -> None:
        self.max_abs = 0.0
        self.rel_fro_sum = 0.0
        self.count = 0
        self.worst = (0.0, "none")  # (rel_fro, matrix): "none" while every matrix is exact

    def add(self, w: np.ndarray, packed: quant.PackedMatrix, name: str) -> None:
        error = quant.quantization_error(w, packed)
        self.max_abs = max(self.max_abs, error["max_abs"])
        self.rel_fro_sum += error["rel_fro"]
        self.count += 1
        if error["rel_fro"] > self.worst[0]:
            self.worst = (error["rel_fro"], name)


def repack(
    model_dir: str | Path, out_dir: str | Path, format: str, group_size: int = 64, align: int = MIN_ALIGN
) -> RepackReport:
    """Write the streaming layout of the checkpoint ``model_dir`` to ``out_dir`` (new, or an empty directory).

    ``group_size`` matters only for int4. Bad arguments are ValueErrors; a missing or malformed checkpoint, or
    an ``out_dir`` that is not empty, a CheckpointError. Nothing is written until every check has passed.
    """
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if format not in quant.FORMATS:
        raise ValueError(f"format must be one of {quant.FORMATS}, got {format!r}")
    if not isinstance(align, int) or align < MIN_ALIGN or align % MIN_ALIGN:
        raise ValueError(f"align must be a positive multiple of {MIN_ALIGN} (direct I/O's alignment), got {align!r}")
    if is_repacked(model_dir):
        raise CheckpointError(model_dir, f"is already repacked ({MANIFEST_FILE}); repack the original checkpoint")
    checkpoint = Checkpoint.open(model_dir)
    try:
        spec = parse_config(checkpoint.config, model_dir / CONFIG_FILE)
        group_size = _check_group_size(spec, format, group_size)
        layouts, expert_tensors = _locate(checkpoint, spec)
        if not layouts:
            raise CheckpointError(model_dir / CONFIG_FILE, "has no MoE layer, so no experts to repack")
        _make_empty_dir(out_dir)
        for name in COPIED_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, out_dir / name)
                _fsync(out_dir / name)
        resident_bytes = _write_resident(checkpoint, expert_tensors, out_dir / RESIDENT_FILE)
        tally = _ErrorTally()
        entries = _write_experts(checkpoint, spec, layouts, out_dir / EXPERTS_FILE, format, group_size, align, tally)
    finally:
        checkpoint.close()
    expert_file_bytes = (out_dir / EXPERTS_FILE).stat().st_size
    source = {
        "path": str(model_dir.resolve()),
        "config_sha256": config_sha256(model_dir),
        "weight_files": {p.name: p.stat().st_size for p in sorted(model_dir.glob("*.safetensors"))},
    }
    manifest = RepackManifest(out_dir, format, group_size, align, source, {EXPERTS_FILE: expert_file_bytes}, entries)
    check_manifest(out_dir, manifest.to_dict())  # the reader's rules, before the manifest exists
    _write_manifest(manifest)
    return RepackReport(
        out_dir=out_dir,
        format=format,
        group_size=group_size,
        layers=sum(spec.sparse_layers),
        experts=len(entries),
        max_abs_error=tally.max_abs,
        mean_rel_fro_error=tally.rel_fro_sum / tally.count,
        worst_rel_fro_error=tally.worst[0],
        worst_matrix=tally.worst[1],
        source_expert_bytes=sum(layout.nbytes for layout in layouts.values()),
        expert_file_bytes=expert_file_bytes,
        resident_bytes=resident_bytes,
        seconds=time.perf_counter() - start,
    )


def _check_group_size(spec: DecoderSpec, format: str, group_size: int) -> int:
    """The group size to record (0 unless int4), after checking it fits both matrices."""
    for name, shape in expert_shapes(spec).items():
        try:
            quant.byte_size(format, shape, group_size)
        except ValueError as e:
            raise ValueError(f"expert matrix {name} {list(shape)}: {e}") from None
    return group_size if format == "int4" else 0


def _locate(checkpoint: Checkpoint, spec: DecoderSpec) -> tuple[dict[tuple[int, int], ExpertLayout], set[str]]:
    """Every routed expert's byte ranges, layer-major then expert-minor, and the names of the tensors holding them."""
    h, i = spec.hidden_size, spec.moe_intermediate_size
    layouts, tensors = {}, set()
    for layer in range(spec.num_layers):
        if not spec.sparse_layers[layer]:
            continue
        prefix = f"{moe_prefix(checkpoint, f'{model_prefix(checkpoint)}.layers.{layer}', spec)}.experts"
        experts = locate_experts(checkpoint, prefix, spec.num_experts, h, i, spec.expert_names, spec.quantization)
        layouts.update({(layer, e): layout for e, layout in experts.items()})
        if f"{prefix}.gate_up_proj" in checkpoint.tensors:  # fused, as locate_experts decides
            tensors |= {f"{prefix}.gate_up_proj", f"{prefix}.down_proj"}
        else:
            suffixes = QUANTIZED_SUFFIXES[spec.quantization.format] if spec.quantization else ("weight",)
            names = (f"{prefix}.{e}.{n}" for e in range(spec.num_experts) for n in spec.expert_names)
            tensors |= {f"{name}.{suffix}" for name in names for suffix in suffixes}
    return layouts, tensors


def _make_empty_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise CheckpointError(out_dir, "exists and is not a directory")
        if any(out_dir.iterdir()):
            raise CheckpointError(out_dir, "exists and is not empty; repack writes only to a new or empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)


def _write_resident(checkpoint: Checkpoint, expert_tensors: set[str], path: Path) -> int:
    """Copy every non-expert tensor's bytes unchanged, in the source's order, into one safetensors file."""
    infos = sorted(
        (t for name, t in checkpoint.tensors.items() if name not in expert_tensors), key=lambda t: (t.path, t.start)
    )
    writer = SafetensorsWriter(path, [(t.name, t.dtype, t.shape) for t in infos])
    try:
        for info in infos:
            raw = np.empty(info.nbytes, np.uint8)
            checkpoint.read_into(info.path, info.start, raw, info.name)
            writer.write(info.name, memoryview(raw))
    finally:
        writer.close()
    _fsync(path)
    return path.stat().st_size


def _write_experts(
    checkpoint: Checkpoint,
    spec: DecoderSpec,
    layouts: dict[tuple[int, int], ExpertLayout],
    path: Path,
    format: str,
    group_size: int,
    align: int,
    tally: _ErrorTally,
) -> dict[tuple[int, int], ExpertEntry]:
    shapes = expert_shapes(spec)
    entries = {}
    with open(path, "wb") as f:
        for (layer, expert), layout in layouts.items():
            start = _pad(f, align)
            matrices = {}
            for name, ranges in (("gate_up", layout.gate_up), ("down", (layout.down,))):
                columns = shapes[name][1]
                w = np.concatenate([_read_float32(checkpoint, r, columns) for r in ranges]).reshape(shapes[name])
                packed = _quantize(w, format, group_size, ranges)
                tally.add(w, packed, f"layer {layer} expert {expert} {name}")
                offset = _pad(f, quant.ALIGN, start) - start
                data = quant.to_bytes(packed)
                f.write(data)
                matrices[name] = MatrixEntry(offset, len(data), shapes[name], format, group_size)
            entries[(layer, expert)] = ExpertEntry(
                layer, expert, EXPERTS_FILE, start, f.tell() - start, matrices["gate_up"], matrices["down"]
            )
        _pad(f, align)
        f.flush()
        os.fsync(f.fileno())
    return entries


def _pad(f: BinaryIO, align: int, base: int = 0) -> int:
    """Write zero bytes up to the next multiple of ``align`` past ``base``; return the new position."""
    padding = -(f.tell() - base) % align
    f.write(bytes(padding))
    return f.tell()


def _read_float32(checkpoint: Checkpoint, r: ByteRange, columns: int) -> np.ndarray:
    raw = np.empty(r.nbytes, np.uint8)
    checkpoint.read_into(r.path, r.offset, raw, r.tensor)
    if r.scales is None:
        return to_float32(raw, r.dtype)
    scales = np.empty(r.scales.nbytes, np.uint8)
    checkpoint.read_into(r.scales.path, r.scales.offset, scales, r.scales.tensor)
    return quant.dequantize(r.packed(raw, scales, columns)).reshape(-1)


def _quantize(w: np.ndarray, format: str, group_size: int, ranges: tuple[ByteRange, ...]) -> quant.PackedMatrix:
    try:
        return quant.quantize(w, format, group_size)
    except ValueError as e:  # non-finite weights, or too large for int4's float16 scales
        tensors = " + ".join(r.tensor for r in ranges)
        raise CheckpointError(ranges[0].path, f"cannot pack as {format}: {e}", tensor=tensors) from None


def _write_manifest(manifest: RepackManifest) -> None:
    final = manifest.path / MANIFEST_FILE
    temporary = final.with_name(MANIFEST_FILE + ".tmp")
    temporary.write_text(json.dumps(manifest.to_dict(), indent=1) + "\n")
    _fsync(temporary)
    os.replace(temporary, final)
    _fsync(manifest.path)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a directory) to the disk, so the manifest never outlives the data it describes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
