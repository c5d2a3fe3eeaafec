"""Disk probe: random-read bandwidth of a directory's device per block size and queue depth, bypassing the page cache.

On Linux the reads go through native AIO (``engine.streaming.aio``), as fio's ``libaio`` engine issues them: one thread
keeps ``queue_depth`` requests in flight, reaping completions and resubmitting them, in a numba-compiled loop
(the same loop in Python cost 10-20 µs per request, which held 16 KiB reads to 0.7-0.8 of fio's bandwidth).
Elsewhere queue depth is the number of threads, each blocking in ``os.preadv`` (which releases the GIL) on its
own buffer; threads measured 0.75-0.8 of fio's bandwidth at queue depth 8 here (two cores, eight threads).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from engine.bench.device import (
    ALIGN,
    DEFAULT_FILE_BYTES,
    check_directory,
    check_positive_int,
    device_name,
    machine_id,
    open_direct,
    scratch_file,
)
from engine.bench.probe_result import ProbeCell, ProbeError, ProbeResult
from engine.buffers import AlignedBuffer, huge_pages_available
from engine.streaming import aio

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
DEFAULT_BLOCK_SIZES = (16 * KiB, 256 * KiB, 2 * MiB)
DEFAULT_QUEUE_DEPTHS = (1, 8, 32)
# The grid an engine's roofline reads: its request sizes and queue depths, into huge-page buffers like the
# reader's slots (``autoresearch bench`` and ``simulate``, the engine and simulator reports).
ENGINE_GRID: dict[str, Any] = {"block_sizes": (256 * KiB, MiB, 2 * MiB), "queue_depths": (1, 4, 8), "huge_pages": True}
OFFSET_BATCH = 1024
MECHANISMS = ("aio", "threads")


PROBE_VERSION = 2  # in the cache file's name: a probe measured by older code is measured again. 2: fio's submission

# A shared or virtual disk's speed drifts: the project's machine probed 1.5 GB/s one night and 2.5 GB/s the next
# morning (1 MiB reads, 4 in flight), so efficiencies against the older probe were overstated by up to 1.6x. A
# cached probe older than this is measured again (about a minute), so that rooflines describe the disk as it is.
MAX_AGE_S = 6 * 3600


def _check_sizes(name: str, values: Iterable[object], multiple_of: int = 1) -> tuple[int, ...]:
    if isinstance(values, int | str | bytes):
        raise ValueError(f"{name} must be a sequence of integers, got {values!r}")
    checked = tuple(sorted({check_positive_int(f"{name} value", v, multiple_of) for v in values}))
    if not checked:
        raise ValueError(f"{name} must not be empty")
    return checked


@dataclass
class _Run:
    """One queue-depth-wide burst of random reads: what the threads did together, and the first failure."""

    requests: int = 0
    started: float = math.inf
    finished: float = 0.0
    error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, error: BaseException) -> None:
        with self.lock:
            self.error = self.error or error


def _random_offsets(seed: int, nblocks: int, block: int) -> Iterator[int]:
    """Uniform block-aligned offsets, drawn in batches.

    Drawing each offset with random.randrange cost 30% more CPU per 16 KiB read at queue depth 32 (26 against
    20 us, user + system, on 2 cores): longer GIL holds, so more contention among the threads.
    """
    rng = np.random.default_rng(seed)
    while True:
        yield from (rng.integers(0, nblocks, OFFSET_BATCH, dtype=np.int64) * block).tolist()


def _reader(
    fd: int,
    path: Path,
    block: int,
    nblocks: int,
    seconds: float,
    huge: bool,
    seed: int,
    run: _Run,
    go: threading.Barrier,
) -> None:
    clock, preadv = time.perf_counter, os.preadv
    count = 0
    try:
        with AlignedBuffer(block, huge) as buffer:
            buffers = [buffer.array]
            offsets = _random_offsets(seed, nblocks, block)
            go.wait()
            start = clock()
            deadline = start + seconds
            for offset in offsets:
                got = preadv(fd, buffers, offset)
                if got != block:
                    raise ProbeError(f"{path}: short read of {got} of {block} bytes at offset {offset}")
                count += 1
                if clock() >= deadline:
                    break
            end = clock()
    except threading.BrokenBarrierError:
        return  # another thread failed before the start and recorded why
    except BaseException as e:
        go.abort()  # a failure before the start must not leave the others waiting for this thread
        if isinstance(e, OSError):
            e = ProbeError(f"{path}: direct read of {block} bytes failed: {e}")
        run.fail(e)
        return
    with run.lock:
        run.requests += count
        run.started = min(run.started, start)
        run.finished = max(run.finished, end)


def _measure(
    fd: int, path: Path, file_bytes: int, block: int, depth: int, seconds: float, huge: bool, seed: int
) -> _Run:
    run = _Run()
    go = threading.Barrier(depth)
    threads = [
        threading.Thread(
            target=_reader,
            args=(fd, path, block, file_bytes // block, seconds, huge, seed * 1000 + i, run, go),
            daemon=True,
        )
        for i in range(depth)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if run.error is not None:
        raise run.error
    return run


# _aio_random_reads statuses; the detail is an errno, or the result of a failed read
_AIO_OK, _AIO_SETUP, _AIO_SUBMIT, _AIO_GETEVENTS, _AIO_READ = range(5)


@njit(nogil=True, cache=True)
def _aio_random_reads(
    fd: int, base: int, block: int, depth: int, ring: int, nblocks: int, seed: int, nanoseconds: int
) -> tuple[int, int, int, int, int]:
    """fio's libaio loop: ``depth`` random block reads in flight, each completion resubmitted at a new offset.

    Reads land in ``ring`` block-sized buffers from ``base`` in turn. Returns (requests completed, start and end
    in CLOCK_MONOTONIC ns, status, detail).
    """
    np.random.seed(seed)
    context, timespec = np.zeros(1, np.int64), np.zeros(2, np.int64)
    failed = aio.io_setup(depth, np.int64(context.ctypes.data))
    if failed:
        return 0, 0, 0, _AIO_SETUP, -failed
    ctx = context[0]
    iocbs = np.zeros((depth, aio.IOCB_WORDS), np.uint64)
    events = np.zeros((depth, aio.EVENT_WORDS), np.int64)
    pointers = np.zeros(depth, np.int64)
    first = np.int64(iocbs.ctypes.data)
    for slot in range(depth):
        iocbs[slot, 0] = slot
        iocbs[slot, 2] = np.uint64(fd) << np.uint64(32)  # opcode 0 (pread), reqprio 0, fildes
        iocbs[slot, 3] = base + slot * block
        iocbs[slot, 4] = block
        iocbs[slot, 5] = np.random.randint(0, nblocks) * block
        pointers[slot] = first + slot * aio.IOCB_WORDS * 8
    status, detail, requests, in_flight, batch, buffer = _AIO_OK, 0, 0, 0, depth, 0
    started = aio.now_ns(timespec)
    deadline = started + nanoseconds
    while True:
        # One request per io_submit, as fio's libaio does by default (iodepth_batch_submit=1): submitting the
        # batch in one call read 10-15% less at 16 KiB x 8-32 on a virtio disk (docs/benchmarks/protocol.md).
        for i in range(batch):
            queued = aio.io_submit(ctx, 1, np.int64(pointers.ctypes.data) + 8 * i)
            if queued != 1:
                status, detail = _AIO_SUBMIT, max(-queued, 0)
                break
            in_flight += 1
        if status != _AIO_OK:
            break
        got = aio.io_getevents(ctx, 1, depth, np.int64(events.ctypes.data), 0)
        if got < 0:
            status, detail = _AIO_GETEVENTS, -got
            break
        in_flight -= got
        for i in range(got):
            if events[i, 2] != block and status == _AIO_OK:
                status, detail = _AIO_READ, events[i, 2]
        requests += got
        if status != _AIO_OK or aio.now_ns(timespec) >= deadline:
            break
        for i in range(got):
            slot = events[i, 0]
            iocbs[slot, 5] = np.random.randint(0, nblocks) * block
            if ring > depth:
                buffer = (buffer + 1) % ring
                iocbs[slot, 3] = base + ((depth + buffer) % ring) * block
            pointers[i] = first + slot * aio.IOCB_WORDS * 8
        batch = got
    finished = aio.now_ns(timespec)
    while in_flight > 0:  # the buffer must outlive every read
        got = aio.io_getevents(ctx, in_flight, depth, np.int64(events.ctypes.data), 0)
        if got <= 0:
            break
        in_flight -= got
    aio.io_destroy(ctx)
    return requests, started, finished, status, detail


def _measure_aio(
    fd: int,
    path: Path,
    file_bytes: int,
    block: int,
    depth: int,
    seconds: float,
    huge: bool,
    seed: int,
    buffer_bytes: int | None = None,
) -> _Run:
    ring = max(depth, (buffer_bytes or 0) // block)
    with AlignedBuffer(block * ring, huge) as buffer:
        buffer.array.fill(0)  # memory faulted in before the clock starts, as a reader's reused buffers are
        requests, started, finished, status, detail = _aio_random_reads(
            fd, buffer.address, block, depth, ring, file_bytes // block, seed, int(seconds * 1e9)
        )
    if status == _AIO_READ:
        what = os.strerror(-detail) if detail < 0 else f"a short read of {detail} bytes"
        raise ProbeError(f"{path}: direct read of {block} bytes failed: {what}")
    if status != _AIO_OK:
        call = {_AIO_SETUP: f"io_setup({depth})", _AIO_SUBMIT: "io_submit", _AIO_GETEVENTS: "io_getevents"}[status]
        why = os.strerror(detail) if detail else "queued fewer requests than asked"
        raise ProbeError(f"{path}: asynchronous direct read of {block} bytes failed: {call}: {why}")
    return _Run(requests=requests, started=started / 1e9, finished=finished / 1e9)


def probe_directory(
    directory: str | Path,
    block_sizes: Sequence[int] = DEFAULT_BLOCK_SIZES,
    queue_depths: Sequence[int] = DEFAULT_QUEUE_DEPTHS,
    seconds_per_cell: float = 1.5,
    file_bytes: int = DEFAULT_FILE_BYTES,
    repeats: int = 3,
    huge_pages: bool = False,
    mechanism: str | None = None,
) -> ProbeResult:
    """Measure random direct-read bandwidth of ``directory``'s disk on the grid block_sizes x queue_depths.

    Cells are measured in turn and the whole grid ``repeats`` times (a, b, c, a, b, c, ...), because the disk
    may be shared and noisy; each cell keeps the median. Reads are block-aligned, uniformly random in the file.
    Each thread reads into a buffer on 4 KiB pages, as fio does; with ``huge_pages`` (where the kernel offers
    transparent huge pages) on a huge page instead, which is what a reader built for speed would do and gave
    1.5-2x the bandwidth for 256 KiB and 2 MiB reads on the project's machine (see ``engine.buffers``).
    ``mechanism`` is "aio" or "threads" (see the module's doc); by default AIO where the kernel offers it.
    """
    blocks = _check_sizes("block_sizes", block_sizes, ALIGN)
    depths = _check_sizes("queue_depths", queue_depths)
    if not isinstance(seconds_per_cell, int | float) or isinstance(seconds_per_cell, bool):
        raise ValueError(f"seconds_per_cell must be a positive number, got {seconds_per_cell!r}")
    if not (seconds_per_cell > 0 and math.isfinite(seconds_per_cell)):
        raise ValueError(f"seconds_per_cell must be a positive number, got {seconds_per_cell!r}")
    check_positive_int("file_bytes", file_bytes, ALIGN)
    if file_bytes < blocks[-1]:
        raise ValueError(f"file_bytes ({file_bytes}) must be at least the largest block size ({blocks[-1]})")
    check_positive_int("repeats", repeats)
    directory = check_directory(directory)
    huge = bool(huge_pages) and huge_pages_available()
    mechanism = _check_mechanism(mechanism)
    measure = _measure_aio if mechanism == "aio" else _measure

    path = scratch_file(directory, file_bytes)
    fd, bypass = open_direct(path)
    rates: dict[tuple[int, int], list[float]] = {(b, q): [] for b in blocks for q in depths}
    requests = dict.fromkeys(rates, 0)
    elapsed = dict.fromkeys(rates, 0.0)
    try:
        for r in range(repeats):
            for b in blocks:
                for q in depths:
                    run = measure(fd, path, file_bytes, b, q, seconds_per_cell, huge, seed=r * 7919 + b + q)
                    seconds = run.finished - run.started
                    rates[(b, q)].append(run.requests * b / seconds)
                    requests[(b, q)] += run.requests
                    elapsed[(b, q)] += seconds
    finally:
        os.close(fd)
    cells = tuple(
        ProbeCell(
            block_bytes=b,
            queue_depth=q,
            bytes_per_s=statistics.median(rates[(b, q)]),
            requests=requests[(b, q)],
            seconds=elapsed[(b, q)],
        )
        for b, q in rates
    )
    return ProbeResult(
        machine=machine_id(),
        device=device_name(directory),
        directory=str(directory.resolve()),
        direct=True,
        cache_bypass=bypass,
        huge_pages=huge,
        mechanism=mechanism,
        file_bytes=file_bytes,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        cells=cells,
    )


def spread_bandwidth(
    directory: str | Path, block: int, depth: int, buffer_bytes: int, seconds: float = 2.0, seed: int = 0
) -> float:
    """Bytes/s of the AIO probe's reads when they land across ``buffer_bytes`` of huge-page memory in turn.

    The probe, like fio, reads into one buffer per request in flight. A reader of experts cannot: each expert
    lands in memory of its own, and on the project's machine (a virtual disk) reads into 64-256 buffers were
    10-15% slower than into 4. This measures what the disk gives a reader with that footprint.
    """
    directory = check_directory(directory)
    if not aio.available():
        raise ProbeError(f"native AIO is not available on {sys.platform}")
    path = scratch_file(directory, DEFAULT_FILE_BYTES)
    fd, _ = open_direct(path)
    try:
        huge = huge_pages_available()
        run = _measure_aio(fd, path, DEFAULT_FILE_BYTES, block, depth, seconds, huge, seed, buffer_bytes)
    finally:
        os.close(fd)
    return run.requests * block / (run.finished - run.started)


def default_mechanism() -> str:
    return "aio" if aio.available() else "threads"


def _check_mechanism(mechanism: str | None) -> str:
    if mechanism is None:
        return default_mechanism()
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if mechanism == "aio" and not aio.available():
        raise ProbeError(f"native AIO is not available on {sys.platform}; use mechanism='threads'")
    return mechanism


def cache_path(directory: str | Path, cache_dir: Path, huge_pages: bool = False) -> Path:
    """Where the probe of ``directory``'s machine and device is kept; probes into huge pages apart."""
    suffix = "-huge-pages" if huge_pages else ""
    return Path(cache_dir) / f"probe-v{PROBE_VERSION}-{machine_id()}-{device_name(directory)}{suffix}.json"


def load_or_probe(directory: str | Path, cache_dir: Path, refresh: bool = False, **probe_kwargs: Any) -> ProbeResult:
    """The cached probe of ``directory``'s machine and device, measured (and stored) when absent or ``refresh``.

    A cached result is reused only if it covers the grid and file size asked for in ``probe_kwargs`` and is at
    most ``MAX_AGE_S`` old. An unreadable cache file is measured again with a warning naming the file: nothing is
    lost by re-measuring.
    """
    path = cache_path(directory, cache_dir, probe_kwargs.get("huge_pages", False) and huge_pages_available())
    if not refresh and path.exists():
        try:
            cached = ProbeResult.from_dict(json.loads(path.read_text()))
        except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            warnings.warn(f"{path}: unreadable probe cache ({e}); measuring the disk again", stacklevel=2)
        else:
            if _covers(cached, probe_kwargs) and _age_s(cached) <= MAX_AGE_S:
                return cached
    result = probe_directory(directory, **probe_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    os.replace(partial, path)
    return result


def _age_s(result: ProbeResult) -> float:
    return (datetime.now(UTC) - datetime.fromisoformat(result.measured_at)).total_seconds()


def _covers(cached: ProbeResult, probe_kwargs: dict[str, Any]) -> bool:
    if set(cached.block_sizes) != set(probe_kwargs.get("block_sizes", DEFAULT_BLOCK_SIZES)):
        return False
    if set(cached.queue_depths) != set(probe_kwargs.get("queue_depths", DEFAULT_QUEUE_DEPTHS)):
        return False
    if cached.huge_pages != (probe_kwargs.get("huge_pages", False) and huge_pages_available()):
        return False
    if cached.mechanism != (probe_kwargs.get("mechanism") or default_mechanism()):
        return False
    return cached.file_bytes == probe_kwargs.get("file_bytes", DEFAULT_FILE_BYTES)
