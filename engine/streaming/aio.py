"""Linux native asynchronous I/O (``io_setup``/``io_submit``/``io_getevents``) through ctypes.

Many reads are submitted in one system call and reaped in another, from one thread, which is how fio's
``libaio`` engine keeps a queue of requests in flight. With ``O_DIRECT`` the reads are truly asynchronous.
Only Linux on x86_64 and aarch64 is supported; ``available()`` says whether this process can use it.

``SYSCALL``, ``CLOCK_GETTIME`` and ``ERRNO_LOCATION`` are the C functions as typed pointers, which numba can
call in nopython mode (all arguments as 64-bit integers), for loops too tight for Python.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

# (io_setup, io_destroy, io_getevents, io_submit) system call numbers
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_PREAD = 0  # IOCB_CMD_PREAD


class Iocb(ctypes.Structure):
    """``struct iocb`` of <linux/aio_abi.h> (little-endian layout)."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("key", ctypes.c_uint32),
        ("rw_flags", ctypes.c_int32),
        ("opcode", ctypes.c_uint16),
        ("reqprio", ctypes.c_int16),
        ("fildes", ctypes.c_uint32),
        ("buf", ctypes.c_uint64),
        ("nbytes", ctypes.c_uint64),
        ("offset", ctypes.c_int64),
        ("reserved2", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("resfd", ctypes.c_uint32),
    ]


class IoEvent(ctypes.Structure):
    """``struct io_event``: ``data`` is the iocb's ``data``; ``res`` the bytes read or a negative errno."""

    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


def _numbers() -> tuple[int, int, int, int] | None:
    if not sys.platform.startswith("linux") or sys.byteorder != "little":
        return None
    return _SYSCALLS.get(platform.machine())


_libc = ctypes.CDLL(None, use_errno=True) if _numbers() else None
if _libc is not None:
    _libc.syscall.restype = ctypes.c_long


def _pointer(name: str, restype: type | None, *argtypes: type) -> ctypes._CFuncPtr | None:
    if _libc is None:
        return None
    return ctypes.CFUNCTYPE(restype, *argtypes)(ctypes.cast(getattr(_libc, name), ctypes.c_void_p).value)


_L = ctypes.c_long
NUMBERS = _numbers()  # (io_setup, io_destroy, io_getevents, io_submit), or None where AIO is unsupported
SYSCALL = _pointer("syscall", _L, _L, _L, _L, _L, _L, _L)  # number and five arguments; unused ones ignored
CLOCK_GETTIME = _pointer("clock_gettime", ctypes.c_int, ctypes.c_int, _L)
ERRNO_LOCATION = _pointer("__errno_location", ctypes.POINTER(ctypes.c_int))
CLOCK_MONOTONIC = 1  # what time.perf_counter reads on Linux
IOCB_WORDS = 8  # a struct iocb as uint64 words: data, key|rw_flags, opcode|reqprio|fildes, buf, nbytes, offset, ...
EVENT_WORDS = 4  # a struct io_event: data, obj, res, res2


def available() -> bool:
    """Whether native AIO works here: Linux, a known architecture, and a kernel that grants a context."""
    try:
        AioContext(1).close()
    except OSError:
        return False
    return True


class _Timespec(ctypes.Structure):
    _fields_ = [("seconds", ctypes.c_long), ("nanoseconds", ctypes.c_long)]


class AioContext:
    """A kernel AIO context with room for ``slots`` requests in flight, each described by a reusable iocb.

    ``prepare(slot, fd, address, nbytes, offset)`` fills a slot; ``submit(slots)`` queues prepared slots in one
    system call; ``reap(min_events, timeout)`` waits for completions and returns ``(slot, result)`` pairs, a
    result being the byte count or ``-errno``. One thread may submit while another reaps (the kernel allows it;
    they share no state here); each of the two must be driven by one thread at a time. The caller tracks which
    slots are in flight: a slot is prepared again only after its completion was reaped.
    """

    def __init__(self, slots: int) -> None:
        numbers = _numbers()
        if numbers is None or _libc is None:
            raise OSError(errno.ENOSYS, f"native AIO needs Linux on x86_64 or aarch64, not {sys.platform}")
        if not isinstance(slots, int) or slots <= 0:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self._syscall = _libc.syscall
        self._ctx = ctypes.c_ulong(0)
        if self._syscall(self._setup, slots, ctypes.byref(self._ctx)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"io_setup({slots}) failed: {os.strerror(code)}")
        self.slots = slots
        self._iocbs = (Iocb * slots)()
        self._addresses = [ctypes.addressof(cb) for cb in self._iocbs]
        for slot, cb in enumerate(self._iocbs):
            cb.data, cb.opcode = slot, _PREAD
        self._pointers = (ctypes.c_void_p * slots)()
        self._events = (IoEvent * slots)()
        self._timeout = _Timespec()

    def prepare(self, slot: int, fd: int, address: int, nbytes: int, offset: int) -> None:
        cb = self._iocbs[slot]
        cb.fildes, cb.buf, cb.nbytes, cb.offset = fd, address, nbytes, offset

    def submit(self, slots: list[int]) -> int:
        """Queue prepared ``slots`` in order; returns how many the kernel took (they are in flight).

        Raises OSError when the kernel refuses the first of them (a later refusal shows as a short count, so
        submitting the rest again raises for the one refused).
        """
        pointers, addresses = self._pointers, self._addresses
        for i, slot in enumerate(slots):
            pointers[i] = addresses[slot]
        while True:
            got = self._syscall(self._submit, self._ctx, len(slots), pointers)
            if got >= 0:
                return got
            code = ctypes.get_errno()
            if code != errno.EINTR:
                raise OSError(code, f"io_submit failed: {os.strerror(code)}")

    def reap(self, min_events: int = 1, timeout: float | None = None) -> list[tuple[int, int]]:
        """Wait for at least ``min_events`` completions, or ``timeout`` seconds; ``(slot, result)`` pairs."""
        deadline = None
        if timeout is not None:
            seconds, fraction = divmod(max(timeout, 0.0), 1.0)
            self._timeout.seconds, self._timeout.nanoseconds = int(seconds), int(fraction * 1e9)
            deadline = ctypes.byref(self._timeout)
        while True:
            got = self._syscall(self._getevents, self._ctx, min_events, self.slots, self._events, deadline)
            if got >= 0:
                break
            code = ctypes.get_errno()
            if code != errno.EINTR:
                raise OSError(code, f"io_getevents failed: {os.strerror(code)}")
        events = self._events
        return [(events[i].data, events[i].res) for i in range(got)]

    def close(self) -> None:
        """Free the context; the kernel first waits for (or cancels) the requests still in flight."""
        if self._ctx.value:
            self._syscall(self._destroy, self._ctx)
            self._ctx = ctypes.c_ulong(0)

    def __enter__(self) -> AioContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReadQueue:
    """Reads put from any thread, at most ``depth`` in flight on one AIO context, completed by a reaper thread.

    A request is ``(fd, address, nbytes, offset, token)``. ``done(token, result, seconds)`` is called once per
    request, with the bytes read or ``-errno`` and the seconds from submission to completion, or with ``None``
    for a request that ``skip(token)`` declined when its turn came (say, a cancelled fetch). Callbacks run
    outside the queue's lock, on the reaper thread or on the thread that put the request. If the reaper fails
    (``io_getevents`` refused, or ``done`` raised), every request left is reported with ``-EIO`` and ``put``
    raises from then on.
    """

    def __init__(self, depth: int, done: Callable[[Any, int | None, float], None], skip: Callable[[Any], bool]) -> None:
        self._context = AioContext(depth)
        self._done, self._skip = done, skip
        self._lock = threading.Lock()
        self._free = list(range(depth))
        self._waiting: deque[tuple[int, int, int, int, Any]] = deque()
        self._tokens: list[Any] = [None] * depth
        self._submitted = [0.0] * depth
        self._closing = False
        self.error: BaseException | None = None  # what stopped the reaper, if anything did
        self._reaper = threading.Thread(target=self._reap, name="expert-aio", daemon=True)
        self._reaper.start()

    def put(self, requests: Iterable[tuple[int, int, int, int, Any]]) -> None:
        with self._lock:
            if self._closing:
                raise RuntimeError("put on a closed ReadQueue")
            if self.error is not None:
                raise RuntimeError(f"the read queue's reaper failed: {self.error!r}") from self.error
            self._waiting.extend(requests)
            finished = self._submit_waiting()
        self._report(finished)

    def _submit_waiting(self) -> list[tuple[Any, int | None, float]]:
        """Fill free slots from the waiting requests (under the lock); the ones skipped or refused, to report."""
        finished: list[tuple[Any, int | None, float]] = []
        slots: list[int] = []
        now = time.perf_counter()
        while self._free and self._waiting:
            fd, address, nbytes, offset, token = self._waiting.popleft()
            if self._skip(token):
                finished.append((token, None, 0.0))
                continue
            slot = self._free.pop()
            self._context.prepare(slot, fd, address, nbytes, offset)
            self._tokens[slot], self._submitted[slot] = token, now
            slots.append(slot)
        while slots:
            try:
                slots = slots[self._context.submit(slots) :]
            except OSError as e:  # the first one is refused: fail it and submit the rest
                refused = slots.pop(0)
                finished.append((self._tokens[refused], -(e.errno or errno.EIO), 0.0))
                self._release(refused)
        return finished

    def _release(self, slot: int) -> None:
        self._tokens[slot] = None
        self._free.append(slot)

    def _reap(self) -> None:
        depth = self._context.slots
        try:
            while True:
                events = self._context.reap(1, timeout=0.1)
                now = time.perf_counter()
                with self._lock:
                    finished = [(self._tokens[slot], result, now - self._submitted[slot]) for slot, result in events]
                    for slot, _ in events:
                        self._release(slot)
                    finished += self._submit_waiting()
                    if self._closing and len(self._free) == depth:
                        break
                self._report(finished)
            self._report(finished)
        except BaseException as e:  # no reaper any more: fail every request left, so that nobody waits forever
            with self._lock:
                self.error = e
                lost = [(token, -errno.EIO, 0.0) for *_, token in self._waiting]
                self._waiting.clear()
            self._report(lost, swallow=True)
            self._drain()

    def _drain(self) -> None:
        """Report the reads still in flight once the kernel is done with their buffers (or as failed if it
        cannot say), so that no buffer is handed back while a read may still land in it."""
        while True:
            with self._lock:
                if len(self._free) == self._context.slots:
                    return
            try:
                events = self._context.reap(1, timeout=1.0)
            except BaseException:
                events = None
            with self._lock:
                if events is None:
                    finished = [(token, -errno.EIO, 0.0) for token in self._tokens if token is not None]
                    slots = [slot for slot, token in enumerate(self._tokens) if token is not None]
                else:
                    finished = [(self._tokens[slot], result, 0.0) for slot, result in events]
                    slots = [slot for slot, _ in events]
                for slot in slots:
                    self._release(slot)
            self._report(finished, swallow=True)

    def _report(self, finished: list[tuple[Any, int | None, float]], swallow: bool = False) -> None:
        """Call ``done`` for each; one that raises does not keep the others from being reported."""
        error = None
        for token, result, seconds in finished:
            try:
                self._done(token, result, seconds)
            except BaseException as e:
                error = error or e
        if error is not None and not swallow:
            raise error

    def close(self) -> None:
        """Skip what is still waiting, let the reads in flight finish, and free the context."""
        with self._lock:
            self._closing = True
            skipped = [(token, None, 0.0) for *_, token in self._waiting]
            self._waiting.clear()
        self._report(skipped)
        self._reaper.join()
        self._context.close()
