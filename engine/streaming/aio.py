"""Linux native asynchronous I/O (``io_setup``/``io_submit``/``io_getevents``).

Many reads are submitted in one system call and reaped in another, from one thread, which is how fio's
``libaio`` engine keeps a queue of requests in flight. With ``O_DIRECT`` the reads are truly asynchronous.
Only Linux on x86_64 and aarch64 is supported; ``available()`` says whether this process can use it.

The system calls are compiled functions (``io_setup``, ``io_submit``, ``io_getevents``, ``io_destroy``,
``now_ns``), callable from Python, releasing the GIL, and from compiled loops too tight for Python (the disk
probe's): one binding for the engine's ``ReadQueue`` and the probe. The iocbs and events are ctypes structures.
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

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

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


_SETUP, _DESTROY, _GETEVENTS, _SUBMIT = _numbers() or (-1, -1, -1, -1)
CLOCK_MONOTONIC = 1  # what time.perf_counter reads on Linux
IOCB_WORDS = 8  # a struct iocb as uint64 words: data, key|rw_flags, opcode|reqprio|fildes, buf, nbytes, offset, ...
EVENT_WORDS = 4  # a struct io_event: data, obj, res, res2
_I64 = ir.IntType(64)


def _libc_call(name: str, result: ir.Type, arguments: int) -> Callable:
    """Code calling the C library's ``name`` with int64 arguments. The symbol is resolved when the code is
    loaded, so functions using it can be cached (ctypes pointers cannot: numba calls them dynamic globals)."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: list) -> Any:
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, [_I64] * arguments), name)
        return builder.call(function, args)

    return codegen


@intrinsic
def _syscall(typingctx: Any, number: Any, a1: Any, a2: Any, a3: Any, a4: Any, a5: Any) -> tuple:
    return types.int64(*[types.int64] * 6), _libc_call("syscall", _I64, 6)


@intrinsic
def _errno_location(typingctx: Any) -> tuple:
    return types.CPointer(types.int32)(), _libc_call("__errno_location", ir.IntType(32).as_pointer(), 0)


@intrinsic
def _clock_gettime(typingctx: Any, clock: Any, timespec: Any) -> tuple:
    return types.int32(types.int64, types.int64), _libc_call("clock_gettime", ir.IntType(32), 2)


@njit(nogil=True, cache=True)
def last_errno() -> int:
    return carray(_errno_location(), 1)[0]


@njit(nogil=True, cache=True)
def now_ns(timespec: np.ndarray) -> int:
    """CLOCK_MONOTONIC in ns, through ``timespec`` (int64 [2])."""
    _clock_gettime(CLOCK_MONOTONIC, np.int64(timespec.ctypes.data))
    return timespec[0] * 1_000_000_000 + timespec[1]


@njit(nogil=True, cache=True)
def io_setup(slots: int, context: int) -> int:
    """A context for ``slots`` requests, written at the address ``context``: 0, or -errno."""
    return 0 if _syscall(_SETUP, slots, context, 0, 0, 0) == 0 else -last_errno()


@njit(nogil=True, cache=True)
def io_destroy(ctx: int) -> int:
    return 0 if _syscall(_DESTROY, ctx, 0, 0, 0, 0) == 0 else -last_errno()


@njit(nogil=True, cache=True)
def io_submit(ctx: int, count: int, pointers: int) -> int:
    """Queue the ``count`` iocbs whose addresses are at ``pointers``: how many the kernel took, or -errno (the
    first was refused); interrupted calls are made again."""
    while True:
        got = _syscall(_SUBMIT, ctx, count, pointers, 0, 0)
        if got >= 0:
            return got
        code = last_errno()
        if code != errno.EINTR:
            return -code


@njit(nogil=True, cache=True)
def io_getevents(ctx: int, min_events: int, max_events: int, events: int, timeout: int) -> int:
    """Wait for ``min_events`` to ``max_events`` completions, written at ``events`` (a ``struct timespec`` at
    ``timeout`` bounds the wait; 0: none): how many, or -errno; interrupted calls are made again."""
    while True:
        got = _syscall(_GETEVENTS, ctx, min_events, max_events, events, timeout)
        if got >= 0:
            return got
        code = last_errno()
        if code != errno.EINTR:
            return -code


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
        if _numbers() is None:
            raise OSError(errno.ENOSYS, f"native AIO needs Linux on x86_64 or aarch64, not {sys.platform}")
        if not isinstance(slots, int) or slots <= 0:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        self._ctx = ctypes.c_ulong(0)
        code = -io_setup(slots, ctypes.addressof(self._ctx))
        if code:
            raise OSError(code, f"io_setup({slots}) failed: {os.strerror(code)}")
        self.slots = slots
        self._iocbs = (Iocb * slots)()
        self._addresses = [ctypes.addressof(cb) for cb in self._iocbs]
        for slot, cb in enumerate(self._iocbs):
            cb.data, cb.opcode = slot, _PREAD
        self._pointers = (ctypes.c_void_p * slots)()
        self._pointers_address = ctypes.addressof(self._pointers)
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
        got = io_submit(self._ctx.value, len(slots), self._pointers_address)
        if got < 0:
            raise OSError(-got, f"io_submit failed: {os.strerror(-got)}")
        return got

    def reap(self, min_events: int = 1, timeout: float | None = None) -> list[tuple[int, int]]:
        """Wait for at least ``min_events`` completions, or ``timeout`` seconds; ``(slot, result)`` pairs."""
        deadline = 0
        if timeout is not None:
            seconds, fraction = divmod(max(timeout, 0.0), 1.0)
            self._timeout.seconds, self._timeout.nanoseconds = int(seconds), int(fraction * 1e9)
            deadline = ctypes.addressof(self._timeout)
        got = io_getevents(self._ctx.value, min_events, self.slots, ctypes.addressof(self._events), deadline)
        if got < 0:
            raise OSError(-got, f"io_getevents failed: {os.strerror(-got)}")
        events = self._events
        return [(events[i].data, events[i].res) for i in range(got)]

    def close(self) -> None:
        """Free the context; the kernel first waits for (or cancels) the requests still in flight."""
        if self._ctx.value:
            io_destroy(self._ctx.value)
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
