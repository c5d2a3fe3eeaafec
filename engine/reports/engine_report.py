"""``make bench-engine``: the streaming engine's own benchmark, written as a markdown report.

1. Kernels: fused dequantize-and-multiply throughput in GB/s of packed weights, against plain numpy.
2. Streaming: the reader alone (``O_DIRECT``, no compute) against the disk probe at the same request size and
   queue depth, fio-like and spread over the reader's memory, interleaved round by round.
3. Decode: configurations on the 8 GiB synthetic checkpoint, cold, under an enforced limit at most a third of
   its size: tok/s with its interval, hit rate, bytes per token, read bandwidth beside the probe, efficiency,
   quality; int8 and int4 copies through the ``weights`` knob.
4. The fastest lossless one against the ``mmap`` baseline, interleaved, with the ratio's interval.
5. The frontier models' shapes: a Kimi-K2.5-shaped synthetic checkpoint (bf16 experts, then int4 ones as Kimi
   K2.5 ships them) and a Qwen3.5-397B-shaped one of the same size under the same limit, the best streaming
   configuration against ``mmap``, interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from engine.bench.fingerprint import command_line, report_header, write_report
from engine.bench.kernel_bench import kernel_table
from engine.bench.probe import ENGINE_GRID, load_or_probe, probe_directory, spread_bandwidth
from engine.bench.protocol import BenchFailure, BenchRequest, run_bench
from engine.bench.result import BenchResult
from engine.bench.streaming import stream_throughput
from engine.bench.workloads import get_workload
from engine.config import EngineConfig
from engine.paths import default_cache_dir
from engine.synth import sized_shape, synthesize
from engine.synth.weights import DEFAULT_KNOBS
from engine.units import format_bytes, parse_bytes

KiB, MiB = 1 << 10, 1 << 20
STREAM_CELLS = ((256 * KiB, 4), (MiB, 4), (MiB, 8), (2 * MiB, 4))
BASELINE = EngineConfig(io_mode="mmap", cache_format="packed")
FRONTIER = {  # label: (synthetic architecture, its experts' format, what it stands for)
    "Kimi-K2.5-shaped": (
        "deepseek_v3", "dtype", "Kimi K2.5's proportions: 384 experts, top-8, a shared expert, latent attention; bf16"),
    "Kimi-K2.5-shaped, int4": (
        "deepseek_v3", "int4", "the same, its experts int4 in groups of 32 as Kimi K2.5 ships them"),
    "Qwen3.5-397B-shaped": (
        "qwen3_5_moe", "dtype", "Qwen3.5-397B-A17B's proportions: 512 experts, top-10, a shared expert, 3 Gated "
        "DeltaNet layers to 1 attention; bf16 as published"),
}  # fmt: skip


def candidates(limit: int) -> dict[str, EngineConfig]:
    """The configurations measured, by name; caches take half the limit. Only the last two change the output."""
    cache = limit // 2
    direct = EngineConfig(io_mode="direct", cache_format="packed", io_block_bytes=MiB, io_threads=4)
    return {
        "mmap (baseline)": BASELINE,
        "pread": EngineConfig(io_mode="pread", cache_format="packed", io_block_bytes=MiB, io_threads=4),
        "direct": direct,
        "direct + lru": EngineConfig(**{**direct.to_dict(), "cache_policy": "lru", "cache_bytes": cache}),
        "direct + lru + gate_lookahead": EngineConfig(
            **{**direct.to_dict(), "cache_policy": "lru", "cache_bytes": cache, "predictor": "gate_lookahead"}
        ),
        "direct + slru + gate_lookahead x2": EngineConfig(
            **{
                **direct.to_dict(),
                "cache_policy": "slru",
                "cache_bytes": cache,
                "predictor": "gate_lookahead",
                "prefetch_extra": 2,
            }
        ),
        "direct + lru + gate_lookahead, float32 cache": EngineConfig(
            io_mode="direct", io_block_bytes=MiB, io_threads=4, cache_policy="lru", cache_bytes=cache,
            predictor="gate_lookahead",
        ),
        **{
            f"direct + lru + gate_lookahead, {weights} weights": EngineConfig(
                **{**direct.to_dict(), "cache_policy": "lru", "cache_bytes": cache, "predictor": "gate_lookahead",
                   "weights": weights}
            )
            for weights in ("int8", "int4")
        },
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data")
    parser.add_argument("--out", default="docs/benchmarks/engine.md")
    parser.add_argument("--size", default="8GiB")
    parser.add_argument("--memory-limit", default="2.5GiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved probe/stream rounds")
    args = parser.parse_args(argv)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    limit = parse_bytes(args.memory_limit, "--memory-limit")
    model = _synthetic(data, parse_bytes(args.size, "--size"))
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    if size < 3 * limit:
        raise SystemExit(f"{model} ({format_bytes(size)}) is not 3x the limit {format_bytes(limit)}")
    title = "Streaming engine report"
    sections = [report_header(title, "bench-engine", "engine.reports.engine_report", command_line(argv), data)]
    sections.append(_kernels())
    probe = load_or_probe(model, default_cache_dir(), **ENGINE_GRID)
    sections.append(_streaming(model, args.rounds))
    results = _decode(model, size, limit, args.repeats, probe, Path(args.out).with_suffix(".json"))
    sections.append(results[0])
    sections.append(_versus(model, limit, args.repeats, probe, results[1]))
    sections.append(_frontier(data, parse_bytes(args.size, "--size"), limit, args.repeats, probe))
    write_report(Path(args.out), sections)
    return 0


def _synthetic(data: Path, size: int, arch: str = "qwen3_moe", experts: str = "dtype") -> Path:
    name = f"synth-{format_bytes(size).replace(' ', '')}"
    model = data / (name if arch == "qwen3_moe" else f"{name}-{arch}")
    if experts != "dtype":
        model = model.with_name(f"{model.name}-{experts}")
    if not (model / "config.json").exists():
        synthesize(model, sized_shape(arch, size, "bf16", experts), knobs=DEFAULT_KNOBS[arch], experts=experts)
    return model


def _kernels() -> str:
    return "\n".join(["## Kernels", "", kernel_table()])


def _streaming(model: Path, rounds: int) -> str:
    probe, spread, stream = ({cell: [] for cell in STREAM_CELLS} for _ in range(3))
    footprint = 0
    for r in range(rounds):
        for block, threads in STREAM_CELLS:
            config = EngineConfig(io_mode="direct", io_block_bytes=block, io_threads=threads)
            cell = probe_directory(model, (block,), (threads,), seconds_per_cell=2.0, repeats=1, huge_pages=True)
            probe[(block, threads)].append(cell.bandwidth(block, threads))
            bytes_per_s, footprint = stream_throughput(model, config, 3.0, experts_per_step=4, seed=r)
            stream[(block, threads)].append(bytes_per_s)
            spread[(block, threads)].append(spread_bandwidth(model, block, threads, footprint, seed=r))
    lines = [
        "## Streaming against the disk probe",
        "",
        f"The reader alone (`O_DIRECT` through native AIO, huge-page buffers, a layer's 4 random experts per "
        f"step, no compute) against the probe at the same request size and queue depth, reading as fio does into "
        f"one buffer per request in flight, and against the same probe reading into as much memory as the reader "
        f"does ({format_bytes(footprint)}: each expert lands in its own buffer); {rounds} rounds alternating the "
        "three, medians.",
        "",
        "| request | in flight | probe MB/s | probe, spread MB/s | reader MB/s | reader / probe | reader / spread |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in STREAM_CELLS:
        p, w, s = (statistics.median(values[cell]) for values in (probe, spread, stream))
        lines.append(
            f"| {format_bytes(cell[0])} | {cell[1]} | {p / 1e6:.0f} | {w / 1e6:.0f} | {s / 1e6:.0f} | {s / p:.2f} "
            f"| {s / w:.2f} |"
        )
    return "\n".join(lines)


def _request(model: Path, config: EngineConfig, limit: int, repeats: int, vs: EngineConfig | None = None):
    return BenchRequest(
        model=model,
        config=config,
        workload=get_workload("decode-short"),
        memory_limit=limit,
        repeats=repeats,
        cold=True,
        vs=vs,
        timeout_s=1800,
        cache_dir=default_cache_dir(),
    )


def _decode(model: Path, size: int, limit: int, repeats: int, probe, details_path: Path) -> tuple[str, EngineConfig]:
    rows, best, best_speed = [], BASELINE, 0.0
    details = {}
    for name, config in candidates(limit).items():
        try:
            result = run_bench(_request(model, config, limit, repeats), probe)
        except BenchFailure as failure:
            rows.append(f"| {name} | failed: {failure} |" + " |" * 10)
            continue
        details[name] = result.to_dict()
        rows.append(_row(name, result))
        lossless = config.weights == "original" and name != "mmap (baseline)"
        if lossless and (result.decode_tok_s or 0) > best_speed:
            best, best_speed = config, result.decode_tok_s or 0
    details_path.parent.mkdir(parents=True, exist_ok=True)
    details_path.write_text(json.dumps(details, indent=2) + "\n")
    text = [
        f"## Decode under an enforced {format_bytes(limit)} limit",
        "",
        f"`{model}` ({format_bytes(size)}, {size / limit:.1f}x the limit), workload decode-short, cold (pages "
        f"dropped before each repeat), {repeats} repeats after a warm-up, each configuration in its own cgroup. "
        "Caches get half the limit. The probe column is the huge-page probe at the run's mean request size and "
        "its reader threads; the roofline is that bandwidth over the disk bytes per token. Quality is against the "
        "original weights with every routed expert (top-1 agreement, mean KL in nats, where a few 1e-9 either side "
        "of 0 are float32 rounding); the int8 and int4 rows run "
        "a repacked copy the run made once. Full results: "
        f"`{details_path}`.",
        "",
        "| configuration | decode tok/s [95% CI] | hit rate | expert bytes/token | disk bytes/token | read MB/s "
        "| probe MB/s | roofline tok/s | efficiency | I/O stall | prefetch precision / recall | top-1 / KL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Configurations: " + "; ".join(f"**{n}** `{json.dumps(c.to_dict())}`" for n, c in candidates(limit).items()),
    ]
    return "\n".join(text), best


def _row(name: str, r: BenchResult) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.0f}%"

    low, high = r.decode_tok_s_ci or (float("nan"), float("nan"))
    probe_mbs = r.roofline["bytes_per_s"] / 1e6 if r.roofline else None
    cells = [
        f"{r.decode_tok_s:.2f} [{low:.2f}, {high:.2f}]",
        pct(r.hit_rate),
        format_bytes(r.bytes_read_per_token or 0),
        format_bytes(r.disk_bytes_per_token or 0),
        "n/a" if r.read_gbps is None else f"{r.read_gbps * 1e3:.0f}",
        "n/a" if probe_mbs is None else f"{probe_mbs:.0f}",
        "n/a" if r.roofline_tok_s is None else f"{r.roofline_tok_s:.2f}",
        pct(r.efficiency),
        pct(r.io_stall_frac),
        f"{pct(r.prefetch_precision)} / {pct(r.prefetch_recall)}",
        "n/a" if r.quality_top1 is None else f"{100 * r.quality_top1:.1f}% / {r.quality_kl:.2g}",
    ]
    return f"| {name} | " + " | ".join(cells) + " |"


def _versus(model: Path, limit: int, repeats: int, probe, best: EngineConfig) -> str:
    result = run_bench(_request(model, best, limit, repeats, vs=BASELINE), probe)
    vs = result.vs or {}
    ratio, (low, high) = vs.get("ratio", float("nan")), vs.get("ratio_ci", (float("nan"), float("nan")))
    return "\n".join(
        [
            "## The fastest lossless configuration against the mmap baseline, interleaved",
            "",
            f"`{json.dumps(best.to_dict())}` against `{json.dumps(BASELINE.to_dict())}`: {repeats} one-repeat "
            "children of each, alternating, cold, same limit.",
            "",
            f"Decode speed ratio: **{ratio:.2f}x** [{low:.2f}, {high:.2f}] (95% paired bootstrap; target: 2x).",
        ]
    )


def _frontier(data: Path, size: int, limit: int, repeats: int, probe) -> str:
    best = candidates(limit)["direct + slru + gate_lookahead x2"]
    rows, ratios = [], []
    for label, (arch, experts, description) in FRONTIER.items():
        model = _synthetic(data, size, arch, experts)
        try:
            result = run_bench(_request(model, best, limit, repeats, vs=BASELINE), probe)
        except BenchFailure as failure:
            rows.append(f"| {label}: best | failed: {failure} |" + " |" * 10)
            continue
        vs = result.vs or {}
        rows += [_row(f"{label}: mmap (baseline)", BenchResult(**vs["result"])), _row(f"{label}: best", result)]
        low, high = vs.get("ratio_ci", (float("nan"), float("nan")))
        shape = json.loads((model / "config.json").read_text())
        ratios.append(
            f"- **{label}** ({description}): `{model}`, {shape['num_hidden_layers']} layers, "
            f"{format_bytes(sum(p.stat().st_size for p in model.glob('*.safetensors')))}; best against mmap "
            f"**{vs.get('ratio', float('nan')):.2f}x** [{low:.2f}, {high:.2f}]"
        )
    return "\n".join(
        [
            "## The frontier models' shapes",
            "",
            f"Synthetic checkpoints of the architectures people stream today, in their published proportions at a "
            f"quarter or less of their width, as deep as {format_bytes(size)} allows; cold under the same enforced "
            f"{format_bytes(limit)} limit, workload decode-short, {repeats} one-repeat children of each "
            f"configuration alternating. Best: `{json.dumps(best.to_dict())}` (direct + slru + gate_lookahead x2).",
            "",
            *ratios,
            "",
            "| configuration | decode tok/s [95% CI] | hit rate | expert bytes/token | disk bytes/token | read MB/s "
            "| probe MB/s | roofline tok/s | efficiency | I/O stall | prefetch precision / recall | top-1 / KL |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
