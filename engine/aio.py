"""Linux native asynchronous I/O (``io_setup``/``io_submit``/``io_getevents``) through ctypes.

Many reads are submitted in one system call and reaped in another, from one thread, which is how fio's
``libaio`` engine keeps a queue of requests in flight. With ``O_DIRECT`` the reads are truly asynchronous.
Only Linux on x86_64 and aarch64 is supported; ``available()`` says whether this process can use it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

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


def available() -> bool:
    """Whether native AIO works here: Linux, a known architecture, and a kernel that grants a context."""
    try:
        AioContext(1).close()
    except OSError:
        return False
    return True


class AioContext:
    """A kernel AIO context with room for ``slots`` requests in flight, each described by a reusable iocb.

    ``prepare(slot, fd, address, nbytes, offset)`` fills a slot; ``submit(slots)`` queues prepared slots in one
    system call; ``reap(min_events)`` waits for at least that many completions and returns ``(slot, result)``
    pairs. A result is the byte count or ``-errno``. Not thread-safe: one thread drives a context.
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
        self.in_flight = 0

    def prepare(self, slot: int, fd: int, address: int, nbytes: int, offset: int) -> None:
        cb = self._iocbs[slot]
        cb.fildes, cb.buf, cb.nbytes, cb.offset = fd, address, nbytes, offset

    def set_offset(self, slot: int, offset: int) -> None:
        self._iocbs[slot].offset = offset

    def submit(self, slots: list[int]) -> None:
        """Queue the prepared ``slots``; raises OSError if the kernel refuses any of them."""
        pointers, addresses = self._pointers, self._addresses
        for i, slot in enumerate(slots):
            pointers[i] = addresses[slot]
        done = 0
        while done < len(slots):
            rest = ctypes.byref(pointers, done * ctypes.sizeof(ctypes.c_void_p))
            got = self._syscall(self._submit, self._ctx, len(slots) - done, rest)
            if got < 0:
                code = ctypes.get_errno()
                if code == errno.EINTR:
                    continue
                raise OSError(code, f"io_submit failed: {os.strerror(code)}")
            if got == 0:
                raise OSError(errno.EAGAIN, "io_submit queued no request")
            done += got
            self.in_flight += got

    def reap(self, min_events: int = 1) -> list[tuple[int, int]]:
        """Wait for at least ``min_events`` completions (at most the number in flight); ``(slot, result)`` pairs."""
        wanted = min(min_events, self.in_flight)
        while True:
            got = self._syscall(self._getevents, self._ctx, wanted, self.slots, self._events, None)
            if got >= 0:
                break
            code = ctypes.get_errno()
            if code != errno.EINTR:
                raise OSError(code, f"io_getevents failed: {os.strerror(code)}")
        self.in_flight -= got
        events = self._events
        return [(events[i].data, events[i].res) for i in range(got)]

    def close(self) -> None:
        """Wait for every request in flight (their buffers must outlive them), then free the context."""
        if self._ctx.value:
            while self.in_flight:
                self.reap(self.in_flight)
            self._syscall(self._destroy, self._ctx)
            self._ctx = ctypes.c_ulong(0)

    def __enter__(self) -> AioContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
