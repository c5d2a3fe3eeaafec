"""Parse a safetensors header into validated byte ranges, without reading any tensor data.

Format: 8-byte little-endian header length N, then N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data section; offsets are relative to the data section's start (byte 8 + N).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from engine.errors import CheckpointError

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# No real checkpoint has a header near this size; a larger length means a corrupt file.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in its file (absolute offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    path: str

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Read and validate the header of one safetensors file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(path, f"file is {file_size} bytes, too short for the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, file_size - 8):
                raise CheckpointError(
                    path, f"header length {header_len} runs beyond the file's {file_size} bytes (truncated?)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror}") from e
    return parse_header(raw, file_size, str(path))


def parse_header(raw: bytes, file_size: int, path: str) -> dict[str, TensorInfo]:
    """Validate the JSON header ``raw`` of a file of ``file_size`` bytes; raise CheckpointError on any fault."""
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    if data_size < 0:
        raise CheckpointError(path, f"header of {len(raw)} bytes does not fit in a file of {file_size} bytes")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(path, f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, f"header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "__metadata__ must map strings to strings")

    tensors = {name: _parse_entry(name, entry, data_start, data_size, path) for name, entry in header.items()}
    _check_no_overlap(tensors.values(), path)
    return tensors


def _parse_entry(name: str, entry: object, data_start: int, data_size: int, path: str) -> TensorInfo:
    def fail(message: str) -> CheckpointError:
        return CheckpointError(path, message, tensor=name)

    if not isinstance(entry, dict):
        raise fail(f"entry must be an object, got {type(entry).__name__}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise fail(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_SIZES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise fail(f"shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise fail(f"data_offsets must be [begin, end] with non-negative integers, got {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise fail(f"data_offsets begin {begin} is after end {end}")
    if end > data_size:
        raise fail(f"data ends at byte {end} of the data section but the file holds only {data_size} (truncated?)")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise fail(f"holds {end - begin} bytes but {dtype} {shape} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end, path)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(tensors: object, path: str) -> None:
    previous: TensorInfo | None = None
    for info in sorted(tensors, key=lambda t: (t.start, t.end)):  # type: ignore[attr-defined]
        if info.nbytes == 0:
            continue
        if previous is not None and info.start < previous.end:
            raise CheckpointError(path, f"bytes overlap those of tensor '{previous.name}'", tensor=info.name)
        previous = info


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, so a multi-GiB checkpoint never sits in RAM at once.

    The header is fixed first from the declared (name, dtype, shape) list; then each tensor's bytes
    are appended in that order. (The ``safetensors`` package needs every tensor up front and has no bf16
    in its numpy API, which is why synthetic checkpoints use this writer.)
    """

    def __init__(
        self, path: str | Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
    ):
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.sizes: list[tuple[str, int]] = []
        for name, dtype, shape in entries:
            size = math.prod(shape) * DTYPE_SIZES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.sizes.append((name, size))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, data: bytes | memoryview) -> None:
        expected_name, size = self.sizes[self.next]
        if name != expected_name or len(data) != size:
            raise ValueError(f"expected {size} bytes of '{expected_name}', got {len(data)} bytes of '{name}'")
        self.file.write(data)
        self.next += 1

    def close(self) -> None:
        self.file.close()
        if self.next != len(self.sizes):
            raise ValueError(f"{len(self.sizes) - self.next} declared tensors were never written")
