"""Expert reads: byte ranges of a checkpoint into float32 arrays, on a pool of reader threads.

Three modes, as ``EngineConfig.io_mode`` names them:

- ``pread``: buffered ``os.preadv`` (the page cache keeps what was read);
- ``direct``: ``O_DIRECT`` (``F_NOCACHE`` on macOS) into page-aligned buffers, each range widened to page
  boundaries as direct I/O requires;
- ``mmap``: the files mapped once, bytes converted straight from the mapping, so the page cache is the only
  cache and page faults are the reads (what llama.cpp does).

A range is cut into ``io_block_bytes`` requests, of which ``io_threads`` are kept in flight: under ``direct``
on Linux by native AIO (``engine.streaming.aio.ReadQueue``: submitted from the caller, completed by one reaper thread,
as fio's libaio engine reads), elsewhere by as many worker threads, each blocking in ``os.preadv``. A pool of
workers reached 0.67-0.86 of the probe's bandwidth under ``direct`` on the project's machine, AIO 0.9-1.0.
Each ``fetch`` reads one expert; whoever completes its last request converts it into the caller's arrays (on
a worker thread, so the reaper keeps reaping). Reads release the GIL, so the compute thread runs while they
are in flight. Buffers come from a pool: after warm-up the hot path allocates no memory.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from engine.buffers import PAGE, Slot, SlotPool
from engine.config import IO_MODES
from engine.errors import CheckpointError
from engine.formats.checkpoint import to_float32
from engine.formats.expert_layout import ExpertData, ExpertLayout, ExpertWeights, PackedExpert
from engine.formats.quant import PackedMatrix, dequantize
from engine.formats.repack_manifest import unpack_expert
from engine.formats.safetensors_file import DTYPE_SIZES
from engine.streaming import aio

# A checkpoint's float dtypes as packed formats the kernels compute from, and their numpy element types.
STORED_FORMATS = {"F32": ("fp32", np.float32), "F16": ("fp16", np.float16), "BF16": ("bf16", np.uint16)}
NO_SCALES = np.empty(0, np.float32)


def open_uncached(path: str) -> tuple[int, str]:
    """A read-only descriptor whose reads bypass the page cache, and how: O_DIRECT (Linux) or F_NOCACHE (macOS)."""
    if hasattr(os, "O_DIRECT"):
        return os.open(path, os.O_RDONLY | os.O_DIRECT), "O_DIRECT"
    import fcntl

    if sys.platform == "darwin" and hasattr(fcntl, "F_NOCACHE"):
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
        except OSError:
            os.close(fd)
            raise
        return fd, "F_NOCACHE"
    raise OSError(f"no way to bypass the page cache on {sys.platform} (need O_DIRECT or F_NOCACHE)")


@dataclass
class IoStats:
    bytes_read: int = 0  # bytes requested from the files (page-widened under direct I/O)
    reads: int = 0  # read requests issued
    read_seconds: float = 0.0  # summed over requests: with N in flight, up to N x the wall time


@dataclass(frozen=True)
class _Piece:
    """One byte range of an expert: where it is read from, where its raw bytes land, where it is converted to."""

    path: str
    offset: int  # file offset of the first byte read (page-aligned under direct I/O)
    nbytes: int  # bytes read
    skip: int  # bytes read before the range's own first byte
    length: int  # the range's own bytes
    slot_offset: int  # where the read lands in the raw slot
    dtype: str
    tensor: str
    target: int  # 0: gate_up, 1: down
    element: int  # first element of the target written


class _AlreadyFinished:
    """The finish of a fetch completed by the thread that makes it (a mapping's views): no event to wait on, and
    none to make (an event's lock and condition cost more than the rest of such a fetch)."""

    def is_set(self) -> bool:
        return True

    def wait(self) -> bool:
        return True

    def set(self) -> None:
        pass


_ALREADY_FINISHED = _AlreadyFinished()


class Fetch:
    """One expert being read: ``wait`` returns its data (or raises the read's error).

    The data is ``weights`` (float32, converted) when the fetch was given arrays, else a ``PackedExpert`` of
    the bytes as stored, in a slot that the caller returns with ``ExpertReader.give_slot`` when done with it.
    ``immediate``: the caller finishes it before handing it out.
    """

    def __init__(self, weights: ExpertWeights | None, pending: int, immediate: bool = False) -> None:
        self.weights = weights
        self.result: ExpertData | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._pending = pending
        self._lock = threading.Lock()
        self._finished = _ALREADY_FINISHED if immediate else threading.Event()
        self.bytes_read = 0

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self) -> ExpertData:
        self._finished.wait()
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise RuntimeError("a cancelled fetch has no data")
        return self.result

    @property
    def abandoned(self) -> bool:
        """Cancelled, or failed already: its remaining requests are skipped."""
        return self.cancelled or self.error is not None

    def cancel(self) -> None:
        """Skip the requests not yet started; the fetch still finishes (``wait`` returns), its data incomplete."""
        self.cancelled = True


def _abandoned(token: tuple) -> bool:
    """Whether an AIO request's fetch no longer wants it."""
    return token[0].abandoned


def plan_pieces(layout: ExpertLayout, mode: str) -> list[_Piece]:
    """The pieces of ``layout`` as ``mode`` reads them: under ``direct`` each range widened to page boundaries."""
    direct = mode == "direct"
    pieces, at = [], 0
    targets = ((0, layout.gate_up),) if layout.down is None else ((0, layout.gate_up), (1, (layout.down,)))
    for target, matrices in targets:
        element = 0
        for r in (piece for m in matrices for piece in ((m,) if m.scales is None else (m, m.scales))):
            skip = r.offset % PAGE if direct else 0
            nbytes = -(-(skip + r.nbytes) // PAGE) * PAGE if direct else r.nbytes
            pieces.append(
                _Piece(r.path, r.offset - skip, nbytes, skip, r.nbytes, at, r.dtype, r.tensor, target, element)
            )
            at += nbytes
            element += r.nbytes // DTYPE_SIZES[r.dtype]
    return pieces


def issues_reads(mode: str, repacked: bool, packed: bool) -> bool:
    """Whether a fetch reads (and counts) bytes: under ``mmap`` the mapping itself serves packed experts and
    repacked ones (dequantized from it), so nothing is read then; the page faults are the reads."""
    return not (mode == "mmap" and (packed or repacked))


class ExpertReader:
    """Reads whole experts in ``mode`` with ``threads`` requests of ``block_bytes`` in flight."""

    def __init__(
        self,
        layouts: list[ExpertLayout],
        mode: str,
        block_bytes: int,
        threads: int,
        hidden_size: int,
        intermediate_size: int,
    ) -> None:
        if mode not in IO_MODES:
            raise ValueError(f"io_mode must be one of {', '.join(IO_MODES)}, got {mode!r}")
        if block_bytes <= 0 or block_bytes % PAGE:
            raise ValueError(f"io_block_bytes must be a positive multiple of {PAGE}, got {block_bytes}")
        if threads < 1:
            raise ValueError(f"io_threads must be at least 1, got {threads}")
        self.mode, self.block_bytes, self.threads = mode, block_bytes, threads
        self._columns = (hidden_size, intermediate_size)  # of gate_up and of down
        self.stats = IoStats()
        self._stats_lock = threading.Lock()
        files = sorted({r.path for layout in layouts for r in layout.byte_ranges})
        self.fds: dict[str, int] = {}
        self._maps: dict[str, tuple[mmap.mmap, np.ndarray]] = {}
        self._map_fds: dict[str, int] = {}  # to check a mapped file's size: touching past its end is SIGBUS
        self._mapped: dict[int, tuple[ExpertLayout, PackedExpert]] = {}  # by layout identity, as _plans
        try:
            for path in files:
                if mode == "mmap":
                    self._map_fds[path] = fd = os.open(path, os.O_RDONLY)
                    mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                    self._maps[path] = (mapping, np.frombuffer(mapping, np.uint8))
                elif mode == "direct":
                    self.fds[path] = open_uncached(path)[0]
                else:
                    self.fds[path] = fd = os.open(path, os.O_RDONLY)
                    if hasattr(os, "posix_fadvise"):  # random reads: fetch exactly what is asked, no readahead
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except OSError as e:
            self.close()
            path = getattr(e, "filename", None) or files[0]
            raise CheckpointError(path, f"cannot open for {mode} reads: {e}") from None
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="expert-io")
        self._queue = None
        if mode == "direct" and aio.available():
            self._queue = aio.ReadQueue(threads, self._read_done, _abandoned)
        # by identity (the layout kept beside its plan): hashing a layout's ranges on every fetch cost more than
        # the rest of planning it
        self._plans = {id(layout): (layout, plan_pieces(layout, mode)) for layout in layouts}
        slot_bytes = max((sum(p.nbytes for p in self.plan(layout)) for layout in layouts), default=PAGE)
        self.slots = SlotPool(slot_bytes, huge=mode == "direct")

    def plan(self, layout: ExpertLayout) -> list[_Piece]:
        """The pieces of ``layout`` as this mode reads them (planned once for the reader's own layouts)."""
        planned = self._plans.get(id(layout))
        return planned[1] if planned is not None and planned[0] is layout else plan_pieces(layout, self.mode)

    def fetch(self, layout: ExpertLayout, weights: ExpertWeights | None) -> Fetch:
        """Start reading ``layout``: converted into ``weights``, or, without them, kept as stored (packed)."""
        pieces = self.plan(layout)
        if not issues_reads(self.mode, repacked=layout.packed_on_disk, packed=weights is None):
            if weights is None:  # the mapping is the data: nothing to read now
                fetch = Fetch(weights, 0, immediate=True)
                self._finish(fetch, None, layout)
            else:  # packed bytes in the mapping, dequantized by a worker
                fetch = Fetch(weights, 0)
                self._pool.submit(self._finish, fetch, None, layout)
            return fetch
        requests = [
            (piece, start, min(self.block_bytes, piece.nbytes - start))
            for piece in pieces
            for start in range(0, piece.nbytes, self.block_bytes)
        ]
        fetch = Fetch(weights, len(requests))
        slot = None if self.mode == "mmap" else self.slots.take()
        if self._queue is not None and slot is not None:
            self._queue.put(
                (
                    self.fds[piece.path],
                    slot.address + piece.slot_offset + start,
                    size,
                    piece.offset + start,
                    (fetch, slot, layout, piece, start, size),
                )
                for piece, start, size in requests
            )
            return fetch
        for piece, start, size in requests:
            self._pool.submit(self._request, fetch, slot, layout, piece, start, size)
        return fetch

    def _request(
        self, fetch: Fetch, slot: Slot | None, layout: ExpertLayout, piece: _Piece, start: int, size: int
    ) -> None:
        elapsed, done, error = 0.0, 0, None
        if not fetch.abandoned:
            try:
                began = time.perf_counter()
                if slot is None:
                    self._convert_mapped(fetch.weights, piece, start, size)
                else:
                    self._read(slot, piece, start, size)
                elapsed, done = time.perf_counter() - began, size
            except BaseException as e:  # handed to whoever waits for the fetch
                error = e
        if self._complete(fetch, done, elapsed, error):
            self._finish(fetch, slot, layout)

    def _read_done(self, token: tuple, result: int | None, seconds: float) -> None:
        """An AIO read's completion (``result`` None: skipped); the last of a fetch's is finished by a worker."""
        fetch, slot, layout, piece, start, size = token
        error = None
        if result is not None and result < 0:
            error = CheckpointError(
                piece.path, f"read of {size} bytes at offset {piece.offset + start} failed: {os.strerror(-result)}"
            )
        elif result is not None:
            error = self._short_read(piece, start, size, result)
        done = size if result is not None and error is None else 0
        if self._complete(fetch, done, seconds, error):
            if fetch.weights is None and fetch.error is None:
                self._finish(fetch, slot, layout)  # views of the slot: nothing to compute
            else:
                self._pool.submit(self._finish, fetch, slot, layout)

    def _complete(self, fetch: Fetch, done: int, elapsed: float, error: BaseException | None) -> bool:
        """Count one request of ``fetch`` as finished; whether it was the last."""
        with fetch._lock:
            fetch.error = fetch.error or error
            fetch._pending -= 1
            fetch.bytes_read += done
            last = fetch._pending == 0
        if done:
            with self._stats_lock:
                self.stats.reads += 1
                self.stats.bytes_read += done
                self.stats.read_seconds += elapsed
        return last

    def _read(self, slot: Slot, piece: _Piece, start: int, size: int) -> None:
        at = piece.slot_offset + start
        got = os.preadv(self.fds[piece.path], [slot.array[at : at + size]], piece.offset + start)
        error = self._short_read(piece, start, size, got)
        if error is not None:
            raise error

    @staticmethod
    def _short_read(piece: _Piece, start: int, size: int, got: int) -> CheckpointError | None:
        needed = min(size, piece.skip + piece.length - start)  # a direct read may stop at the end of the file
        if got >= needed:
            return None
        return CheckpointError(
            piece.path, f"read {got} of {size} bytes at offset {piece.offset + start} (truncated?)", tensor=piece.tensor
        )

    def _convert_mapped(self, weights: ExpertWeights, piece: _Piece, start: int, size: int) -> None:
        view = self._maps[piece.path][1]
        self._check_mapped(piece, piece.offset + start + size)
        item = DTYPE_SIZES[piece.dtype]
        first = piece.element + start // item
        target = weights[piece.target].reshape(-1)[first : first + size // item]
        to_float32(view[piece.offset + start : piece.offset + start + size], piece.dtype, target)

    def _finish(self, fetch: Fetch, slot: Slot | None, layout: ExpertLayout) -> None:
        pieces = self.plan(layout)
        keep_slot = False
        try:
            if fetch.error is None and not fetch.cancelled:
                if fetch.weights is None:
                    fetch.result = self._packed(slot, layout)
                    keep_slot = True
                elif layout.packed_on_disk:
                    packed = self._packed(slot, layout)
                    for parts, out in zip((packed.gate_up, (packed.down,)), fetch.weights, strict=True):
                        row = 0
                        for matrix in parts:
                            np.copyto(out[row : row + matrix.shape[0]], dequantize(matrix))
                            row += matrix.shape[0]
                    fetch.result = fetch.weights
                else:
                    if slot is not None:
                        for piece, raw in zip(pieces, self._raw(slot, pieces), strict=True):
                            count = piece.length // DTYPE_SIZES[piece.dtype]
                            to_float32(
                                raw, piece.dtype, fetch.weights[piece.target].reshape(-1)[piece.element :][:count]
                            )
                    fetch.result = fetch.weights
        except BaseException as e:
            fetch.error = e
        finally:
            if slot is not None and not keep_slot:
                self.give_slot(slot)
            fetch._finished.set()

    def _raw(self, slot: Slot | None, pieces: list[_Piece]) -> list[np.ndarray]:
        """Each piece's own bytes: in the slot it was read into, or in the mapping."""
        raws = []
        for piece in pieces:
            if slot is None:
                raws.append(self._maps[piece.path][1][piece.offset : piece.offset + piece.length])
            else:
                start = piece.slot_offset + piece.skip
                raws.append(slot.array[start : start + piece.length])
        return raws

    def _packed(self, slot: Slot | None, layout: ExpertLayout) -> PackedExpert:
        if slot is None:  # views of the mapping: made (and the file's size checked) once per expert
            mapped = self._mapped.get(id(layout))
            if mapped is None or mapped[0] is not layout:
                for piece in self.plan(layout):
                    self._check_mapped(piece, piece.offset + piece.length)
                self._mapped[id(layout)] = mapped = (layout, self._views(None, layout))
            return mapped[1]
        return self._views(slot, layout)

    def _views(self, slot: Slot | None, layout: ExpertLayout) -> PackedExpert:
        pieces = self.plan(layout)
        if layout.repacked is not None:
            gate_up, down = unpack_expert(self._raw(slot, pieces)[0], layout.repacked)
            return PackedExpert((gate_up,), down, slot)
        parts: tuple[list[PackedMatrix], list[PackedMatrix]] = ([], [])
        raws = iter(self._raw(slot, pieces))
        for target, ranges in enumerate((layout.gate_up, (layout.down,))):
            columns = self._columns[target]
            for r in ranges:
                if r.scales is None:
                    format, dtype = STORED_FORMATS[r.dtype]
                    data = next(raws).view(dtype).reshape(-1, columns)
                    parts[target].append(PackedMatrix(format, data.shape, 0, data, NO_SCALES))
                else:
                    parts[target].append(r.packed(next(raws), next(raws), columns))
        return PackedExpert(tuple(parts[0]), parts[1][0], slot)

    def _check_mapped(self, piece: _Piece, end: int) -> None:
        file_bytes = os.fstat(self._map_fds[piece.path]).st_size
        if end > file_bytes:
            raise CheckpointError(
                piece.path, f"ends at {file_bytes} bytes, before {end} (truncated?)", tensor=piece.tensor
            )

    def give_slot(self, slot: Slot) -> None:
        """Return a slot that a packed fetch handed out."""
        self.slots.give(slot)

    def close(self) -> None:
        queue = getattr(self, "_queue", None)
        if queue is not None:
            queue.close()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        for fd in (*self.fds.values(), *self._map_fds.values()):
            os.close(fd)
        self.fds.clear()
        self._map_fds.clear()
        mappings = [mapping for mapping, _ in self._maps.values()]
        self._maps.clear()  # drops the views, so the mappings can close
        self._mapped.clear()
        for mapping in mappings:
            with contextlib.suppress(BufferError):  # a view still held (say, by a traceback) keeps it until freed
                mapping.close()
        if hasattr(self, "slots"):
            self.slots.close()
