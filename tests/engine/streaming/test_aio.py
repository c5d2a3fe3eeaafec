"""Native AIO: reads land in the right buffers with the right bytes; errors come back as -errno."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.streaming import aio

pytestmark = pytest.mark.skipif(not aio.available(), reason="no native AIO here")
BLOCK = 4096


def test_reads_many_blocks_in_flight(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, 64 * BLOCK, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    buffer = mmap.mmap(-1, 8 * BLOCK)
    anchor = ctypes.c_char.from_buffer(buffer)
    base = ctypes.addressof(anchor)
    offsets = [5, 0, 63, 17, 17, 40, 2, 9]
    try:
        with aio.AioContext(8) as context:
            for slot, block in enumerate(offsets):
                context.prepare(slot, fd, base + slot * BLOCK, BLOCK, block * BLOCK)
            assert context.submit(list(range(8))) == 8
            done: dict[int, int] = {}
            while len(done) < 8:
                done.update(context.reap(1))
        assert done == dict.fromkeys(range(8), BLOCK)
        for slot, block in enumerate(offsets):
            assert buffer[slot * BLOCK : (slot + 1) * BLOCK] == data[block * BLOCK : (block + 1) * BLOCK]
    finally:
        del anchor
        buffer.close()
        os.close(fd)


def test_a_bad_descriptor_is_refused_at_submit(tmp_path: Path) -> None:
    buffer = ctypes.create_string_buffer(BLOCK)
    with aio.AioContext(1) as context:
        context.prepare(0, 1_000_000, ctypes.addressof(buffer), BLOCK, 0)
        with pytest.raises(OSError) as info:
            context.submit([0])
        assert info.value.errno == errno.EBADF
        assert context.reap(0, timeout=0) == []


def test_reading_past_the_end_returns_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * BLOCK)
    fd = os.open(path, os.O_RDONLY)
    buffer = ctypes.create_string_buffer(BLOCK)
    try:
        with aio.AioContext(1) as context:
            context.prepare(0, fd, ctypes.addressof(buffer), BLOCK, 10 * BLOCK)
            context.submit([0])
            assert context.reap(1) == [(0, 0)]
    finally:
        os.close(fd)


def test_reap_returns_empty_after_its_timeout() -> None:
    with aio.AioContext(1) as context:
        assert context.reap(1, timeout=0.01) == []


def test_slots_must_be_positive() -> None:
    with pytest.raises(ValueError, match="slots"):
        aio.AioContext(0)


def _queue_reads(tmp_path: Path, count: int) -> tuple[int, ctypes.Array, list[tuple[int, int, int, int, int]]]:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * (count * BLOCK // 256))
    fd = os.open(path, os.O_RDONLY)
    buffer = ctypes.create_string_buffer(count * BLOCK)
    base = ctypes.addressof(buffer)
    return fd, buffer, [(fd, base + i * BLOCK, BLOCK, i * BLOCK, i) for i in range(count)]


def test_read_queue_reports_every_read_even_when_a_callback_fails(tmp_path: Path) -> None:
    fd, _buffer, requests = _queue_reads(tmp_path, 16)
    results: dict[int, int | None] = {}

    def done(token: int, result: int | None, seconds: float) -> None:
        results[token] = result
        if token == 3:
            raise ValueError("a bug in a callback")

    queue = aio.ReadQueue(2, done, lambda token: False)
    try:
        queue.put(requests)
        queue._reaper.join(timeout=10)  # it stops at the failure, reporting the rest first
        queue.close()
    finally:
        os.close(fd)
    assert sorted(results) == list(range(16))  # nobody is left waiting
    assert results[0] == BLOCK and set(results.values()) <= {BLOCK, -errno.EIO}
    assert isinstance(queue.error, ValueError)
    with pytest.raises(RuntimeError):
        queue.put(requests[:1])


def test_read_queue_fails_what_is_left_when_reaping_fails(tmp_path: Path, monkeypatch) -> None:
    fd, _buffer, requests = _queue_reads(tmp_path, 8)
    results: dict[int, int | None] = {}
    queue = aio.ReadQueue(2, lambda token, result, seconds: results.setdefault(token, result), lambda token: False)

    def broken(*args: object, **kwargs: object) -> list:
        raise OSError(errno.EINVAL, "io_getevents failed")

    monkeypatch.setattr(queue._context, "reap", broken)
    try:
        queue.put(requests)
        queue._reaper.join(timeout=10)
        assert sorted(results) == list(range(8))
        assert -errno.EIO in results.values()
        with pytest.raises(RuntimeError, match="reaper failed"):
            queue.put(requests[:1])
    finally:
        monkeypatch.undo()
        queue.close()
        os.close(fd)


def test_a_second_process_loads_the_system_calls_from_numbas_cache() -> None:
    script = """
from engine.streaming import aio

with aio.AioContext(2) as context:
    assert context.reap(0, timeout=0) == []
functions = [aio.io_setup, aio.io_getevents, aio.io_destroy]
print("recompiled", [fn.__name__ for fn in functions if fn.stats.cache_misses])
print("loaded", all(fn.stats.cache_hits for fn in functions))
"""
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    runs = [
        subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, env=env, cwd=root)
        for _ in range(2)
    ]  # the first stores whatever the cache lacked; a function numba cannot cache warns, which -W error fails
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    assert runs[1].stdout.splitlines() == ["recompiled []", "loaded True"]
