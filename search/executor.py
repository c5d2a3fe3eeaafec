"""Where trials run: one measurement (one cold repeat of one config) per Ray task, in a Ray worker process.

By default the command starts a local Ray instance for the run (no dashboard, a small object store) and
stops it at the end, even if the driver is killed (``search.reaper``); ``ray_address`` joins an existing cluster
instead. Every measurement asks for one unit
of the custom resource ``autoresearch_bench``, which each node offers once, so two measurements never share
a machine. The task itself runs ``run_bench``, whose child process holds the memory limit and the timeout;
a failure comes back as data (``reason``, ``message``), never as an exception that would stop the study.

Each result names the node that measured it (``node``: Ray's node id and the host). Speeds measured on different
machines are not comparable, so a trial's later repeats and the confirmation's rounds ask for that node by id
(``submit(..., node=...)``, Ray's hard node affinity: if the node is gone, the measurement fails, it never moves).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from engine.bench.probe_result import ProbeResult
from engine.bench.protocol import BenchFailure, BenchRequest, run_bench
from engine.bench.workloads import get_workload
from engine.config import EngineConfig
from search.errors import SearchError
from search.reaper import reaped
from search.screening import Simulation, run_simulation

BENCH_RESOURCE = "autoresearch_bench"  # one per node: real measurements never run side by side
OBJECT_STORE_BYTES = 80 << 20  # results are small JSON; Ray's minimum is about 75 MiB


@dataclass(frozen=True)
class Measurement:
    """One cold repeat of one config, as a Ray task receives it (plain data)."""

    model: str
    config: dict
    workload: str
    memory_limit: int
    warmup: int
    timeout_s: float | None
    quality_cache: str | None  # where quality references live; None skips the quality comparison
    probe: dict | None  # the disk probe for the roofline


def measure(m: Measurement) -> dict:
    """``{"result": BenchResult dict}``, or ``{"reason": ..., "message": ...}`` if the run failed; either with
    ``seconds``, the measurement's own wall time (the driver's time around it is the search's overhead)."""
    started = time.perf_counter()
    out = _measure(m)
    return out | {"seconds": time.perf_counter() - started}


def _measure(m: Measurement) -> dict:
    request = BenchRequest(
        model=Path(m.model),
        config=EngineConfig.from_dict(m.config),
        workload=get_workload(m.workload),
        memory_limit=m.memory_limit,
        repeats=1,
        warmup=m.warmup,
        timeout_s=m.timeout_s,
        cache_dir=Path(m.quality_cache) if m.quality_cache else None,
    )
    try:
        result = run_bench(request, ProbeResult.from_dict(m.probe) if m.probe else None)
    except BenchFailure as e:
        return {"reason": e.reason, "message": str(e)}
    except Exception as e:  # a bug or a bad model must fail this trial, not the study
        return {"reason": "crashed", "message": f"crashed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"}
    return {"result": result.to_dict() | {"node": this_node()}}


def this_node() -> dict[str, str]:
    """The Ray node this runs on: its id (what affinity asks for) and its host (what a user reads)."""
    return {"id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}


def _auth_hint() -> str:
    """Ray 2.60 turns token authentication on for a head node wherever ~/.ray/auth_token exists (a local Ray
    instance writes one), but a driver that joins it must be told."""
    if "RAY_AUTH_MODE" in os.environ:
        return ""
    return (". If the cluster uses token authentication, run with RAY_AUTH_MODE=token and the cluster's token in "
            "RAY_AUTH_TOKEN or ~/.ray/auth_token")  # fmt: skip


class RayExecutor:
    """Starts (or joins) Ray and runs measurements on it; ``with RayExecutor(address) as ex: ...``."""

    def __init__(self, address: str = "local") -> None:
        self.address = address
        self._measure = ray.remote(resources={BENCH_RESOURCE: 1}, max_retries=0)(measure)
        self._simulate = ray.remote(num_cpus=1, max_retries=0)(run_simulation)
        self._reaped = contextlib.ExitStack()

    def __enter__(self) -> RayExecutor:
        if self.address == "local":
            watch = self._reaped.enter_context(reaped())
            context = ray.init(
                address="local",  # a new instance even where RAY_ADDRESS or a `ray start` cluster exists
                num_cpus=os.cpu_count(),
                resources={BENCH_RESOURCE: 1},
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                configure_logging=False,
                log_to_driver=False,
            )
            watch(Path(context.address_info["session_dir"]))
        else:
            try:
                ray.init(address=self.address, configure_logging=False, log_to_driver=False)
            except ConnectionError as e:
                raise SearchError(f"could not join the Ray cluster at {self.address}: {e}{_auth_hint()}") from e
            if self.slots < 1:
                ray.shutdown()
                raise SearchError(
                    f"the Ray cluster at {self.address} offers no {BENCH_RESOURCE!r} resource: start each node "
                    f"that may measure with --resources '{{\"{BENCH_RESOURCE}\": 1}}'"
                )
        return self

    def __exit__(self, *exc: object) -> None:
        ray.shutdown()
        self._reaped.close()

    @property
    def slots(self) -> int:
        """Measurements that can run at once: one per node offering the resource."""
        return int(ray.cluster_resources().get(BENCH_RESOURCE, 0))

    @property
    def simulation_slots(self) -> int:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def submit(self, measurement: Measurement, node: str | None = None) -> ray.ObjectRef:
        """A measurement holds every core of its node, so nothing (a simulation) runs beside it; ``node``: on
        that node (its Ray id) and no other."""
        options: dict = {"num_cpus": self._measuring_cpus()}
        if node is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        return self._measure.options(**options).remote(measurement)

    def find(self, node: dict[str, str]) -> dict[str, str] | None:
        """``node`` (a ``this_node()``) if it still offers a measurement slot, else a node of the same host that
        does (a new Ray instance on the same machine: a resumed local study), else None."""
        nodes = [n for n in ray.nodes() if n["Alive"] and BENCH_RESOURCE in n["Resources"]]
        for n in nodes:
            if n["NodeID"] == node["id"]:
                return node
        for n in nodes:
            if n["NodeManagerHostname"] == node["host"]:
                return {"id": n["NodeID"], "host": node["host"]}
        return None

    def simulate(self, simulation: Simulation) -> ray.ObjectRef:
        return self._simulate.remote(simulation)

    def _measuring_cpus(self) -> float:
        cores = [node["Resources"].get("CPU", 0) for node in ray.nodes()
                 if node["Alive"] and BENCH_RESOURCE in node["Resources"]]  # fmt: skip
        return min(cores, default=1)

    def wait(self, refs: list[ray.ObjectRef], timeout_s: float) -> list[ray.ObjectRef]:
        """The refs among ``refs`` that are done, waiting up to ``timeout_s`` for the first."""
        if not refs:  # nothing to wait for (no node offers a slot yet): do not spin
            time.sleep(timeout_s)
            return []
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
        if done:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return done

    def result(self, ref: ray.ObjectRef) -> dict:
        try:
            return ray.get(ref)
        except ray.exceptions.OutOfMemoryError as e:  # Ray's own monitor killed the worker
            return {"reason": "out_of_memory", "message": f"out_of_memory: Ray killed the task's worker: {e}"}
        except ray.exceptions.RayError as e:  # the worker process died (killed, out of memory outside the limit)
            return {"reason": "crashed", "message": f"crashed: the Ray task failed: {e}"}

    def cancel(self, ref: ray.ObjectRef) -> None:
        ray.cancel(ref, force=True)
