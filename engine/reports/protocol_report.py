"""``make bench-protocol``: the benchmark protocol's own benchmark, written as a markdown report.

1. The disk probe against fio at three request sizes and three queue depths, interleaved, medians of rounds.
2. An 8 GiB synthetic checkpoint (written if absent, timed) and its routing statistics beside real models'.
3. That checkpoint benchmarked cold under an enforced 3 GiB limit, 5 repeats: median, interval, roofline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from engine.analysis.routing_stats import format_table, measure
from engine.bench.fingerprint import report_header, write_report
from engine.bench.fio import fio_bandwidth
from engine.bench.probe import default_mechanism, load_or_probe, probe_directory
from engine.bench.protocol import BenchRequest, run_bench
from engine.bench.workloads import get_workload
from engine.config import EngineConfig
from engine.model.load import load_model
from engine.paths import default_cache_dir
from engine.synth import sized_shape, synthesize
from engine.synth.weights import DEFAULT_KNOBS
from engine.units import format_bytes, parse_bytes

BLOCKS = (16 << 10, 256 << 10, 2 << 20)
DEPTHS = (1, 8, 32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data", help="where the synthetic checkpoint and probe file live")
    parser.add_argument("--out", default="docs/benchmarks/protocol.md")
    parser.add_argument("--size", default="8GiB")
    parser.add_argument("--memory-limit", default="3GiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=11, help="interleaved probe/fio rounds")
    parser.add_argument("--seconds", type=float, default=2.0, help="per probe or fio cell")
    args = parser.parse_args(argv)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    options = f"--data {args.data} --size {args.size} --memory-limit {args.memory_limit} --repeats {args.repeats}"
    sections = [
        report_header(
            "Benchmark protocol report",
            "bench-protocol",
            "engine.reports.protocol_report",
            f"{options} --rounds {args.rounds} --seconds {args.seconds:g}",
            data,
        )
    ]
    sections.append(_probe_vs_fio(data, args.rounds, args.seconds))
    model, synth_section = _synthetic(data, parse_bytes(args.size, "--size"))
    sections.append(synth_section)
    sections.append(_routing(model))
    sections.append(_bench(model, parse_bytes(args.memory_limit, "--memory-limit"), args.repeats, Path(args.out)))
    write_report(Path(args.out), sections)
    return 0


def _probe_vs_fio(data: Path, rounds: int, seconds: float) -> str:
    lines = ["## Disk probe against fio", ""]
    if shutil.which("fio") is None:
        return "\n".join([*lines, "fio is not installed (`apt-get install fio`): no comparison was made."])
    cells = [(b, q) for b in BLOCKS for q in DEPTHS]
    ours: dict[tuple[int, int], list[float]] = {c: [] for c in cells}
    fio: dict[tuple[int, int], list[float]] = {c: [] for c in cells}
    fio_again: dict[tuple[int, int], list[float]] = {c: [] for c in cells}
    fio_sync: dict[tuple[int, int], list[float]] = {c: [] for c in cells}
    mechanism = default_mechanism()

    def measure_ours(b: int, q: int) -> None:
        result = probe_directory(data, (b,), (q,), seconds_per_cell=seconds, repeats=1, mechanism=mechanism)
        ours[(b, q)].append(result.bandwidth(b, q))

    # The disk is shared: alternate the tools cell by cell, the probe first in even rounds and last in odd ones
    # (a disk that speeds up or slows down within a cell's runs then favours neither), and take medians.
    for r in range(rounds):
        for b, q in cells:
            if r % 2 == 0:
                measure_ours(b, q)
            fio[(b, q)].append(fio_bandwidth(data, b, q, seconds))
            fio_again[(b, q)].append(fio_bandwidth(data, b, q, seconds))
            fio_sync[(b, q)].append(fio_bandwidth(data, b, q, seconds, ioengine="psync"))
            if r % 2 == 1:
                measure_ours(b, q)
    how = {"aio": "native AIO from one thread, like fio's libaio", "threads": "one thread per request in `os.preadv`"}
    lines += [
        f"Random reads with O_DIRECT on a 1 GiB file on `{data}`'s device; {rounds} rounds, each cell running "
        f"the probe ({how[mechanism]}), fio (`--ioengine=libaio`), fio again, and fio with one synchronous "
        f"reader thread per request in flight (`--ioengine=psync --numjobs=QD`), {seconds:g} s each, the probe "
        "first in even rounds and last in odd ones; medians over rounds. fio against itself (A/A) shows what "
        "agreement the shared disk allows.",
        "",
        "| block | QD | probe MB/s | fio libaio MB/s | probe / fio | fio A/A | fio psync MB/s | probe / psync |",
        "|---|---|---|---|---|---|---|---|",
    ]
    med = statistics.median
    for c in cells:
        mine, theirs, sync = med(ours[c]), med(fio[c]), med(fio_sync[c])
        lines.append(
            f"| {format_bytes(c[0])} | {c[1]} | {mine / 1e6:.0f} | {theirs / 1e6:.0f} | {mine / theirs:.3f} | "
            f"{med(fio_again[c]) / theirs:.3f} | {sync / 1e6:.0f} | {mine / sync:.3f} |"
        )
    worst = max(abs(med(ours[c]) / med(fio[c]) - 1) for c in cells)
    worst_sync = max(abs(med(ours[c]) / med(fio_sync[c]) - 1) for c in cells)
    lines += [
        "",
        f"Largest disagreement with fio libaio: {100 * worst:.1f}%; with fio psync: {100 * worst_sync:.1f}% "
        "(target: within 10%).",
    ]
    return "\n".join(lines)


def _synthetic(data: Path, size: int) -> tuple[Path, str]:
    model = data / f"synth-{format_bytes(size).replace(' ', '')}"
    shape = sized_shape("qwen3_moe", size, "bf16")
    if (model / "config.json").exists():
        timing = "already present (written by an earlier run; delete it to time the writing)"
    else:
        start = time.perf_counter()
        synthesize(model, shape, knobs=DEFAULT_KNOBS["qwen3_moe"])
        timing = f"written in {time.perf_counter() - start:.1f} s"
    written = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    text = (
        f"## Synthetic checkpoint\n\n`{model}`: qwen3_moe, {shape.num_layers} layers, hidden {shape.hidden_size}, "
        f"{shape.num_experts} experts of {shape.moe_intermediate_size} (top-{shape.top_k}), bf16, "
        f"{format_bytes(written)}; {timing}."
    )
    return model, text


def _routing(model_dir: Path) -> str:
    model = load_model(model_dir)
    try:
        stats, _ = measure(model, get_workload("score-2048"))
    finally:
        model.close()
    return "\n".join(
        [
            "## Routing statistics (score-2048) beside real models' (REFERENCE.md)",
            "",
            format_table(stats),
            "",
            f"Outside the reference ranges: {stats.outside_reference() or 'none'}.",
        ]
    )


def _bench(model: Path, limit: int, repeats: int, out: Path) -> str:
    probe = load_or_probe(model, default_cache_dir())
    request = BenchRequest(
        model=model,
        config=EngineConfig(),
        workload=get_workload("decode-short"),
        memory_limit=limit,
        repeats=repeats,
        cold=True,
        cache_dir=default_cache_dir(),
    )
    result = run_bench(request, probe)
    result.write(out.with_suffix(".json"))
    low, high = result.decode_tok_s_ci or (0.0, 0.0)
    width = (high - low) / result.decode_tok_s if result.decode_tok_s else float("nan")
    per_repeat = ", ".join(f"{r['decode_tok_s']:.3f}" for r in result.per_repeat)
    return "\n".join(
        [
            f"## Cold decode under an enforced {format_bytes(limit)} limit",
            "",
            f"`autoresearch bench --model {model} --workload decode-short --memory-limit {format_bytes(limit)} "
            f"--repeats {repeats}` (default engine config, pages dropped before every repeat, one warm-up excluded). "
            f"Full result: `{out.with_suffix('.json')}`.",
            "",
            f"Per-repeat decode tok/s: {per_repeat}. The 95% interval's width is {100 * width:.1f}% of the median.",
            "",
            result.summary(),
            "",
            "Probe used for the roofline:",
            "",
            "```json",
            json.dumps(result.roofline, indent=2),
            "```",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
