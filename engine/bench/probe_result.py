"""A disk probe's result: random-read bandwidth per block size and queue depth, as stored and interpolated."""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

from engine.errors import EngineError
from engine.units import format_bytes

SCHEMA_VERSION = 3  # 2: huge_pages; 3: mechanism


class ProbeError(EngineError):
    """The disk cannot be probed: no direct I/O, a failed or short read, or an unusable directory."""


@dataclass(frozen=True)
class ProbeCell:
    """One measured (block size, queue depth) point. ``requests`` and ``seconds`` are summed over the repeats."""

    block_bytes: int
    queue_depth: int
    bytes_per_s: float  # median over the repeats
    requests: int
    seconds: float


@dataclass(frozen=True)
class ProbeResult:
    """Random-read bandwidth of one device, on a full grid of block sizes x queue depths."""

    machine: str
    device: str
    directory: str
    direct: bool
    cache_bypass: str  # "O_DIRECT" (Linux) or "F_NOCACHE" (macOS)
    huge_pages: bool  # read buffers backed by transparent huge pages (see probe_directory)
    mechanism: str  # "aio" (Linux native AIO, one thread) or "threads" (one thread per request in flight)
    file_bytes: int
    measured_at: str  # UTC, ISO 8601
    cells: tuple[ProbeCell, ...]

    def __post_init__(self) -> None:
        if not self.cells:
            raise ValueError("ProbeResult.cells is empty")
        seen = {(c.block_bytes, c.queue_depth) for c in self.cells}
        if len(seen) != len(self.cells):
            raise ValueError("ProbeResult.cells holds the same (block_bytes, queue_depth) twice")
        blocks, depths = self.block_sizes, self.queue_depths
        if len(seen) != len(blocks) * len(depths):
            raise ValueError(f"ProbeResult.cells is not a full grid of block sizes {blocks} x queue depths {depths}")
        for c in self.cells:
            if c.block_bytes <= 0 or c.queue_depth <= 0 or not c.bytes_per_s > 0:
                raise ValueError(f"ProbeResult.cells: non-positive value in {c}")

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({c.block_bytes for c in self.cells}))

    @property
    def queue_depths(self) -> tuple[int, ...]:
        return tuple(sorted({c.queue_depth for c in self.cells}))

    def cell(self, block_bytes: int, queue_depth: int) -> ProbeCell | None:
        for c in self.cells:
            if c.block_bytes == block_bytes and c.queue_depth == queue_depth:
                return c
        return None

    def bandwidth(self, block_bytes: int, queue_depth: int) -> float:
        """Bytes/s for a read pattern: the measured cell, else bilinear in log2(block) and log2(queue depth).

        Outside the measured range each coordinate is clamped to the nearest measured value, i.e. extrapolation
        by the nearest cell. That is fine for a roofline estimate; it is never applied to user input.
        """
        for name, value in (("block_bytes", block_bytes), ("queue_depth", queue_depth)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        exact = self.cell(block_bytes, queue_depth)
        if exact is not None:
            return exact.bytes_per_s
        blocks, depths = self.block_sizes, self.queue_depths
        bi, bj, bt = _bracket([math.log2(b) for b in blocks], math.log2(block_bytes))
        qi, qj, qt = _bracket([math.log2(q) for q in depths], math.log2(queue_depth))
        value = {(c.block_bytes, c.queue_depth): c.bytes_per_s for c in self.cells}

        def at(b: int, q: int) -> float:
            return value[(blocks[b], depths[q])]

        low = at(bi, qi) * (1 - qt) + at(bi, qj) * qt
        high = at(bj, qi) * (1 - qt) + at(bj, qj) * qt
        return low * (1 - bt) + high * bt

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "machine": self.machine,
            "device": self.device,
            "directory": self.directory,
            "direct": self.direct,
            "cache_bypass": self.cache_bypass,
            "huge_pages": self.huge_pages,
            "mechanism": self.mechanism,
            "file_bytes": self.file_bytes,
            "measured_at": self.measured_at,
            "cells": [
                {
                    "block_bytes": c.block_bytes,
                    "queue_depth": c.queue_depth,
                    "bytes_per_s": c.bytes_per_s,
                    "requests": c.requests,
                    "seconds": c.seconds,
                }
                for c in self.cells
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        if not isinstance(data, dict):
            raise ValueError(f"a probe result must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {version!r} is not the supported {SCHEMA_VERSION}")
        try:
            cells = tuple(
                ProbeCell(
                    block_bytes=int(c["block_bytes"]),
                    queue_depth=int(c["queue_depth"]),
                    bytes_per_s=float(c["bytes_per_s"]),
                    requests=int(c["requests"]),
                    seconds=float(c["seconds"]),
                )
                for c in data["cells"]
            )
            return cls(
                machine=str(data["machine"]),
                device=str(data["device"]),
                directory=str(data["directory"]),
                direct=bool(data["direct"]),
                cache_bypass=str(data["cache_bypass"]),
                huge_pages=bool(data["huge_pages"]),
                mechanism=str(data["mechanism"]),
                file_bytes=int(data["file_bytes"]),
                measured_at=str(data["measured_at"]),
                cells=cells,
            )
        except KeyError as e:
            raise ValueError(f"probe result is missing the field {e.args[0]!r}") from None
        except TypeError as e:
            raise ValueError(f"probe result has a field of the wrong type: {e}") from None


def _bracket(axis: list[float], x: float) -> tuple[int, int, float]:
    """Indices (i, j) around x on a sorted axis and the weight t of j; clamped at both ends."""
    if x <= axis[0]:
        return 0, 0, 0.0
    if x >= axis[-1]:
        last = len(axis) - 1
        return last, last, 0.0
    i = bisect_right(axis, x) - 1
    return i, i + 1, (x - axis[i]) / (axis[i + 1] - axis[i])


def format_table(result: ProbeResult) -> str:
    """Markdown table: a row per block size, a column per queue depth, in MB/s (1 MB = 1e6 bytes)."""
    depths = result.queue_depths
    lines = [
        "| block | " + " | ".join(f"QD {q}" for q in depths) + " |",
        "| --- | " + " | ".join("---:" for _ in depths) + " |",
    ]
    for b in result.block_sizes:
        row = " | ".join(f"{result.bandwidth(b, q) / 1e6:.0f} MB/s" for q in depths)
        lines.append(f"| {format_bytes(b)} | {row} |")
    return "\n".join(lines)
