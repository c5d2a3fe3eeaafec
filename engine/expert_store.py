"""Every access to expert weights goes through an ExpertStore; experts are never loaded wholesale.

An expert is a SwiGLU MLP: ``gate_up`` [2I, H] (gate rows, then up rows) and ``down`` [H, I].
On disk it is either three per-expert tensors (gate, up, down) or one slice of each fused
``[E, 2I, H]`` / ``[E, H, I]`` tensor; in both layouts each piece is one contiguous byte range.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from engine.checkpoint import Checkpoint, to_float32
from engine.errors import CheckpointError
from engine.safetensors_file import TensorInfo


class ExpertWeights(NamedTuple):
    gate_up: np.ndarray  # [2I, H] float32
    down: np.ndarray  # [H, I] float32


@dataclass(frozen=True)
class ByteRange:
    """One contiguous piece of an expert in a checkpoint file."""

    path: str
    offset: int
    nbytes: int
    dtype: str
    tensor: str


@dataclass(frozen=True)
class ExpertLayout:
    """Where one expert's bytes are: ``gate_up`` as one fused range or two (gate, up), then ``down``."""

    gate_up: tuple[ByteRange, ...]
    down: ByteRange

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.gate_up) + self.down.nbytes


@dataclass
class StoreStats:
    bytes_read: int = 0
    experts_loaded: int = 0
    reads: int = 0  # read requests issued (bytes_read / reads is the mean request size)
    read_seconds: float = 0.0  # time spent waiting in reads


@dataclass
class ExpertStore(ABC):
    """Serves expert weights by (layer, expert) and counts what it read."""

    hidden_size: int
    intermediate_size: int
    stats: StoreStats = field(default_factory=StoreStats)

    @abstractmethod
    def get(self, layer: int, expert: int) -> ExpertWeights: ...


class PreadExpertStore(ExpertStore):
    """Reads exactly one expert's byte ranges with ``os.preadv`` on every access (no cache).

    Reads and conversions go into buffers allocated once, so ``get`` allocates nothing: the arrays
    it returns are overwritten by the next ``get``; use or copy them before asking for another expert.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        layouts: dict[tuple[int, int], ExpertLayout],
        hidden_size: int,
        intermediate_size: int,
    ):
        super().__init__(hidden_size, intermediate_size)
        self.checkpoint = checkpoint
        self.layouts = layouts
        self._raw = np.empty(max((layout.nbytes for layout in layouts.values()), default=0), np.uint8)
        self._gate_up = np.empty((2 * intermediate_size, hidden_size), np.float32)
        self._down = np.empty((hidden_size, intermediate_size), np.float32)

    def get(self, layer: int, expert: int) -> ExpertWeights:
        layout = self.layouts[(layer, expert)]
        at = 0
        started = time.perf_counter()
        for r in (*layout.gate_up, layout.down):
            self.checkpoint.read_into(r.path, r.offset, self._raw[at : at + r.nbytes], r.tensor)
            at += r.nbytes
        self.stats.read_seconds += time.perf_counter() - started
        self.stats.reads += len(layout.gate_up) + 1
        split = at - layout.down.nbytes
        to_float32(self._raw[:split], layout.gate_up[0].dtype, self._gate_up.reshape(-1))
        to_float32(self._raw[split:at], layout.down.dtype, self._down.reshape(-1))
        self.stats.bytes_read += at
        self.stats.experts_loaded += 1
        return ExpertWeights(self._gate_up, self._down)


def locate_experts(
    checkpoint: Checkpoint,
    prefix: str,
    num_experts: int,
    hidden_size: int,
    intermediate_size: int,
    names: tuple[str, str, str],
) -> dict[int, ExpertLayout]:
    """Find each expert's byte ranges under ``prefix`` (e.g. ``model.layers.3.mlp.experts``).

    ``names`` are the per-expert projection names (gate, up, down): ``gate_proj/up_proj/down_proj``
    or Mixtral's ``w1/w3/w2``. Fused ``gate_up_proj`` / ``down_proj`` tensors are used when present.
    """
    h, i, e_count = hidden_size, intermediate_size, num_experts
    fused_name = f"{prefix}.gate_up_proj"
    if fused_name in checkpoint.tensors:
        gate_up = checkpoint.info(fused_name, (e_count, 2 * i, h))
        down = checkpoint.info(f"{prefix}.down_proj", (e_count, h, i))
        return {e: ExpertLayout((_slice(gate_up, e, e_count),), _slice(down, e, e_count)) for e in range(e_count)}
    gate, up, down_name = names
    layouts = {}
    for e in range(e_count):
        pieces = [
            checkpoint.info(f"{prefix}.{e}.{n}.weight", s)
            for n, s in ((gate, (i, h)), (up, (i, h)), (down_name, (h, i)))
        ]
        if pieces[0].dtype != pieces[1].dtype:
            raise CheckpointError(
                pieces[1].path,
                f"dtype {pieces[1].dtype} differs from its gate's {pieces[0].dtype}",
                tensor=pieces[1].name,
            )
        layouts[e] = ExpertLayout(tuple(_whole(p) for p in pieces[:2]), _whole(pieces[2]))
    return layouts


def _whole(info: TensorInfo) -> ByteRange:
    return ByteRange(info.path, info.start, info.nbytes, info.dtype, info.name)


def _slice(info: TensorInfo, expert: int, count: int) -> ByteRange:
    size = info.nbytes // count
    return ByteRange(info.path, info.start + expert * size, size, info.dtype, f"{info.name}[{expert}]")
