from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from engine.bench import memory_limit
from engine.bench.memory_limit import MemoryLimit, detect_controller, remove_stale_groups

MiB = 1 << 20
PREFIX = "autoresearch-test"

_controller = detect_controller()
needs_cgroup = pytest.mark.skipif(
    isinstance(_controller, str),
    reason=f"enforcing a memory limit needs root on Linux with a memory cgroup: {_controller}",
)


@pytest.fixture
def limits() -> Iterator[list[MemoryLimit]]:
    """Limits created by a test are closed even when it fails, so no group is left behind."""
    created: list[MemoryLimit] = []
    yield created
    for limit in created:
        limit.close()


def make_limit(limits: list[MemoryLimit], limit_bytes: int) -> MemoryLimit:
    limit = MemoryLimit.create(limit_bytes, name_prefix=PREFIX)
    limits.append(limit)
    assert limit.enforced, limit.reason
    return limit


def run_child(limit: MemoryLimit, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], preexec_fn=limit.preexec_fn(), capture_output=True, text=True, check=False
    )


@needs_cgroup
def test_child_over_the_limit_is_oom_killed_not_crashed(limits):
    limit = make_limit(limits, 200 * MiB)
    # bytes * n writes every byte, so all 400 MiB are really touched.
    proc = run_child(limit, f"x = b'x' * {400 * MiB}")
    assert proc.returncode == -signal.SIGKILL
    assert limit.oom_kills() >= 1


@needs_cgroup
def test_child_under_the_limit_succeeds_and_its_peak_is_charged(limits):
    limit = make_limit(limits, 200 * MiB)
    proc = run_child(limit, f"x = b'x' * {50 * MiB}")
    assert proc.returncode == 0, proc.stderr
    peak = limit.peak_bytes()
    assert peak is not None
    assert 50 * MiB <= peak <= 200 * MiB
    assert limit.oom_kills() == 0


@needs_cgroup
def test_page_cache_is_capped_by_the_limit(limits, tmp_path):
    path = tmp_path / "big.bin"
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(300):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
        # Pages cached by this process are charged to its own group and would be served to the child for free.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    limit = make_limit(limits, 100 * MiB)
    reader = (
        f"n = 0\nwith open({str(path)!r}, 'rb') as f:\n"
        f"    while chunk := f.read({MiB}):\n        n += len(chunk)\nprint(n)"
    )
    proc = run_child(limit, reader)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == 300 * MiB
    peak = limit.peak_bytes()
    assert peak is not None
    assert peak <= 100 * MiB
    # The child's own memory is a few MiB: a peak this high shows the page cache it read was charged here.
    assert peak >= 50 * MiB


@needs_cgroup
def test_close_removes_the_group_and_is_idempotent(limits):
    limit = make_limit(limits, 100 * MiB)
    assert run_child(limit, "pass").returncode == 0
    assert limit.path is not None and limit.path.is_dir()
    limit.close()
    assert not limit.path.exists()
    limit.close()
    # The counters survive the group, so a caller may read them after the with block.
    assert limit.peak_bytes() is not None and limit.peak_bytes() > 0
    assert limit.oom_kills() == 0
    with pytest.raises(RuntimeError, match="closed"):
        limit.preexec_fn()


@needs_cgroup
def test_context_manager_removes_the_group():
    with MemoryLimit.create(100 * MiB, name_prefix=PREFIX) as limit:
        assert limit.enforced, limit.reason
        path = limit.path
        assert path is not None and path.is_dir()
    assert not path.exists()


@needs_cgroup
def test_remove_stale_groups_removes_only_groups_of_dead_owners():
    _mechanism, root = _controller
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = root / f"{PREFIX}-{dead.pid}-0"
    live = root / f"{PREFIX}-{os.getpid()}-999999"
    stale.mkdir()
    live.mkdir()
    try:
        assert remove_stale_groups(PREFIX) == [stale]
        assert not stale.exists()
        assert live.is_dir()
    finally:
        for path in (stale, live):
            if path.exists():
                path.rmdir()


def test_not_root_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(memory_limit.sys, "platform", "linux")
    monkeypatch.setattr(memory_limit.os, "geteuid", lambda: 1000)
    limit = MemoryLimit.create(100 * MiB)
    assert not limit.enforced
    assert "not root" in limit.reason
    assert limit.preexec_fn() is None
    assert limit.peak_bytes() is None and limit.usage_bytes() is None and limit.oom_kills() == 0
    limit.close()
    limit.close()


def test_no_controller_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(memory_limit.sys, "platform", "linux")
    monkeypatch.setattr(memory_limit.os, "geteuid", lambda: 0)
    monkeypatch.setattr(memory_limit, "CGROUP_V2_ROOT", tmp_path / "v2")
    monkeypatch.setattr(memory_limit, "CGROUP_V1_ROOT", tmp_path / "v1")
    with MemoryLimit.create(100 * MiB) as limit:
        assert not limit.enforced
        assert "no memory cgroup controller" in limit.reason
        assert limit.preexec_fn() is None


def test_not_linux_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(memory_limit.sys, "platform", "darwin")
    limit = MemoryLimit.create(100 * MiB)
    assert not limit.enforced
    assert "not Linux" in limit.reason
    assert limit.preexec_fn() is None


def test_v2_without_memory_in_subtree_control_is_not_enforced(monkeypatch, tmp_path):
    # A plain directory stands in for the v2 root: the new group gets no memory.max, as when the parent's
    # cgroup.subtree_control lacks +memory. The half-made group must be removed again.
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    monkeypatch.setattr(memory_limit.sys, "platform", "linux")
    monkeypatch.setattr(memory_limit.os, "geteuid", lambda: 0)
    monkeypatch.setattr(memory_limit, "CGROUP_V2_ROOT", tmp_path)
    limit = MemoryLimit.create(100 * MiB, name_prefix=PREFIX)
    assert not limit.enforced
    assert "subtree_control" in limit.reason
    assert [p.name for p in tmp_path.iterdir()] == ["cgroup.controllers"]


def test_a_child_that_cannot_join_its_group_does_not_run(tmp_path):
    limit = MemoryLimit(100 * MiB, enforced=True, mechanism=memory_limit.V1, path=tmp_path / "gone")
    with pytest.raises(subprocess.SubprocessError):
        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=limit.preexec_fn(), check=False)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1"])
def test_limit_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        MemoryLimit.create(bad)
