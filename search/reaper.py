"""A local Ray instance ends with the driver that started it, even a driver killed with SIGKILL.

Its GCS and raylet share the driver's fate, but its DashboardAgent and RuntimeEnvAgent do not: once their raylet
died unexpectedly they block for minutes reporting it to the dead GCS (Ray 2.60, measured here: 3 to 4 minutes,
190 MiB). So ``reaped()`` starts a watchdog process that holds the read end of a pipe whose write end only the
driver holds; the driver names the instance's session directory on it, and when the pipe closes (the driver exited,
however it exited) the watchdog kills every process that still has a file open under that directory: each Ray
process keeps its logs there, and a Ray worker's own children inherit them as their output.

Run as ``python -m search.reaper`` (stdin: the pipe) it is that watchdog.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil


def holding(folder: Path, spared: tuple[int, ...] = ()) -> list[psutil.Process]:
    """The processes with a file open under ``folder``, but for this one and ``spared``."""
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid() or process.pid in spared:
            continue
        with contextlib.suppress(psutil.Error):  # gone meanwhile, or another user's
            if any(Path(f.path).is_relative_to(folder) for f in process.open_files()):
                found.append(process)
    return found


def kill_holding(folder: Path, spared: tuple[int, ...] = ()) -> None:
    """SIGKILL every process with a file open under ``folder`` (but ``spared``), and wait until they are gone."""
    processes = holding(folder, spared)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=10)


@contextlib.contextmanager
def reaped() -> Iterator[Callable[[Path], None]]:
    """Yields ``watch(folder)``: the processes with files open under ``folder`` are killed once this process
    has left the block, or has ended in any way."""
    read, write = os.pipe()  # not inherited by children, except ``read`` as the watchdog's stdin
    # Its own session: a Ctrl-C at the terminal must not end the watchdog before the driver.
    watchdog = subprocess.Popen([sys.executable, "-m", "search.reaper"], stdin=read, start_new_session=True)
    os.close(read)

    def watch(folder: Path) -> None:
        try:
            os.write(write, f"{folder.resolve()}\n".encode())
        except BrokenPipeError:
            watchdog.wait()
            raise RuntimeError(
                f"the watchdog that ends the local Ray instance with this process exited (status "
                f"{watchdog.returncode}, its error above), so a killed run would leave Ray's processes behind"
            ) from None

    try:
        yield watch
    finally:
        os.close(write)
        watchdog.wait()


def _watch() -> None:
    driver = os.getppid()  # still alive if it closed the pipe itself: it waits for this process to end
    folders = sys.stdin.read().splitlines()  # returns at end of file: the driver has closed its end, or died
    for folder in folders:
        kill_holding(Path(folder), spared=(driver,))


if __name__ == "__main__":
    _watch()
