"""fio as the reference for the disk probe: the same random direct reads, issued by libaio instead of threads."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from engine.bench.device import ALIGN, DEFAULT_FILE_BYTES, scratch_file
from engine.bench.probe_result import ProbeError

SYNCHRONOUS_ENGINES = frozenset({"sync", "psync", "pvsync", "pvsync2"})


def fio_bandwidth(
    directory: str | Path,
    block_bytes: int,
    queue_depth: int,
    seconds: float,
    file_bytes: int = DEFAULT_FILE_BYTES,
    *,
    ioengine: str | None = None,
) -> float:
    """Random direct-read bandwidth (bytes/s) that fio measures on the probe's scratch file in ``directory``.

    The scratch file is the probe's own (created when missing), so fio and the probe read the same bytes.
    ``ioengine`` defaults to libaio on Linux and posixaio elsewhere.
    """
    for name, value in (("block_bytes", block_bytes), ("queue_depth", queue_depth), ("file_bytes", file_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if block_bytes % ALIGN or file_bytes % ALIGN:
        raise ValueError(f"block_bytes ({block_bytes}) and file_bytes ({file_bytes}) must be multiples of {ALIGN}")
    if file_bytes < block_bytes:
        raise ValueError(f"file_bytes ({file_bytes}) must be at least block_bytes ({block_bytes})")
    number = isinstance(seconds, int | float) and not isinstance(seconds, bool)
    if not (number and seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"seconds must be a positive number, got {seconds!r}")
    path = scratch_file(directory, file_bytes)
    engine = ioengine or ("libaio" if sys.platform.startswith("linux") else "posixaio")
    # a synchronous engine keeps one request in flight per thread, as the probe does: depth is the thread count
    synchronous = engine in SYNCHRONOUS_ENGINES
    depth = [f"--iodepth={queue_depth}"]
    if synchronous:
        depth = ["--iodepth=1", f"--numjobs={queue_depth}", "--thread", "--group_reporting"]
    command = [
        "fio",
        "--name=probe",
        # fio splits --filename on ':'
        "--filename=" + str(path).replace(":", "\\:"),
        "--direct=1",
        f"--ioengine={engine}",
        "--rw=randread",
        f"--bs={block_bytes}",
        *depth,
        f"--size={file_bytes}",
        f"--runtime={max(1, round(seconds * 1000))}ms",
        "--time_based",
        "--output-format=json",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, check=False)
    except FileNotFoundError:
        raise ProbeError("fio is not installed or not on PATH; install fio: apt-get install fio") from None
    except subprocess.TimeoutExpired:
        raise ProbeError(f"{path}: fio did not finish within {seconds + 120:.0f} s") from None
    if done.returncode != 0:
        raise ProbeError(f"{path}: fio failed with exit code {done.returncode}: {done.stderr.strip()[-2000:]}")
    return _read_bandwidth(done.stdout, path)


def _read_bandwidth(output: str, path: Path) -> float:
    # fio may print notes before the JSON document.
    start = output.find("{")
    try:
        job = json.loads(output[start:])["jobs"][0]
        error, bandwidth = int(job.get("error", 0)), float(job["read"]["bw_bytes"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ProbeError(f"{path}: cannot read the bandwidth from fio's JSON output ({e}): {output[:500]!r}") from None
    if error or not bandwidth > 0:
        raise ProbeError(f"{path}: fio reported error {error} and read bandwidth {bandwidth}")
    return bandwidth
