"""Run a child process under an enforced RAM budget that caps page cache and process memory together.

A memory cgroup charges a page to the group of the task that first brought it into memory, page cache
included, so a fresh group with a limit is an honest "machine with N bytes of RAM" for a cold benchmark.
It needs Linux and root; anywhere else the limit is returned as not enforced with the reason, never raised.

    with MemoryLimit.create(4 << 30) as limit:
        proc = subprocess.run(cmd, preexec_fn=limit.preexec_fn())
    limit.enforced, limit.peak_bytes(), limit.oom_kills()
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_V2_ROOT = Path("/sys/fs/cgroup")
CGROUP_V1_ROOT = Path("/sys/fs/cgroup/memory")
DEFAULT_PREFIX = "autoresearch"
V1 = "cgroup v1"
V2 = "cgroup v2"

# The kernel can still report EBUSY on rmdir for a moment after the last task exited.
_REMOVE_TIMEOUT_S = 2.0
_counter = itertools.count()


@dataclass
class MemoryLimit:
    """A memory budget for child processes: a fresh cgroup when ``enforced``, otherwise only a record of why not."""

    limit_bytes: int
    enforced: bool
    mechanism: str | None = None  # "cgroup v1" or "cgroup v2" when enforced
    reason: str | None = None  # why the limit is not enforced
    path: Path | None = None  # the group's directory when enforced
    closed: bool = False
    _final: dict[str, int | None] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, limit_bytes: int, name_prefix: str = DEFAULT_PREFIX) -> MemoryLimit:
        """Create a new group capped at ``limit_bytes`` (no swap), or an unenforced limit that says why."""
        if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes <= 0:
            raise ValueError(f"limit_bytes must be a positive integer, got {limit_bytes!r}")
        if not name_prefix or "/" in name_prefix:
            raise ValueError(f"name_prefix must be a non-empty name without '/', got {name_prefix!r}")
        found = detect_controller()
        if isinstance(found, str):
            return cls(limit_bytes, enforced=False, reason=found)
        mechanism, root = found
        try:
            path = _make_group(root, name_prefix)
        except OSError as exc:
            return cls(limit_bytes, enforced=False, reason=f"cannot create a cgroup under {root}: {exc}")
        try:
            if mechanism == V1:
                _configure_v1(path, limit_bytes)
            else:
                _configure_v2(path, limit_bytes)
        except (OSError, _NotUsable) as exc:
            with contextlib.suppress(OSError):  # else left for remove_stale_groups once this process has exited
                path.rmdir()
            return cls(limit_bytes, enforced=False, reason=f"cannot set the limit on {path}: {exc}")
        return cls(limit_bytes, enforced=True, mechanism=mechanism, path=path)

    def preexec_fn(self) -> Callable[[], None] | None:
        """For ``subprocess.Popen(preexec_fn=...)``: the child joins the group between fork and exec.

        Joining before exec means everything the child allocates from exec on (its heap, the page cache it
        reads) is charged to the group; joining after Popen returns would race with the child's first
        allocations. The function only makes raw ``os`` calls, which are safe in a freshly forked child.
        If joining fails, Popen raises SubprocessError rather than running the child without the limit.
        """
        if not self.enforced:
            return None
        self._check_open()
        procs = str(self._file("cgroup.procs"))

        def join_group() -> None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)

        return join_group

    def usage_bytes(self) -> int | None:
        """Bytes charged to the group now (after close: at close); None when not enforced."""
        if not self.enforced:
            return None
        if self.closed:
            return self._final["usage"]
        return _read_int(self._file("memory.usage_in_bytes" if self.mechanism == V1 else "memory.current"))

    def peak_bytes(self) -> int | None:
        """Highest charge since the group was created; None when not enforced or the kernel lacks memory.peak."""
        if not self.enforced:
            return None
        if self.closed:
            return self._final["peak"]
        peak = self._file("memory.max_usage_in_bytes" if self.mechanism == V1 else "memory.peak")
        return _read_int(peak) if peak.exists() else None

    def oom_kills(self) -> int:
        """Processes the OOM killer killed in this group; 0 when not enforced.

        A child killed by SIGKILL while this is >= 1 ran out of memory, it did not crash.
        """
        if not self.enforced:
            return 0
        if self.closed:
            return self._final["oom_kills"] or 0
        name = "memory.oom_control" if self.mechanism == V1 else "memory.events"
        return _read_keyed(self._file(name)).get("oom_kill", 0)

    def failcnt(self) -> int | None:
        """How often the charge hit the limit (v1 ``memory.failcnt``, v2 ``max`` in memory.events); None when not
        enforced. Only a hint: v1 ``memory.failcnt`` stayed 0 on kernel 6.18 while a child was held at the limit."""
        if not self.enforced:
            return None
        if self.closed:
            return self._final["failcnt"]
        if self.mechanism == V1:
            return _read_int(self._file("memory.failcnt"))
        return _read_keyed(self._file("memory.events")).get("max", 0)

    def close(self) -> None:
        """Remove the group; the counters stay readable. Idempotent. The group must have no live tasks left."""
        if self.closed:
            return
        if self.enforced:
            if not self._final:
                self._final = {
                    "usage": self.usage_bytes(),
                    "peak": self.peak_bytes(),
                    "oom_kills": self.oom_kills(),
                    "failcnt": self.failcnt(),
                }
            assert self.path is not None
            _remove_group(self.path, self.mechanism == V1, _REMOVE_TIMEOUT_S)
        self.closed = True

    def __enter__(self) -> MemoryLimit:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _file(self, name: str) -> Path:
        assert self.path is not None
        return self.path / name

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"memory limit {self.path} is already closed")


class _NotUsable(Exception):
    """The group exists but cannot carry a memory limit."""


def detect_controller() -> tuple[str, Path] | str:
    """The usable memory controller as (mechanism, hierarchy root), or the reason there is none."""
    if sys.platform != "linux":
        return f"not Linux (platform {sys.platform}); cgroup memory limits exist only on Linux"
    if os.geteuid() != 0:
        return f"not root (euid {os.geteuid()}); creating a memory cgroup needs root"
    controllers = CGROUP_V2_ROOT / "cgroup.controllers"
    try:
        if "memory" in controllers.read_text().split():
            return V2, CGROUP_V2_ROOT
    except OSError:
        pass
    if (CGROUP_V1_ROOT / "memory.limit_in_bytes").is_file():
        return V1, CGROUP_V1_ROOT
    return (
        f"no memory cgroup controller (neither 'memory' in {controllers} "
        f"nor a cgroup v1 memory hierarchy at {CGROUP_V1_ROOT})"
    )


def remove_stale_groups(name_prefix: str = DEFAULT_PREFIX) -> list[Path]:
    """Remove empty groups named ``<name_prefix>-<pid>-<n>`` whose owner pid is no longer alive (left by killed runs).

    Returns the removed directories. Groups that still hold tasks, or that the kernel refuses to remove, are left.
    """
    if sys.platform != "linux" or os.geteuid() != 0:
        return []
    pattern = re.compile(rf"{re.escape(name_prefix)}-(\d+)-\d+")
    removed = []
    for root in dict.fromkeys((CGROUP_V2_ROOT, CGROUP_V1_ROOT)):
        try:
            entries = sorted(root.iterdir())
        except OSError:
            continue
        for path in entries:
            match = pattern.fullmatch(path.name)
            if match is None or not path.is_dir() or _pid_alive(int(match.group(1))):
                continue
            try:
                if _has_tasks(path):
                    continue
                _remove_group(path, (path / "memory.force_empty").exists(), timeout_s=0.2)
            except OSError:
                continue
            removed.append(path)
    return removed


def _make_group(root: Path, prefix: str) -> Path:
    while True:
        path = root / f"{prefix}-{os.getpid()}-{next(_counter)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _configure_v1(path: Path, limit_bytes: int) -> None:
    _write(path / "memory.limit_in_bytes", limit_bytes)
    # With swap accounting, memory+swap gets the same cap so nothing can escape to swap.
    if (path / "memory.memsw.limit_in_bytes").exists():
        _write(path / "memory.memsw.limit_in_bytes", limit_bytes)
    with contextlib.suppress(OSError):  # only a preference; the memsw cap (or having no swap) is what matters
        _write(path / "memory.swappiness", 0)


def _configure_v2(path: Path, limit_bytes: int) -> None:
    if not (path / "memory.max").exists():
        raise _NotUsable(f"'memory' is not enabled in {path.parent / 'cgroup.subtree_control'}")
    _write(path / "memory.max", limit_bytes)
    if (path / "memory.swap.max").exists():
        _write(path / "memory.swap.max", 0)


def _remove_group(path: Path, v1: bool, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if v1 and not _has_tasks(path):
            # Reclaims the page cache still charged here; on v1 it would otherwise linger in a dying group.
            with contextlib.suppress(OSError):
                _write(path / "memory.force_empty", 0)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise
        time.sleep(0.01)


def _has_tasks(path: Path) -> bool:
    try:
        return bool((path / "cgroup.procs").read_text().strip())
    except FileNotFoundError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write(path: Path, value: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def _read_keyed(path: Path) -> dict[str, int]:
    """Parse ``key value`` lines (memory.oom_control, memory.events)."""
    values = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values
