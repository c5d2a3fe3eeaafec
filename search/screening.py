"""The low fidelity: a trial's config replayed on a routing trace by the engine's simulator, in about a second.

With ``[fidelity] trace`` in the experiment, each proposed config the trace can replay (the trace's weights
format; every cache, prefetch and I/O setting) is simulated first; only those whose predicted decode speed is
at least ``screen_ratio`` of the best prediction so far are measured for real. Screened-out trials are
recorded as pruned with ``fidelity = "simulator"`` and their predicted figures, in Optuna and MLflow alike.
The trace is recorded once, from the experiment's model and workload, if the file does not exist yet.

The simulator models the disk, the cache and the prefetcher, with the compute time recorded in the trace:
settings that change the compute (``compute_threads``, ``cache_format``, ``activations``, ``resident_weights``) are
not told apart by it, so the threshold is a ratio, not a rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.analysis.simulator import disk_bandwidth, simulate
from engine.analysis.trace import load_trace, record_trace
from engine.bench.probe_result import ProbeResult
from engine.bench.workloads import Workload
from engine.config import EngineConfig


@dataclass(frozen=True)
class Simulation:
    """One simulated trial, as a Ray task receives it (plain data)."""

    trace: str
    config: dict
    bandwidth: float | None  # bytes/s; None: the probe's at the config's request size and depth
    probe: dict | None


def run_simulation(s: Simulation) -> dict:
    """``{"result": SimResult dict}``, or ``{"reason": "unsimulable", "message": ...}`` for a config the trace
    cannot replay (another weights format, more candidates than recorded), which is then measured for real."""
    config = EngineConfig.from_dict(s.config)
    bandwidth = s.bandwidth if s.bandwidth is not None else disk_bandwidth(ProbeResult.from_dict(s.probe), config)
    try:
        result = simulate(load_trace(s.trace), config, bandwidth)
    except ValueError as e:
        return {"reason": "unsimulable", "message": str(e)}
    return {"result": result.to_dict()}


def ensure_trace(path: Path, model: Path, workload: Workload) -> bool:
    """Record ``path`` from ``model`` on ``workload`` (default config) unless it exists; True if recorded."""
    if path.exists():
        load_trace(path)  # a bad file fails here, naming itself, before any trial
        return False
    record_trace(model, workload, EngineConfig()).save(path)
    return True
