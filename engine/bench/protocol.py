"""``autoresearch bench``: measure one engine configuration on one model and workload, honestly.

Each measurement runs in a child process (``worker.py``) under an enforced memory limit where the OS allows
one; cold runs drop the model's pages before every repeat; a warm-up pass is excluded; every repeat is kept;
the median comes with a bootstrap interval; the result stands beside its disk roofline and its quality
against a cached reference run.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from engine.bench import quality
from engine.bench.fingerprint import engine_version, machine_fingerprint, model_identity
from engine.bench.memory_limit import MemoryLimit, remove_stale_groups
from engine.bench.probe_result import ProbeResult
from engine.bench.result import SCHEMA_VERSION, BenchResult
from engine.bench.stats import median_ci, ratio_ci, slowest_window
from engine.bench.workloads import Workload
from engine.config import EngineConfig
from engine.errors import EngineError
from engine.formats.checkpoint import Checkpoint
from engine.formats.repack_manifest import is_repacked, load_manifest
from engine.formats.weights import source_dir, weights_dir
from engine.streaming.expert_store import StoreStats
from engine.units import format_bytes

PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
STDERR_TAIL = 2000  # characters of a crashed child's stderr kept in the error


class BenchFailure(EngineError):
    """The measured run failed: ``reason`` is ``out_of_memory``, ``timeout`` or ``crashed``."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"{reason}: {message}")


@dataclass(frozen=True)
class BenchRequest:
    model: Path
    config: EngineConfig
    workload: Workload
    memory_limit: int | None = None  # bytes; None runs without a limit
    repeats: int = 5
    warmup: int = 1
    cold: bool = True
    vs: EngineConfig | None = None
    timeout_s: float | None = None  # per child process
    cache_dir: Path | None = None  # where quality references are kept; None skips quality

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1 but got {self.repeats}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 but got {self.warmup}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive but got {self.timeout_s}")


def run_bench(request: BenchRequest, probe: ProbeResult | None = None) -> BenchResult:
    """Measure ``request.config`` (and ``request.vs``, interleaved); raises BenchFailure if a run fails."""
    model_id = model_identity(request.model)
    resident = resident_bytes(request.model)
    if request.memory_limit is not None and request.memory_limit <= resident:
        raise ValueError(
            f"memory limit {format_bytes(request.memory_limit)} does not exceed the weights the engine keeps "
            f"resident ({format_bytes(resident)} as float32, for {request.model}); give a larger --memory-limit"
        )
    remove_stale_groups()  # groups a killed earlier run could not remove
    for config in (request.config, request.vs):
        if config is not None:  # repacked copies and compiled code are made here, outside the children's limit
            weights_dir(request.model, config.weights, config.group_size)
            _compile_outside_the_budget(request, config)
    reference = None
    if request.cache_dir is not None:
        original = _original(request.model)
        key = quality.reference_key(model_identity(original), request.workload.name, request.workload.version)
        reference = quality.reference_path(request.cache_dir, key)
        if not reference.exists():
            _run_child(request, EngineConfig(), "reference", reference=reference, repeats=0, model=original)
    if request.vs is None:
        run = _run_child(request, request.config, "bench", reference=reference, repeats=request.repeats)
        return _result(request, request.config, [run], model_id, probe)
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for _ in range(request.repeats):  # one repeat per child, alternating, so drift hits both configurations
        for key, config in (("a", request.config), ("b", request.vs)):
            runs[key].append(_run_child(request, config, "bench", reference if not runs[key] else None, repeats=1))
    result = _result(request, request.config, runs["a"], model_id, probe)
    other = _result(request, request.vs, runs["b"], model_id, probe)
    a = [r["decode_tok_s"] for r in result.per_repeat]
    b = [r["decode_tok_s"] for r in other.per_repeat]
    if None not in a and None not in b:
        ratio, low, high = ratio_ci(a, b)
        result.vs = {"config": request.vs.to_dict(), "result": other.to_dict(), "ratio": ratio, "ratio_ci": (low, high)}
    return result


def resident_bytes(model_dir: Path) -> int:
    """Bytes the engine holds in RAM whatever the cache, at most: every non-expert tensor as float32 (bfloat16
    attention projections are held as stored, at half that)."""
    checkpoint = Checkpoint.open(model_dir)
    try:
        return sum(4 * int(np.prod(t.shape)) for name, t in checkpoint.tensors.items() if ".experts." not in name)
    finally:
        checkpoint.close()


def _original(model: Path) -> Path:
    """The checkpoint whose weights are the quality reference: ``model``, or the one it was repacked from."""
    if not is_repacked(model):
        return model
    source = source_dir(model)
    if source is None:
        path = load_manifest(model).source.get("path", "(not recorded)")
        raise ValueError(
            f"{model} is repacked, and the checkpoint it was made from ({path}) is gone or changed; quality is "
            "measured against the original weights, so restore them, or skip quality (--no-quality)"
        )
    return source


# What this process has had compiled outside a budget: (model, and the knobs that decide which compiled code a
# run calls, with which types).
_COMPILED: set[tuple] = set()


def _compile_outside_the_budget(request: BenchRequest, config: EngineConfig) -> None:
    """Run the workload once in a child without the memory limit, so that numba compiles the code ``config`` runs
    into its on-disk cache where the compiler's own memory is not charged to the budget: a child that compiles
    under a tight budget can be killed for it (measured: with a cold cache every packed trial of the quickstart
    ran out of its 384 MiB; with a warm one the same run peaked at 342 MiB)."""
    key = (str(request.model), config.weights, config.group_size, config.cache_format, config.predictor)
    if request.memory_limit is None or key in _COMPILED:
        return
    unlimited = dataclasses.replace(request, memory_limit=None, cold=False, warmup=1)
    _run_child(unlimited, config, "compile", reference=None, repeats=0)
    _COMPILED.add(key)


def _run_child(
    request: BenchRequest,
    config: EngineConfig,
    mode: str,
    reference: Path | None,
    repeats: int,
    model: Path | None = None,
) -> dict:
    with tempfile.TemporaryDirectory(prefix="autoresearch-bench-") as tmp:
        spec = {
            "model": str(model or request.model),
            "config": config.to_dict(),
            "workload": request.workload.name,
            "mode": mode,
            "repeats": repeats,
            "warmup": request.warmup,
            "cold": request.cold,
            "reference": str(reference) if reference else None,
            "out": str(Path(tmp) / "out.json"),
        }
        (Path(tmp) / "request.json").write_text(json.dumps(spec))
        limit = MemoryLimit.create(request.memory_limit) if request.memory_limit else None
        with limit if limit is not None else contextlib.nullcontext():
            try:
                done = subprocess.run(
                    [sys.executable, "-m", "engine.bench.worker", str(Path(tmp) / "request.json")],
                    preexec_fn=_child_setup(limit.preexec_fn() if limit is not None else None),
                    capture_output=True,
                    text=True,
                    timeout=request.timeout_s,
                )
            except subprocess.TimeoutExpired:
                raise BenchFailure("timeout", f"the {mode} run exceeded {request.timeout_s} s and was killed") from None
        if done.returncode != 0:
            if limit is not None and limit.enforced and limit.oom_kills() > 0:
                raise BenchFailure(
                    "out_of_memory",
                    f"the {mode} run needed more than the enforced {format_bytes(request.memory_limit or 0)} "
                    f"limit and was killed (peak {format_bytes(limit.peak_bytes() or 0)})",
                )
            raise BenchFailure(
                "crashed", f"the {mode} run exited with code {done.returncode}: {done.stderr[-STDERR_TAIL:].strip()}"
            )
        out = json.loads((Path(tmp) / "out.json").read_text())
    out["limit"] = {
        "bytes": request.memory_limit,
        "enforced": bool(limit and limit.enforced),
        "mechanism": limit.mechanism if limit else None,
        "reason": (limit.reason if limit else "no limit given") if not (limit and limit.enforced) else None,
        "peak_bytes": limit.peak_bytes() if limit and limit.enforced else None,
    }
    return out


def _child_setup(join_limit: Callable[[], None] | None) -> Callable[[], None]:
    """Between fork and exec: join the memory limit, and on Linux die with the parent, so a measurement never
    outlives the process that waits for it (a cancelled trial, a killed driver)."""

    def setup() -> None:
        if join_limit is not None:
            join_limit()
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return setup


def _result(
    request: BenchRequest,
    config: EngineConfig,
    runs: list[dict],
    model_id: dict,
    probe: ProbeResult | None,
) -> BenchResult:
    limit_info = runs[-1]["limit"]
    repeats = [_repeat_figures(r) for run in runs for r in run["repeats"]]
    decode = [r["decode_tok_s"] for r in repeats if r["decode_tok_s"] is not None]
    steps = [s for run in runs for r in run["repeats"] for s in r.get("step_seconds", [])]
    median = ci = window = span = None
    if decode:
        median, low, high = median_ci(decode)
        ci = (low, high)
    if steps:
        window, span = slowest_window(steps)
    totals = _decode_totals(runs)
    tokens = totals["tokens"]

    def per_token(key: str) -> float | None:
        return totals[key] / tokens if tokens and totals[key] is not None else None

    disk = per_token("disk_bytes")
    roofline = roofline_info = efficiency = None
    if probe is not None and disk and totals["reads"]:
        block = int(totals["bytes_read"] / totals["reads"])
        bandwidth = probe.bandwidth(block, config.io_threads)
        roofline = bandwidth / disk
        roofline_info = {
            "request_bytes": block,
            "queue_depth": config.io_threads,
            "bytes_per_s": bandwidth,
            "probe_device": probe.device,
        }
        efficiency = median / roofline if median is not None else None
    decode_seconds = totals["decode_seconds"]
    stall = totals["stall_seconds"]
    accesses = totals["hits"] + totals["misses"]
    issued, used = totals["prefetch_issued"], totals["prefetch_used"]
    prefetching = config.predictor != "none"
    q = next((run["quality"] for run in runs if run.get("quality")), None)
    cold_dropped = all(run.get("cold_dropped") for run in runs)
    peaks = [run.get("peak_rss_bytes") for run in runs]
    return BenchResult(
        schema_version=SCHEMA_VERSION,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        engine=engine_version(),
        machine=machine_fingerprint(request.model),
        model=model_id,
        workload=runs[0]["workload"],
        config=config.to_dict(),
        memory_limit={k: v for k, v in limit_info.items() if k != "peak_bytes"},
        cold={
            "requested": request.cold,
            "enforced": request.cold and cold_dropped,
            "reason": None if not request.cold or cold_dropped else "posix_fadvise is not available on this OS",
        },
        repeats=len(repeats),
        decode_tok_s=median,
        decode_tok_s_ci=ci,
        decode_tok_s_slowest_window=window,
        window_seconds=span,
        prefill_tok_s=float(np.median([r["prefill_tok_s"] for r in repeats])),
        ttft_s=_median([r["ttft_s"] for r in repeats]),
        cached_experts_per_layer=runs[0]["repeats"][0]["cached_experts_per_layer"],
        hit_rate=totals["hits"] / accesses
        if config.cache_bytes and config.cache_policy != "none" and accesses
        else None,
        bytes_read_per_token=per_token("bytes_read"),
        disk_bytes_per_token=disk,
        read_gbps=totals["disk_bytes"] / decode_seconds / 1e9 if totals["disk_bytes"] and decode_seconds else None,
        io_stall_frac=stall / decode_seconds if decode_seconds else None,
        compute_s_per_token=(decode_seconds - stall) / tokens if tokens else None,
        prefetch_precision=used / issued if prefetching and issued else None,
        prefetch_recall=used / totals["misses"] if prefetching and totals["misses"] else None,
        prefetch_timeliness=totals["prefetch_timely"] / used if prefetching and used else None,
        wasted_bytes_per_token=per_token("wasted_bytes") if prefetching else None,
        peak_rss_bytes=max(p for p in peaks if p is not None) if any(peaks) else None,
        memory_peak_bytes=max(run["limit"]["peak_bytes"] or 0 for run in runs) if limit_info["enforced"] else None,
        quality_top1=q["top1"] if q else None,
        quality_top1_excluded=q["top1_excluded"] if q else None,
        quality_kl=q["kl"] if q else None,
        quality_ppl_delta=q["perplexity_delta"] if q else None,
        roofline_tok_s=roofline,
        roofline=roofline_info,
        efficiency=efficiency,
        per_repeat=repeats,
        quality=q,
    )


def _repeat_figures(r: dict) -> dict:
    """One repeat's headline figures, kept in the result beside the summary."""
    steps = len(r.get("step_seconds", []))
    prefill_seconds = r.get("ttft_seconds", r.get("prefill_seconds"))
    return {
        "decode_tok_s": steps / r["decode_seconds"] if steps and r["decode_seconds"] else None,
        "prefill_tok_s": r["prompt_tokens"] / prefill_seconds,
        "ttft_s": r.get("ttft_seconds"),
        "decode": r.get("decode"),
        "prefill": r["prefill"],
        "tokens": r.get("tokens"),
    }


def _decode_totals(runs: list[dict]) -> dict:
    """Decode tokens and seconds, and every store counter, summed over the repeats (None if any lacks it)."""
    totals: dict = {"tokens": 0, "decode_seconds": 0.0, **dict.fromkeys(StoreStats().snapshot(), 0), "disk_bytes": 0}
    for run in runs:
        for r in run["repeats"]:
            if "decode" not in r:
                continue
            totals["tokens"] += len(r["step_seconds"])
            totals["decode_seconds"] += r["decode_seconds"]
            for key in totals.keys() - {"tokens", "decode_seconds"}:
                value = r["decode"].get(key)
                totals[key] = None if value is None or totals[key] is None else totals[key] + value
    return totals


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.median(present)) if present else None
