"""``make bench-simulator``: how fast the trace simulator is, and how well it predicts the engine.

1. Replay speed: expert lookups per second for several configurations.
2. Predicted against measured: a trace of decode-short on the 8 GiB synthetic checkpoint, replayed for each
   configuration with the recorded compute time per token and reads served at the disk probe's bandwidth (and,
   beside it, at the bandwidth the engine's reader alone reaches on the model's files), against the same
   configuration benchmarked cold under an enforced limit a third of the checkpoint's size; the error of each
   prediction and the rank correlation over all of them.
3. Each policy's hit rate as a fraction of Belady's optimal one, at several cache sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from engine.analysis.simulator import SimResult, disk_bandwidth, reader_bandwidth, simulate
from engine.analysis.trace import Trace, load_trace, record_trace
from engine.bench.fingerprint import command_line, report_header, write_report
from engine.bench.probe import ENGINE_GRID, load_or_probe
from engine.bench.probe_result import ProbeResult
from engine.bench.protocol import BenchFailure, BenchRequest, run_bench
from engine.bench.stats import median_ci
from engine.bench.workloads import get_workload
from engine.config import CACHE_POLICIES, EngineConfig
from engine.paths import default_cache_dir
from engine.reports.engine_report import _synthetic
from engine.units import format_bytes, parse_bytes

KiB, MiB = 1 << 10, 1 << 20
WORKLOAD = "decode-short"
STREAMING = {"io_mode": "direct", "cache_format": "packed", "io_block_bytes": MiB, "io_threads": 4}


def candidates(limit: int) -> dict[str, EngineConfig]:
    """The configurations compared: cache size, policy, scope and predictor varied around direct, packed reads of
    1 MiB x 4, and three with small serial reads. Chosen from their predicted speeds, before any measurement, to
    spread over a wide range: a rank correlation among near-equal speeds would measure the disk's drift."""

    def config(**knobs) -> EngineConfig:
        return EngineConfig(**{**STREAMING, **knobs})

    half, quarter = limit // 2, limit // 4
    serial = {"io_block_bytes": 256 * KiB, "io_threads": 1}
    return {
        "no cache, 256 KiB x 1": config(**serial),
        "static 50%, 256 KiB x 1": config(cache_policy="static", cache_bytes=half, **serial),
        "lfu 50% + gate_lookahead, 256 KiB x 1": config(
            cache_policy="lfu", cache_bytes=half, predictor="gate_lookahead", **serial
        ),
        "no cache": config(),
        "lru 25%": config(cache_policy="lru", cache_bytes=quarter),
        "lru 50%": config(cache_policy="lru", cache_bytes=half),
        "lfu 50%": config(cache_policy="lfu", cache_bytes=half),
        "lru 50% per layer": config(cache_policy="lru", cache_bytes=half, cache_scope="per_layer"),
        "lru 50% + coactivation": config(cache_policy="lru", cache_bytes=half, predictor="coactivation"),
        "lru 25% + gate_lookahead": config(cache_policy="lru", cache_bytes=quarter, predictor="gate_lookahead"),
        "slru 50% + gate_lookahead x2": config(
            cache_policy="slru", cache_bytes=half, predictor="gate_lookahead", prefetch_extra=2
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data")
    parser.add_argument("--out", default="docs/benchmarks/simulator.md")
    parser.add_argument("--size", default="8GiB")
    parser.add_argument("--memory-limit", default="2.5GiB")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of measured runs")
    args = parser.parse_args(argv)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    limit = parse_bytes(args.memory_limit, "--memory-limit")
    model = _synthetic(data, parse_bytes(args.size, "--size"))
    probe = load_or_probe(model, default_cache_dir(), **ENGINE_GRID)
    trace = _trace(model, data / "traces" / f"{model.name}-{WORKLOAD}.npz")
    configs = candidates(limit)
    title = "Trace simulator report"
    sections = [report_header(title, "bench-simulator", "engine.reports.simulator_report", command_line(argv), data)]
    sections.append(_speed(trace, configs, limit, probe))
    sections.append(_predictions(model, trace, configs, limit, args.rounds, probe, Path(args.out)))
    sections.append(_optimality(trace, limit))
    write_report(Path(args.out), sections)
    return 0


def _trace(model: Path, path: Path) -> Trace:
    """The trace of the workload, recorded with direct packed reads (so its compute time is theirs)."""
    record_trace(model, get_workload(WORKLOAD), EngineConfig(**STREAMING)).save(path)
    return load_trace(path)


def _heavier(limit: int) -> dict[str, EngineConfig]:
    """Replay speed only: settings whose own work per layer is the most (cache-aware routing ranks each token's
    candidates; coactivation further ahead chains an E x E matrix per layer per token)."""
    lru = {**STREAMING, "cache_policy": "lru", "cache_bytes": limit // 2}
    return {
        "lru 50% + cache-aware routing": EngineConfig(**lru, cache_routing_tolerance=0.05),
        "lru 50% + coactivation, 2 layers ahead": EngineConfig(**lru, predictor="coactivation", prefetch_depth=2),
        "lru 50% + coactivation, 4 layers ahead": EngineConfig(**lru, predictor="coactivation", prefetch_depth=4),
        "lru 50% + gate_lookahead, 4 layers ahead": EngineConfig(**lru, predictor="gate_lookahead", prefetch_depth=4),
    }


def _speed(trace: Trace, configs: dict[str, EngineConfig], limit: int, probe: ProbeResult) -> str:
    lines = [
        "## Replay speed",
        "",
        f"Expert lookups replayed per second of wall time (one warm-up pass and 20 counted passes of the trace, "
        f"{len(trace.token_ids)} tokens x {len(trace.moe_layers)} MoE layers x top-{trace.top_k}, "
        f"{trace.num_experts} experts per layer; target: one million), counters only (every read done at once) "
        "and with the disk model (reads at the probe's bandwidth, as the tuner screens configurations); median of "
        "3. The configurations compared below, then heavier settings.",
        "",
        "| configuration | lookups | lookups/s, counters only | lookups/s, disk model |",
        "|---|---|---|---|",
    ]
    slowest = float("inf")
    for name, config in {**configs, **_heavier(limit)}.items():
        rates = []
        for bandwidth in (float("inf"), disk_bandwidth(probe, config)):
            results = [simulate(trace, config, bandwidth, warmup=1, repeats=20) for _ in range(3)]
            rates.append(statistics.median(r.accesses_per_second for r in results))
        if name in configs:
            slowest = min(slowest, *rates)
        lookups = round(results[0].accesses_per_second * results[0].replay_seconds)
        lines.append(f"| {name} | {lookups} | {rates[0] / 1e6:.2f} M | {rates[1] / 1e6:.2f} M |")
    lines += [
        "",
        f"- the slowest of the configurations compared: **{slowest / 1e6:.2f} M** lookups/s (target: one million)",
    ]
    return "\n".join(lines)


def _cell(config: EngineConfig) -> tuple[str, int, int]:
    return config.io_mode, config.io_block_bytes, config.io_threads


def _measure(
    model: Path, trace: Trace, configs: dict[str, EngineConfig], limit: int, rounds: int, probe: ProbeResult
) -> tuple[dict[str, list], dict[tuple, list[float]]]:
    """Each configuration benchmarked once per round (a warm-up and one measured pass), the rounds interleaved so
    that the shared disk's drift reaches every configuration alike; the reader's bandwidth measured each round."""
    results: dict[str, list] = {name: [] for name in configs}
    reader: dict[tuple, list[float]] = {}
    for r in range(rounds):
        for config in configs.values():
            if len(reader.setdefault(_cell(config), [])) == r:
                reader[_cell(config)].append(reader_bandwidth(model, config, trace.top_k, seed=r))
        for name, config in configs.items():
            request = BenchRequest(
                model=model,
                config=config,
                workload=get_workload(WORKLOAD),
                memory_limit=limit,
                repeats=1,
                timeout_s=1800,
            )
            try:
                results[name].append(run_bench(request, probe))
            except BenchFailure as failure:
                results[name].append(failure)
    return results, reader


def _predictions(
    model: Path,
    trace: Trace,
    configs: dict[str, EngineConfig],
    limit: int,
    rounds: int,
    probe: ProbeResult,
    out: Path,
) -> str:
    results, reader_runs = _measure(model, trace, configs, limit, rounds, probe)
    reader = {cell: statistics.median(values) for cell, values in reader_runs.items()}
    rows, details = [], {}
    predicted: dict[str, list[float]] = {"probe": [], "reader": []}
    measured: list[float] = []
    for name, config in configs.items():
        sims = {
            "probe": simulate(trace, config, disk_bandwidth(probe, config)),
            "reader": simulate(trace, config, reader[_cell(config)]),
        }
        failures = [r for r in results[name] if isinstance(r, BenchFailure)]
        if failures:
            rows.append(f"| {name} | failed: {failures[0]} |" + " |" * 6)
            continue
        speeds = [r.decode_tok_s for r in results[name]]
        median, low, high = median_ci(speeds)
        details[name] = {
            "simulated": {k: v.to_dict() for k, v in sims.items()},
            "measured": [r.to_dict() for r in results[name]],
        }
        measured.append(median)
        for source, sim in sims.items():
            predicted[source].append(sim.predicted_decode_tok_s or float("nan"))
        rows.append(_row(name, sims, results[name][0], (median, low, high)))
    details_path = out.with_suffix(".json")
    details_path.write_text(json.dumps(details, indent=2) + "\n")
    summary = []
    for source, values in predicted.items():
        errors = [p / m - 1 for p, m in zip(values, measured, strict=True)]
        within = sum(abs(e) <= 0.15 for e in errors)
        rho = float(spearmanr(values, measured).statistic) if len(values) > 2 else float("nan")
        median_error = 100 * float(np.median(np.abs(errors))) if errors else float("nan")
        summary.append(
            f"- reads at the {source}'s bandwidth: within 15% **{within} of {len(errors)}** (target: all), median "
            f"absolute error **{median_error:.1f}%**, Spearman rank correlation **{rho:.2f}** (target: 0.9 or more)"
        )
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    meta = trace.meta
    bandwidths = ", ".join(
        f"{format_bytes(block)} x {threads} ({mode}): probe {probe.bandwidth(block, threads) / 1e6:.0f} MB/s, "
        f"reader {reader[(mode, block, threads)] / 1e6:.0f} MB/s"
        for mode, block, threads in reader
    )
    return "\n".join(
        [
            "## Predicted against measured decode speed",
            "",
            f"`{model}` ({format_bytes(size)}, {size / limit:.1f}x the limit), workload {WORKLOAD}. Measured: "
            f"`autoresearch bench` cold under an enforced {format_bytes(limit)} limit, {rounds} rounds, each "
            "running every configuration once (a warm-up pass, then one measured), so that the shared disk's drift "
            "reaches all alike; median over the rounds and its 95% CI. Predicted: the trace replayed (one warm-up "
            f"pass, one counted) through the engine's own ledger, compute {1e3 * meta['decode_seconds_per_token']:.1f} "
            "ms per decode token as measured while recording the trace (direct, packed), reads served one after "
            "another at the disk probe's bandwidth for the configuration's request size and queue depth, or at the "
            "bandwidth the engine's reader alone reached on the model's files with those reads (a layer's experts "
            f"at a time, 3 s at the start of each round, median): {bandwidths}. Hit rates and bytes are the decode "
            "steps'.",
            "",
            "| configuration | predicted tok/s, probe / reader | measured tok/s [95% CI] | error, probe / reader "
            "| hit rate sim / engine (optimal) | expert bytes/token sim / engine | prefetch precision sim / engine "
            "| I/O stall sim (probe) / engine |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            *summary,
            "",
            f"Full results: `{details_path}`.",
            "",
            "Configurations: " + "; ".join(f"**{n}** `{json.dumps(c.to_dict())}`" for n, c in configs.items()),
        ]
    )


def _row(name: str, sims: dict[str, SimResult], result, speed: tuple[float, float, float]) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.0f}%"

    median, low, high = speed
    sim = sims["probe"]
    speeds = [s.predicted_decode_tok_s or float("nan") for s in sims.values()]
    cells = [
        " / ".join(f"{v:.2f}" for v in speeds),
        f"{median:.2f} [{low:.2f}, {high:.2f}]",
        " / ".join(f"{100 * (v / median - 1):+.1f}%" for v in speeds),
        f"{pct(sim.hit_rate)} / {pct(result.hit_rate)} ({pct(sim.optimal_hit_rate)})",
        f"{format_bytes(sim.bytes_read_per_token)} / {format_bytes(result.bytes_read_per_token or 0)}",
        f"{pct(sim.prefetch_precision)} / {pct(result.prefetch_precision)}",
        f"{pct(sim.io_stall_frac)} / {pct(result.io_stall_frac)}",
    ]
    return f"| {name} | " + " | ".join(cells) + " |"


def _optimality(trace: Trace, limit: int) -> str:
    fractions = (0.1, 0.25, 0.5)
    lines = [
        "## Each policy against the optimal cache",
        "",
        "Hit rate over the decode steps, and as a fraction of Belady's bound for the same budget and the same "
        "lookups (global scope, direct packed reads, caches as a share of the limit).",
        "",
        "| policy | " + " | ".join(f"{100 * f:.0f}% of the limit" for f in fractions) + " |",
        "|---" * (len(fractions) + 1) + "|",
    ]
    for policy in (p for p in CACHE_POLICIES if p != "none"):
        cells = []
        for fraction in fractions:
            config = EngineConfig(**STREAMING, cache_policy=policy, cache_bytes=int(fraction * limit))
            sim = simulate(trace, config)
            share = sim.hit_rate / sim.optimal_hit_rate if sim.optimal_hit_rate else float("nan")
            cells.append(f"{100 * sim.hit_rate:.1f}% of {100 * sim.optimal_hit_rate:.1f}% ({share:.2f})")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
