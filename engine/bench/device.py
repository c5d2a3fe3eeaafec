"""The machine and the device a directory lives on, and the probe's scratch file on it."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from engine.bench.probe_result import ProbeError
from engine.streaming.expert_io import open_uncached

SCRATCH_NAME = ".autoresearch-probe"
MiB = 1 << 20
ALIGN = 4096
DEFAULT_FILE_BYTES = 1 << 30
# Direct I/O on these reads memory, not a disk; recent kernels accept O_DIRECT on tmpfs, so EINVAL cannot tell us.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "hugetlbfs", "devtmpfs"})


def machine_id() -> str:
    """A stable id of this machine: systemd's machine-id when present, else the hostname."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value:
            return _safe(value)
    return _safe(socket.gethostname() or "unknown-host")


def device_name(directory: str | Path) -> str:
    """The block device holding ``directory`` ("vda", "nvme0n1p2"), or "dev-MAJ-MIN" without sysfs."""
    dev = os.stat(directory).st_dev
    major, minor = os.major(dev), os.minor(dev)
    sysfs = Path(f"/sys/dev/block/{major}:{minor}")
    try:
        return _safe(sysfs.resolve(strict=True).name)
    except OSError:
        return f"dev-{major}-{minor}"


def filesystem_type(directory: str | Path) -> str | None:
    """The filesystem type of ``directory`` from /proc/self/mountinfo (Linux), matched by device number."""
    dev = os.stat(directory).st_dev
    key = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[2] == key and " - " in line:
            return line.split(" - ", 1)[1].split()[0]
    return None


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)


def check_positive_int(name: str, value: object, multiple_of: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value % multiple_of:
        raise ValueError(f"{name} must be a multiple of {multiple_of} bytes for direct I/O, got {value}")
    return value


def check_directory(directory: str | Path) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise ProbeError(f"{path}: not a directory")
    fs = filesystem_type(path)
    if fs in MEMORY_FILESYSTEMS:
        raise ProbeError(f"{path}: the filesystem is {fs}, which lives in memory; there is no disk to probe")
    return path


def scratch_file(directory: str | Path, file_bytes: int = DEFAULT_FILE_BYTES) -> Path:
    """The probe's scratch file in ``directory`` with ``file_bytes`` of random data; reused when already that size.

    The data is random so that a compressing or deduplicating layer below cannot shortcut the reads. It is
    written buffered, synced, then its pages are dropped so that the first direct reads find nothing cached.
    """
    path = check_directory(directory) / SCRATCH_NAME
    check_positive_int("file_bytes", file_bytes, ALIGN)
    try:
        if path.stat().st_size == file_bytes:
            _drop_pages(path)
            return path
    except FileNotFoundError:
        pass
    # Written under a temporary name so that an interrupted write never leaves a right-sized file of zeros.
    partial = path.with_name(f"{SCRATCH_NAME}.{os.getpid()}.partial")
    chunk = 8 * MiB
    try:
        with open(partial, "wb") as f:
            remaining = file_bytes
            while remaining:
                n = min(chunk, remaining)
                f.write(os.urandom(n))
                remaining -= n
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise ProbeError(f"{path}: cannot write the probe's scratch file: {e}") from None
    _drop_pages(path)
    return path


def _drop_pages(path: Path) -> None:
    if not hasattr(os, "posix_fadvise"):  # macOS: F_NOCACHE reads go around the cache anyway
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def open_direct(path: Path) -> tuple[int, str]:
    """Open ``path`` for reads that bypass the page cache; returns the fd and the mechanism's name."""
    try:
        return open_uncached(str(path))
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise ProbeError(
                f"{path.parent}: the filesystem does not support direct I/O (O_DIRECT refused), "
                "so its disk bandwidth cannot be measured without the page cache"
            ) from None
        raise ProbeError(f"{path}: cannot open for direct reads: {e}") from None
