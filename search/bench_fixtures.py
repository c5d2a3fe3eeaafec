"""The search benchmark's measured inputs, each made once and cached under ``data/``, keyed by what it was made from.

- a routing trace of the 8 GiB synthetic checkpoint per stored weights format (the format changes the routing, so
  the simulator replays each from its own trace);
- the bandwidth the engine's reader reaches on each format's files per I/O setting (the simulator's disk; it
  predicted decode speed within 15% where the probe's bandwidth was a third too fast, docs/benchmarks/simulator.md);
- the quality of each lossy setting (weights format x active experts x cache-aware routing tolerance), measured by
  the engine's own comparison (``engine.bench.worker.run_bench``, as ``autoresearch bench`` runs it) on the
  experiment's small synthetic model against its cached reference.

A cache file holds the key it was made for (model identities, the grid, this module's version); a changed model
(a new synthetic generator, say) or grid makes it again. Nothing here is hard-coded from an earlier run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.analysis.simulator import disk_bandwidth, reader_bandwidth
from engine.analysis.trace import record_trace
from engine.architectures import parse_config
from engine.bench import quality as quality_io
from engine.bench.fingerprint import model_identity
from engine.bench.probe import ENGINE_GRID, load_or_probe
from engine.bench.worker import run_bench, run_reference
from engine.bench.workloads import Workload
from engine.config import EngineConfig
from engine.errors import CheckpointError
from engine.formats.checkpoint import read_json
from engine.model.load import load_model
from engine.paths import default_cache_dir
from engine.reports.engine_report import _synthetic
from engine.reports.simulator_report import STREAMING
from engine.synth import read_synth_info

FIXTURES_VERSION = 1  # in every cache key: bump when what a fixture holds, or how it is made, changes
KiB, MiB = 1 << 10, 1 << 20
# (weights, group_size): the stored formats the default space offers
FORMATS: tuple[tuple[str, int | None], ...] = (
    ("original", None),
    ("int8", None),
    ("int4", 32),
    ("int4", 64),
    ("int4", 128),
)
# The reader's grid, interpolated in log2 between (the space's blocks are 256 KiB-4 MiB, its threads 1-16). Under
# mmap the reader reads nothing (page faults do, as the compute touches the experts): the simulator's own model of
# them, one readahead window at a time at the disk probe's bandwidth, stands in.
READER_MODES = ("direct", "pread")
READER_BLOCKS = (256 * KiB, MiB, 4 * MiB)
READER_THREADS = (1, 4, 16)
READER_SECONDS = 1.5
# Cache-aware routing's tolerance is searched in [0, 0.05]; quality is interpolated between these.
TOLERANCES = (0.0, 0.025, 0.05)
QUALITY_CACHE_SHARE = 0.3  # a tolerance picks among resident experts: measured with an lru cache this share of the
# experiment's budget (the middle of the space's 0.05-0.6)


def format_key(weights: str, group_size: int | None) -> str:
    return f"int4-g{group_size}" if weights == "int4" else weights


@dataclass(frozen=True)
class Fixtures:
    model: Path  # the 8 GiB checkpoint the traces are of
    model_top_k: int
    traces: dict[str, Path]  # by format_key
    reader: dict[str, dict[str, Any]]  # by format_key: {"direct": [[B/s per thread] per block], "pread": ...}
    mmap_bandwidth: float  # B/s of page faults (the probe's at one readahead window, one at a time)
    quality: dict[str, dict[str, float]]  # by quality_key: {"top1", "kl"}
    quality_model: dict[str, Any]  # the small model's path, identity and top-k


def quality_key(fmt: str, top_k: int, tolerance: float) -> str:
    return f"{fmt} k={top_k} tol={tolerance:g}"


def prepare(
    data: Path,
    size: int,
    workload: Workload,
    top_k_share: tuple[float, float],
    quality_model: Path,
    quality_budget: int,
) -> Fixtures:
    """Every fixture, made where missing or stale (see the module's docstring); ``top_k_share``: the space's range
    of active experts as a share of the model's."""
    model = _current_synthetic(data, size)
    top_k = parse_config(read_json(model / "config.json"), model / "config.json").top_k
    top_ks = tuple(range(max(1, round(top_k_share[0] * top_k)), round(top_k_share[1] * top_k) + 1))
    identity = model_identity(model)
    traces = {}
    for weights, group in FORMATS:
        fmt = format_key(weights, group)
        path = data / "traces" / f"{model.name}-{workload.name}-{fmt}.npz"
        config = EngineConfig(**{**STREAMING, "weights": weights, "group_size": group})
        key = {"model": identity, "workload": [workload.name, workload.version], "config": config.to_dict()}
        traces[fmt] = _cached_file(path, key, lambda p, c=config: record_trace(model, workload, c).save(p))
    cache = data / "bench-search"
    reader = _cached_json(
        cache / f"reader-{model.name}.json",
        {"model": identity, "blocks": READER_BLOCKS, "threads": READER_THREADS, "seconds": READER_SECONDS},
        lambda: _reader_table(model, top_k),
    )
    small = quality_model
    small_top_k = parse_config(read_json(small / "config.json"), small / "config.json").top_k
    grid = {"model": model_identity(small), "workload": [workload.name, workload.version], "top_ks": top_ks,
            "tolerances": TOLERANCES, "budget": quality_budget}  # fmt: skip
    table = _cached_json(
        cache / f"quality-{small.name}.json",
        grid,
        lambda: _quality_table(small, workload, top_k, top_ks, quality_budget),
    )
    mmap = disk_bandwidth(load_or_probe(model, default_cache_dir(), **ENGINE_GRID), EngineConfig(io_mode="mmap"))
    return Fixtures(model, top_k, traces, reader, mmap, table,
                    {"path": str(small), "identity": model_identity(small), "top_k": small_top_k})  # fmt: skip


def _current_synthetic(data: Path, size: int) -> Path:
    """The sized synthetic checkpoint the other reports share, made again if an older generator made it."""
    model = _synthetic(data, size)
    try:
        read_synth_info(model)
    except CheckpointError as e:
        print(f"{e}: making it again", file=sys.stderr)
        shutil.rmtree(model)
        model = _synthetic(data, size)
    return model


def _reader_table(model: Path, top_k: int) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for weights, group in FORMATS:
        formatted = {"weights": weights, "group_size": group}
        row: dict[str, Any] = {}
        for mode in READER_MODES:
            row[mode] = [[_reader(model, top_k, EngineConfig(**formatted, io_mode=mode, io_block_bytes=block,
                                                             io_threads=threads))
                          for threads in READER_THREADS] for block in READER_BLOCKS]  # fmt: skip
        print(f"reader bandwidth {format_key(weights, group)}: {json.dumps(row)}", file=sys.stderr)
        table[format_key(weights, group)] = row
    return table


def _reader(model: Path, top_k: int, config: EngineConfig) -> float:
    return reader_bandwidth(model, config, top_k, seconds=READER_SECONDS)


def _quality_table(
    model: Path, workload: Workload, top_k: int, top_ks: tuple[int, ...], budget: int
) -> dict[str, dict[str, float]]:
    """Each lossy setting's top-1 agreement and KL against the original weights, by the engine's own comparison:
    the worker's bench path in this process (one pass of the workload, then the teacher-forced scoring of the
    reference's tokens). Fewer active experts are taken as the same share of the small model's."""
    small_top_k = parse_config(read_json(model / "config.json"), model / "config.json").top_k
    reference = _reference(model, workload)
    request = {"warmup": 0, "repeats": 1, "cold": False, "reference": str(reference)}
    table = {}
    for weights, group in FORMATS:
        for k in top_ks:
            for tolerance in TOLERANCES:
                cache = {"cache_policy": "lru", "cache_bytes": int(QUALITY_CACHE_SHARE * budget)} if tolerance else {}
                config = EngineConfig(weights=weights, group_size=group, top_k=max(1, round(k * small_top_k / top_k)),
                                      cache_routing_tolerance=tolerance, cache_format="packed", **cache)  # fmt: skip
                loaded = load_model(model, config)
                try:
                    figures = run_bench(loaded, workload, workload.tokens(loaded), request)["quality"]
                finally:
                    loaded.close()
                key = quality_key(format_key(weights, group), k, tolerance)
                table[key] = {"top1": figures["top1"], "kl": figures["kl"]}
                print(f"quality {key}: {table[key]}", file=sys.stderr)
    return table


def _reference(model: Path, workload: Workload) -> Path:
    """The quality reference ``autoresearch bench`` uses (the same cache file), made here if missing."""
    key = quality_io.reference_key(model_identity(model), workload.name, workload.version)
    path = quality_io.reference_path(default_cache_dir(), key)
    if not path.exists():
        loaded = load_model(model, EngineConfig())
        try:
            run_reference(loaded, workload, workload.tokens(loaded), {"reference": str(path)})
        finally:
            loaded.close()
    return path


def _digest(key: Any) -> str:
    document = {"version": FIXTURES_VERSION, "key": key}
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached_json(path: Path, key: Any, make: Callable[[], Any]) -> Any:
    digest = _digest(key)
    if path.exists():
        document = json.loads(path.read_text())
        if document.get("key") == digest:
            return document["value"]
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": digest, "made_from": key, "value": value}, indent=1, default=str))
    return value


def _cached_file(path: Path, key: Any, make: Callable[[Path], Any]) -> Path:
    """``path``, made by ``make(path)`` unless its sidecar ``.key`` names the same key."""
    digest, stamp = _digest(key), path.with_suffix(".key")
    if not (path.exists() and stamp.exists() and stamp.read_text() == digest):
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)
        stamp.write_text(digest)
    return path
