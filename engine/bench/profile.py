"""Where a decode token's time goes: milliseconds per token by phase, with the bandwidth the compute reaches.

    python -m engine.bench.profile --model DIR [--config C.toml] [--workload decode-short] [--cold] [--json]

The phases wrap the decoder's and the store's own methods for the measured pass (nothing in the engine knows
it is profiled), so they add a few microseconds per call:

- attention: the attention block, its projections included;
- router: the routers' scores and top-k;
- prefetch: the predictor's proposals and the reads it stages (``route_done``);
- expert requests / expert waits: the store's bookkeeping and the reads it starts (``request``), and the time
  until each expert's bytes are there (``get``; ``io stall`` is the part spent waiting for reads);
- expert kernels: the compiled call of a decode token's experts (``moe_kernel``), and expert dispatch the rest
  of the MoE block (the per-expert path where that kernel does not apply, shared experts, Python);
- rest: embedding, norms, residuals, the output head and Python between layers.

Page faults are the process's own (minor: mapped from RAM; major: read from disk), per decoded token.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from engine.bench.workloads import get_workload
from engine.config import EngineConfig
from engine.model import decoder as decoder_module
from engine.model.generate import generate_steps
from engine.model.load import Model, load_model

PHASES = (
    "attention",
    "router",
    "prefetch",
    "expert requests",
    "expert waits",
    "expert kernels",
    "expert dispatch",
    "rest",
)


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys((*PHASES, "mlp", "forward"), 0.0)
        self.expert_bytes = 0

    def timed(self, phase: str, call: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - began

        return wrapper


def profile_decode(model: Model, workload_name: str = "decode-short", cold: bool = False) -> dict:
    """Run ``workload_name`` once to warm up, then again with every phase timed; figures per decoded token."""
    workload = get_workload(workload_name)
    if workload.kind != "generate":
        raise ValueError(f"profile needs a generate workload, not {workload_name!r} ({workload.kind})")
    prompt = workload.tokens(model)
    _decode(model, prompt, workload.new_tokens, workload.sampler(model))
    if cold:
        model.drop_cached_pages()
    clock = _Clock()
    decoder, store = model.decoder, model.decoder.store
    routed = decoder_module.routed_experts

    def routed_timed(x, experts, *args):
        clock.expert_bytes += sum(m.nbytes for e in experts for m in (*e.gate_up, e.down))
        return clock.timed("expert kernels", routed)(x, experts, *args)

    wrapped = {
        (decoder, "_attention"): "attention",
        (decoder, "route"): "router",
        (decoder, "_mlp"): "mlp",
        (decoder, "forward"): "forward",
        (store, "route_done"): "prefetch",
        (store, "request"): "expert requests",
        (store, "get"): "expert waits",  # get_all calls get
    }
    for (owner, name), phase in wrapped.items():
        setattr(owner, name, clock.timed(phase, getattr(owner, name)))
    decoder_module.routed_experts = routed_timed
    try:
        stall_before = store.stats.stall_seconds
        faults_before = resource.getrusage(resource.RUSAGE_SELF)
        tokens = _decode(model, prompt, workload.new_tokens, workload.sampler(model), skip_prefill=clock)
        faults = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        decoder_module.routed_experts = routed
        for owner, name in wrapped:
            delattr(owner, name)  # the class's method again
    return _figures(model, clock, tokens, store.stats.stall_seconds - stall_before, faults_before, faults)


def _decode(model: Model, prompt: list[int], new_tokens: int, sampler, skip_prefill: _Clock | None = None) -> int:
    """Generate ``new_tokens``; with a clock, zero it once the prefill is done, so it counts decode steps only."""
    count = 0
    for _ in generate_steps(model, prompt, sampler):
        count += 1
        if count == 1 and skip_prefill is not None:
            skip_prefill.seconds = dict.fromkeys(skip_prefill.seconds, 0.0)
            skip_prefill.expert_bytes = 0
        if count == new_tokens:
            break
    return count - 1  # decode steps after the prefill's token


def _figures(model: Model, clock: _Clock, steps: int, stall: float, before, after) -> dict:
    s = clock.seconds
    inner = ("router", "prefetch", "expert requests", "expert waits", "expert kernels")
    s["expert dispatch"] = s["mlp"] - sum(s[p] for p in inner)
    s["rest"] = s["forward"] - s["attention"] - s["mlp"]
    per_token = {phase: 1e3 * s[phase] / steps for phase in PHASES}
    attention_bytes = sum(
        sum(getattr(getattr(layer.attention, part), "nbytes", 0) for part in vars(layer.attention))
        for layer in model.decoder.layers
    )
    return {
        "steps": steps,
        "ms_per_token": per_token,
        "total_ms_per_token": 1e3 * s["forward"] / steps,
        "io_stall_ms_per_token": 1e3 * stall / steps,
        "expert_bytes_per_token": clock.expert_bytes / steps,
        "expert_kernel_gbps": clock.expert_bytes / s["expert kernels"] / 1e9 if s["expert kernels"] else None,
        "attention_weight_bytes_per_token": attention_bytes,
        "attention_gbps": attention_bytes * steps / s["attention"] / 1e9 if s["attention"] else None,
        "minor_faults_per_token": (after.ru_minflt - before.ru_minflt) / steps,
        "major_faults_per_token": (after.ru_majflt - before.ru_majflt) / steps,
    }


def table(profile: dict) -> str:
    """The profile as markdown: one row per phase, then the bandwidths and faults."""
    total = profile["total_ms_per_token"]
    rows = [f"| {phase} | {ms:.2f} | {100 * ms / total:.0f}% |" for phase, ms in profile["ms_per_token"].items()]

    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f} GB/s"

    notes = [
        f"io stall (within expert waits) {profile['io_stall_ms_per_token']:.2f} ms",
        f"expert kernels {rate(profile['expert_kernel_gbps'])} over "
        f"{profile['expert_bytes_per_token'] / 2**20:.1f} MiB per token",
        f"attention {rate(profile['attention_gbps'])} over its "
        f"{profile['attention_weight_bytes_per_token'] / 2**20:.1f} MiB of weights",
        f"page faults per token: {profile['minor_faults_per_token']:.0f} minor, "
        f"{profile['major_faults_per_token']:.0f} major",
    ]
    return "\n".join(
        [
            "| phase | ms / token | share |",
            "|---|---|---|",
            *rows,
            f"| **total** | **{total:.2f}** | {profile['steps']} decode steps |",
            "",
            "; ".join(notes) + ".",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--config", type=Path, help="engine config TOML (default: the engine's defaults)")
    parser.add_argument("--workload", default="decode-short")
    parser.add_argument("--cold", action="store_true", help="drop the model's pages before the measured pass")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    config = EngineConfig.load(args.config) if args.config else EngineConfig()
    model = load_model(args.model, config)
    try:
        profile = profile_decode(model, args.workload, args.cold)
    finally:
        model.close()
    print(json.dumps(profile, indent=2) if args.json else table(profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
