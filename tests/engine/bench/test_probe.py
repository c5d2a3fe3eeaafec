"""The disk probe: a full grid of positive measurements, interpolation, the JSON form, the cache, refusals."""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.bench import probe
from engine.bench.device import SCRATCH_NAME, device_name, filesystem_type, machine_id, scratch_file
from engine.bench.fio import fio_bandwidth
from engine.bench.probe import load_or_probe, probe_directory
from engine.bench.probe_result import SCHEMA_VERSION, ProbeCell, ProbeError, ProbeResult, format_table
from engine.buffers import huge_pages_available
from engine.errors import EngineError
from engine.streaming import aio

KiB, MiB = 1024, 1024 * 1024
SMALL = {
    "block_sizes": (16 * KiB, 256 * KiB, 2 * MiB),
    "queue_depths": (1, 4),
    "seconds_per_cell": 0.05,
    "file_bytes": 8 * MiB,
    "repeats": 2,
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> ProbeResult:
    return probe_directory(tmp_path_factory.mktemp("disk"), **SMALL)


def synthetic(values: dict[tuple[int, int], float]) -> ProbeResult:
    cells = tuple(ProbeCell(b, q, v, requests=10, seconds=1.0) for (b, q), v in values.items())
    return ProbeResult(
        machine="m",
        device="vda",
        directory="/data",
        direct=True,
        cache_bypass="O_DIRECT",
        huge_pages=True,
        mechanism="aio",
        file_bytes=MiB,
        measured_at="2025-01-01T00:00:00+00:00",
        cells=cells,
    )


def test_every_cell_is_measured(measured: ProbeResult) -> None:
    assert measured.block_sizes == SMALL["block_sizes"]
    assert measured.queue_depths == SMALL["queue_depths"]
    assert len(measured.cells) == 6
    for cell in measured.cells:
        assert cell.bytes_per_s > 0
        # every thread of every repeat completes at least one read
        assert cell.requests >= cell.queue_depth * SMALL["repeats"]
        assert cell.seconds > 0
    assert measured.direct and measured.cache_bypass in ("O_DIRECT", "F_NOCACHE")
    assert not measured.huge_pages  # the default, like fio
    assert measured.mechanism == probe.default_mechanism()
    assert measured.machine and measured.device
    assert measured.file_bytes == SMALL["file_bytes"]
    assert Path(measured.directory, SCRATCH_NAME).stat().st_size == SMALL["file_bytes"]


@pytest.mark.parametrize("mechanism", probe.MECHANISMS)
def test_each_mechanism_measures_every_cell(tmp_path: Path, mechanism: str) -> None:
    if mechanism == "aio" and not aio.available():
        pytest.skip("no native AIO here")
    result = probe_directory(tmp_path, **{**SMALL, "repeats": 1, "mechanism": mechanism})
    assert result.mechanism == mechanism
    assert all(cell.bytes_per_s > 0 and cell.requests >= cell.queue_depth for cell in result.cells)


def test_unknown_mechanism_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mechanism must be one of"):
        probe_directory(tmp_path, **{**SMALL, "mechanism": "io_uring"})


def test_huge_pages_on_request(tmp_path: Path) -> None:
    result = probe_directory(tmp_path, **{**SMALL, "repeats": 1, "huge_pages": True})
    assert result.huge_pages == huge_pages_available()
    assert all(cell.bytes_per_s > 0 for cell in result.cells)


def test_bandwidth_is_exact_on_cells_and_interpolates_between(measured: ProbeResult) -> None:
    for cell in measured.cells:
        assert measured.bandwidth(cell.block_bytes, cell.queue_depth) == cell.bytes_per_s
    low, high = measured.bandwidth(16 * KiB, 1), measured.bandwidth(256 * KiB, 1)
    assert min(low, high) <= measured.bandwidth(64 * KiB, 1) <= max(low, high)


def test_interpolation_is_linear_in_log2_and_monotone() -> None:
    result = synthetic({(4 * KiB, 1): 100.0, (4 * KiB, 16): 500.0, (64 * KiB, 1): 300.0, (64 * KiB, 16): 900.0})
    # halfway in log2 on each axis
    assert result.bandwidth(16 * KiB, 1) == pytest.approx(200.0)
    assert result.bandwidth(4 * KiB, 4) == pytest.approx(300.0)
    assert result.bandwidth(16 * KiB, 4) == pytest.approx((100 + 500 + 300 + 900) / 4)
    along_blocks = [result.bandwidth(b, 4) for b in (4 * KiB, 8 * KiB, 12 * KiB, 32 * KiB, 48 * KiB, 64 * KiB)]
    along_depths = [result.bandwidth(16 * KiB, q) for q in (1, 2, 3, 5, 8, 16)]
    assert along_blocks == sorted(along_blocks)
    assert along_depths == sorted(along_depths)
    # clamped to the nearest measured cell outside the grid
    assert result.bandwidth(512, 1) == 100.0
    assert result.bandwidth(1 * MiB, 256) == 900.0


def test_bandwidth_refuses_non_positive_arguments(measured: ProbeResult) -> None:
    with pytest.raises(ValueError, match="block_bytes"):
        measured.bandwidth(0, 1)
    with pytest.raises(ValueError, match="queue_depth"):
        measured.bandwidth(4096, -1)


def test_result_must_be_a_full_grid() -> None:
    with pytest.raises(ValueError, match="full grid"):
        synthetic({(4 * KiB, 1): 1.0, (4 * KiB, 2): 1.0, (8 * KiB, 1): 1.0})


def test_dict_round_trip(measured: ProbeResult) -> None:
    data = json.loads(json.dumps(measured.to_dict()))
    assert data["schema_version"] == SCHEMA_VERSION
    assert ProbeResult.from_dict(data) == measured


def test_from_dict_refuses_other_versions_and_missing_fields(measured: ProbeResult) -> None:
    data = measured.to_dict()
    with pytest.raises(ValueError, match="schema_version"):
        ProbeResult.from_dict({**data, "schema_version": 99})
    del data["device"]
    with pytest.raises(ValueError, match="device"):
        ProbeResult.from_dict(data)


def test_cache_hit_does_not_measure(tmp_path: Path, measured: ProbeResult, monkeypatch) -> None:
    directory = tmp_path / "disk"
    directory.mkdir()
    stored = replace(measured, machine=machine_id(), device=device_name(directory))
    path = probe.cache_path(directory, tmp_path / "cache")
    path.parent.mkdir()
    path.write_text(json.dumps(stored.to_dict()))

    def must_not_measure(*args, **kwargs):
        raise AssertionError("measured despite a cached result")

    monkeypatch.setattr(probe, "probe_directory", must_not_measure)
    assert load_or_probe(directory, tmp_path / "cache", **SMALL) == stored
    # a different grid is a different question, and refresh always measures
    with pytest.raises(AssertionError, match="measured"):
        load_or_probe(directory, tmp_path / "cache", **{**SMALL, "queue_depths": (1, 2)})
    with pytest.raises(AssertionError, match="measured"):
        load_or_probe(directory, tmp_path / "cache", refresh=True, **SMALL)
    old = datetime.now(UTC) - timedelta(seconds=probe.MAX_AGE_S + 60)  # the disk may be faster or slower by now
    path.write_text(json.dumps(replace(stored, measured_at=old.isoformat(timespec="seconds")).to_dict()))
    with pytest.raises(AssertionError, match="measured"):
        load_or_probe(directory, tmp_path / "cache", **SMALL)
    path.write_text(json.dumps(stored.to_dict()))
    if huge_pages_available():
        with pytest.raises(AssertionError, match="measured"):
            load_or_probe(directory, tmp_path / "cache", **{**SMALL, "huge_pages": True})


def test_cache_miss_measures_and_stores(tmp_path: Path, measured: ProbeResult, monkeypatch) -> None:
    calls = []

    def fake_probe(directory, **kwargs):
        calls.append(kwargs)
        return measured

    monkeypatch.setattr(probe, "probe_directory", fake_probe)
    cache = tmp_path / "cache" / "nested"
    assert load_or_probe(tmp_path, cache, **SMALL) == measured
    assert calls == [SMALL]
    stored = json.loads(probe.cache_path(tmp_path, cache).read_text())
    assert ProbeResult.from_dict(stored) == measured


def test_corrupt_cache_warns_and_measures_again(tmp_path: Path, measured: ProbeResult, monkeypatch) -> None:
    path = probe.cache_path(tmp_path, tmp_path)
    path.write_text("{not json")
    monkeypatch.setattr(probe, "probe_directory", lambda directory, **kwargs: measured)
    with pytest.warns(UserWarning, match=str(path)):
        assert load_or_probe(tmp_path, tmp_path) == measured
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_or_probe(tmp_path, tmp_path) == measured  # now a valid cache


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"block_sizes": (5000,)}, "block_sizes"),
        ({"block_sizes": (0,)}, "block_sizes"),
        ({"block_sizes": ()}, "block_sizes"),
        ({"block_sizes": 4096}, "block_sizes"),
        ({"queue_depths": (0,)}, "queue_depths"),
        ({"queue_depths": (1.5,)}, "queue_depths"),
        ({"seconds_per_cell": 0}, "seconds_per_cell"),
        ({"seconds_per_cell": float("nan")}, "seconds_per_cell"),
        ({"file_bytes": 8 * MiB + 1}, "file_bytes"),
        ({"file_bytes": 1 * MiB}, "file_bytes"),  # smaller than the 2 MiB block
        ({"repeats": 0}, "repeats"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        probe_directory(tmp_path, **{**SMALL, **kwargs})
    assert not (tmp_path / SCRATCH_NAME).exists()


def test_missing_directory_is_a_probe_error(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="not a directory"):
        probe_directory(tmp_path / "absent", **SMALL)


@pytest.mark.skipif(
    not Path("/dev/shm").is_dir() or filesystem_type("/dev/shm") != "tmpfs", reason="/dev/shm is not tmpfs"
)
def test_tmpfs_is_refused() -> None:
    with pytest.raises(ProbeError, match="/dev/shm") as info:
        probe_directory("/dev/shm", **SMALL)
    assert isinstance(info.value, EngineError)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
def test_direct_io_refused_by_the_filesystem(tmp_path: Path, monkeypatch) -> None:
    real_open = os.open

    def refuse_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_direct)
    with pytest.raises(ProbeError, match="does not support direct I/O") as info:
        probe_directory(tmp_path, **SMALL)
    assert str(tmp_path) in str(info.value)


def test_short_read_names_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: 100)
    with pytest.raises(ProbeError, match=f"{tmp_path / SCRATCH_NAME}: short read"):
        probe_directory(tmp_path, **{**SMALL, "mechanism": "threads"})


@pytest.mark.skipif(not aio.available(), reason="no native AIO here")
def test_failed_asynchronous_read_names_the_file(tmp_path: Path, monkeypatch) -> None:
    real_scratch_file = probe.scratch_file

    def truncated(directory: Path, file_bytes: int) -> Path:  # reads past the end come back short
        path = real_scratch_file(directory, file_bytes)
        os.truncate(path, 4096)
        return path

    monkeypatch.setattr(probe, "scratch_file", truncated)
    expected = f"{tmp_path / SCRATCH_NAME}: direct read of 16384 bytes failed: a short read of"
    with pytest.raises(ProbeError, match=expected):
        probe_directory(tmp_path, **SMALL)


def test_scratch_file_is_reused_at_the_right_size(tmp_path: Path) -> None:
    path = scratch_file(tmp_path, 1 * MiB)
    first = path.read_bytes()
    assert len(first) == 1 * MiB
    assert len(set(first[:4096])) > 200  # random, so incompressible
    assert scratch_file(tmp_path, 1 * MiB).read_bytes() == first
    assert scratch_file(tmp_path, 2 * MiB).stat().st_size == 2 * MiB
    assert sorted(p.name for p in tmp_path.iterdir()) == [SCRATCH_NAME]


def test_format_table() -> None:
    result = synthetic({(16 * KiB, 1): 122e6, (16 * KiB, 8): 318e6, (2 * MiB, 1): 714e6, (2 * MiB, 8): 811e6})
    assert format_table(result).splitlines() == [
        "| block | QD 1 | QD 8 |",
        "| --- | ---: | ---: |",
        "| 16 KiB | 122 MB/s | 318 MB/s |",
        "| 2 MiB | 714 MB/s | 811 MB/s |",
    ]


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_fio_reads_the_probe_file(tmp_path: Path) -> None:
    assert fio_bandwidth(tmp_path, 16 * KiB, 4, 0.2, 8 * MiB) > 0
    assert (tmp_path / SCRATCH_NAME).stat().st_size == 8 * MiB


def test_missing_fio_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ProbeError, match="apt-get install fio"):
        fio_bandwidth(tmp_path, 16 * KiB, 1, 0.1, 1 * MiB)
