"""The benchmark's child process: load the model once, warm up, run the measured repeats, write the figures.

Run as ``python -m engine.bench.worker REQUEST.json``; its mode is ``bench``, ``reference`` (the quality
reference), or ``compile`` (a bench run's warm-up only, outside the budget, so that compiled code is cached).
The parent has already placed this process under the memory limit, so everything it allocates and every page it
reads is charged to the budget.
Shapes: T = tokens scored, V = vocabulary.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from engine.bench import quality
from engine.bench.workloads import Workload, get_workload
from engine.config import EngineConfig
from engine.model.generate import generate_steps, score
from engine.model.load import Model, load_model

PROC_IO = Path("/proc/self/io")


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    workload = get_workload(request["workload"])
    mode = request["mode"]
    config = EngineConfig() if mode == "reference" else EngineConfig.from_dict(request["config"])
    model = load_model(request["model"], config)
    try:
        prompt = workload.tokens(model)
        out = (
            run_reference(model, workload, prompt, request)
            if mode == "reference"
            else run_bench(model, workload, prompt, request)
        )
    finally:
        model.close()
    out["workload"] = workload.identity(prompt)
    out["peak_rss_bytes"] = _peak_rss()
    Path(request["out"]).write_text(json.dumps(out))
    return 0


def run_bench(model: Model, workload: Workload, prompt: list[int], request: dict) -> dict:
    runs = []
    cold_dropped = None
    for _ in range(request["warmup"] + request["repeats"]):
        if request["cold"]:
            cold_dropped = model.drop_cached_pages()
        runs.append(measure(model, workload, prompt))
    out: dict = {
        "warmup": runs[: request["warmup"]],
        "repeats": runs[request["warmup"] :],
        "cold_dropped": cold_dropped,
    }
    if request.get("reference"):
        tokens, reference_logp = quality.load_reference(Path(request["reference"]))
        logp = quality.log_softmax(score(model, tokens.tolist()))
        out["quality"] = quality.compare(reference_logp, logp, tokens).to_dict()
    return out


def run_reference(model: Model, workload: Workload, prompt: list[int], request: dict) -> dict:
    tokens = prompt
    if workload.kind == "generate":
        tokens = prompt + measure(model, workload, prompt)["tokens"]
    logp = quality.log_softmax(score(model, tokens))  # [T, V]
    quality.save_reference(Path(request["reference"]), np.asarray(tokens), logp)
    return {"tokens": len(tokens)}


def measure(model: Model, workload: Workload, prompt: list[int]) -> dict:
    """One pass of the workload with its timings and I/O counters (decode counters exclude the prefill)."""
    counters = _Counters(model)
    held = {"cached_experts_per_layer": model.decoder.store.experts_per_layer}
    if workload.kind == "score":
        start = time.perf_counter()
        score(model, prompt)
        seconds = time.perf_counter() - start
        return {"prompt_tokens": len(prompt), "prefill_seconds": seconds, "prefill": counters.take(), **held}
    sampler = workload.sampler(model)
    start = time.perf_counter()
    stamps: list[float] = []
    tokens: list[int] = []
    prefill: dict = {}
    for token in generate_steps(model, prompt, sampler):
        stamps.append(time.perf_counter())
        tokens.append(token)
        if len(tokens) == 1:
            prefill = counters.take()
        if len(tokens) == workload.new_tokens:
            break
    steps = np.diff(stamps).tolist()
    return {
        "prompt_tokens": len(prompt),
        "tokens": tokens,
        "ttft_seconds": stamps[0] - start,
        "step_seconds": steps,
        "decode_seconds": float(sum(steps)),
        "prefill": prefill,
        "decode": counters.take(),
        **held,
    }


class _Counters:
    """Differences of the expert store's counters and of the bytes this process fetched from storage."""

    def __init__(self, model: Model):
        self.stats = model.decoder.store.stats
        self.last = self._now()

    def _now(self) -> dict:
        return {**self.stats.snapshot(), "disk_bytes": _disk_read_bytes()}

    def take(self) -> dict:
        now = self._now()
        diff = {k: None if now[k] is None else now[k] - self.last[k] for k in now}
        self.last = now
        return diff


def _disk_read_bytes() -> int | None:
    """Bytes this process caused to be fetched from storage (Linux ``read_bytes``); None elsewhere."""
    try:
        for line in PROC_IO.read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
