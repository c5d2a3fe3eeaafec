"""The engine's commands, which ``autoresearch`` mounts (``search/cli.py``).

Each verb is its help line, a function adding its arguments, and its handler. ``mount`` adds every verb's
arguments only for the verb being run, and handlers import what they need, so ``autoresearch --help`` imports
nothing of the engine while each verb's choices come from the modules that define them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

SYNTH_DIMS = (  # the shape's dimensions ``synth`` lets a user override
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "num_experts",
    "top_k",
    "moe_intermediate_size",
)


class Verb(NamedTuple):
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def mount(subparsers: argparse._SubParsersAction, verbs: dict[str, Verb], argv: Sequence[str]) -> None:
    """Add ``verbs`` to ``subparsers``, with their arguments only for the one ``argv`` names."""
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, verb in verbs.items():
        parser = subparsers.add_parser(name, help=verb.help, description=verb.help)
        if name == chosen:
            verb.arguments(parser)
        parser.set_defaults(run=verb.run)


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, tokenized with the checkpoint's tokenizer.json")
    prompt.add_argument("--ids", help="comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--config", help="engine config TOML with an [engine] table")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON record instead of text")


def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    from engine.synth.shapes import ARCHS, DTYPE_BYTES, EXPERT_FORMATS, PRESETS

    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", choices=list(PRESETS))
    what.add_argument(
        "--arch",
        choices=ARCHS,
        help="with --size, or with --num-layers",
    )
    parser.add_argument("--size", help="target size, e.g. 8GiB: the arch's default shape, as deep as fits")
    for dim in SYNTH_DIMS:
        parser.add_argument(f"--{dim.replace('_', '-')}", type=int, help="override the arch's default")
    parser.add_argument("--locality", type=float, help="P(next token keeps its topic), in (0, 1): higher = friendlier")
    parser.add_argument("--skew", type=float, help=">= 0: higher = some experts much busier than others")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPE_BYTES))
    parser.add_argument(
        "--experts",
        default="dtype",
        choices=EXPERT_FORMATS,
        help="int4: routed experts as Kimi K2.5 ships them (compressed-tensors int4, groups of 32)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)


def _repack_arguments(parser: argparse.ArgumentParser) -> None:
    from engine.formats.quant import FORMATS

    parser.add_argument("model", help="checkpoint directory to repack")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--group-size", type=int, default=64, help="int4 only: weights per scale (default 64)")
    parser.add_argument("--align", type=int, default=4096, help="byte alignment of each expert's range (default 4096)")
    parser.add_argument("--out", required=True, help="new, empty directory for the repacked checkpoint")


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--config", help="engine config TOML with an [engine] table (default: the engine's defaults)")
    parser.add_argument("--workload", default="decode-short", help="a named workload (see `autoresearch workloads`)")
    parser.add_argument("--memory-limit", help="RAM budget for page cache and process together, e.g. 6GiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="passes run first and not counted")
    parser.add_argument("--warm", action="store_true", help="keep the page cache between repeats (default: cold)")
    parser.add_argument("--vs", help="a second engine config TOML, interleaved with --config; reports the speed ratio")
    parser.add_argument("--timeout", type=float, help="seconds per child process before it is killed")
    parser.add_argument("--no-quality", action="store_true", help="skip the comparison against the reference run")
    parser.add_argument("--no-probe", action="store_true", help="skip the disk probe (no roofline)")
    parser.add_argument("--out", help="write the BenchResult JSON here")
    parser.add_argument("--json", action="store_true", help="print the BenchResult JSON instead of the table")


def _probe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=".", help="a directory on the disk to measure (e.g. the model's)")
    parser.add_argument("--refresh", action="store_true", help="measure again even if this disk's result is cached")
    parser.add_argument(
        "--fio-like",
        action="store_true",
        help="fio's grid and 4 KiB-page buffers (default: the grid the engine's rooflines use, into huge pages)",
    )
    parser.add_argument("--json", action="store_true")


def _routing_stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--workload", default="score-2048")
    parser.add_argument("--json", action="store_true")


def _trace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--workload", default="decode-short", help="a named workload (see `autoresearch workloads`)")
    parser.add_argument("--config", help="engine config TOML the recording runs with (its weights are the trace's)")
    parser.add_argument("--out", required=True, help="the trace file to write (.npz)")
    parser.add_argument(
        "--backend",
        choices=("engine", "transformers"),
        default="engine",
        help="who runs the pass: the engine, or Hugging Face transformers (needs torch; no compute time recorded)",
    )
    parser.add_argument("--device", default="cpu", help="transformers backend: the torch device, e.g. cuda")


def _import_trace_arguments(parser: argparse.ArgumentParser) -> None:
    from engine.synth.shapes import DTYPE_BYTES

    parser.add_argument("log", help="routing log, JSON Lines: token_idx, layer, experts, gating_probs[, problem_id]")
    parser.add_argument("--model-config", required=True, help="the model's config.json (no weights needed)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPE_BYTES), help="how its experts are stored")
    parser.add_argument("--out", required=True, help="the trace file to write (.npz)")


def _simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="a file written by `autoresearch trace`")
    parser.add_argument("--config", help="engine config TOML to simulate (default: the engine's defaults)")
    disk = parser.add_mutually_exclusive_group()
    disk.add_argument("--probe", help="directory whose disk's probe gives the bandwidth (default: the trace's model)")
    disk.add_argument("--bandwidth", help="disk bandwidth in bytes/s instead of a probe, e.g. 2GB or inf")
    disk.add_argument(
        "--reader",
        action="store_true",
        help="serve reads at the bandwidth the engine's reader reaches on the trace's model (3 s), not the probe's",
    )
    parser.add_argument("--compute-ms-per-token", type=float, help="decode compute per token (default: as recorded)")
    parser.add_argument("--warmup", type=int, default=1, help="passes replayed first and not counted")
    parser.add_argument("--repeats", type=int, default=1, help="passes counted")
    parser.add_argument("--json", action="store_true")


def _report_trace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="a file written by `autoresearch trace`")
    parser.add_argument("--out", default=".", help="directory for the page and its PNGs (default: here)")


def _workloads_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments."""


def _generate(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.model.generate import Sampler, generate
    from engine.model.load import load_model

    model = load_model(args.model, EngineConfig.load(args.config) if args.config else EngineConfig())
    try:
        ids = model.encode(args.prompt) if args.prompt is not None else _parse_ids(args.ids)
        sampler = Sampler(args.temperature, args.top_p, args.seed)
        result = generate(model, ids, args.max_new_tokens, sampler, stop_at_eos=not args.ignore_eos)
    finally:
        model.close()
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(result.text if result.text is not None else ",".join(map(str, result.tokens)))
    per_token = result.expert_bytes_read / max(len(result.tokens), 1)
    print(
        f"prefill {len(result.prompt_ids)} tok at {result.prefill_tok_s:.1f} tok/s | "
        f"decode {len(result.tokens)} tok at {result.decode_tok_s:.1f} tok/s | "
        f"expert bytes read {result.expert_bytes_read / 2**20:.1f} MiB ({per_token / 2**20:.2f} MiB/token) | "
        f"experts loaded {result.experts_loaded}",
        file=sys.stderr,
    )
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--ids must be comma-separated integers, got {text!r}") from None


def _repack(args: argparse.Namespace) -> int:
    from engine.formats.repack import repack

    report = repack(args.model, args.out, args.format, group_size=args.group_size, align=args.align)
    print(report.summary())
    return 0


def _synth(args: argparse.Namespace) -> int:
    import dataclasses

    from engine.synth import PRESETS, RoutingKnobs, SynthShape, sized_shape, synthesize
    from engine.synth.shapes import SIZED_DEFAULTS
    from engine.synth.weights import DEFAULT_KNOBS
    from engine.units import format_bytes, parse_bytes

    dims = {d: getattr(args, d) for d in SYNTH_DIMS if getattr(args, d) is not None}
    if args.preset is not None:
        if args.size or dims:
            raise ValueError("--preset fixes the shape: drop --size and the dimension flags, or use --arch")
        shape = PRESETS[args.preset]
    elif args.size is not None:
        shape = sized_shape(args.arch, parse_bytes(args.size, "--size"), args.dtype, args.experts, **dims)
    elif "num_layers" in dims:
        shape = dataclasses.replace(SIZED_DEFAULTS[args.arch], **dims)
    else:
        raise ValueError("--arch needs --size (e.g. 8GiB) or --num-layers")
    knobs = DEFAULT_KNOBS[shape.arch]
    overrides = {k: getattr(args, k) for k in ("locality", "skew") if getattr(args, k) is not None}
    knobs = RoutingKnobs(**{**knobs.to_dict(), **overrides})
    out = synthesize(args.out, SynthShape(**shape.__dict__), args.dtype, args.seed, knobs, experts=args.experts)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(
        f"wrote {shape.arch} checkpoint ({shape.num_layers} layers, {shape.num_experts} experts, "
        f"top-{shape.top_k}, {format_bytes(size)}) to {out}"
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.bench.probe import ENGINE_GRID, load_or_probe
    from engine.bench.protocol import BenchFailure, BenchRequest, run_bench
    from engine.bench.workloads import get_workload
    from engine.config import EngineConfig
    from engine.formats.checkpoint import Checkpoint
    from engine.paths import default_cache_dir
    from engine.units import parse_bytes

    model = Path(args.model)
    Checkpoint.open(model).close()  # a missing or malformed model fails here, before anything runs
    request = BenchRequest(
        model=model,
        config=EngineConfig.load(args.config) if args.config else EngineConfig(),
        workload=get_workload(args.workload),
        memory_limit=parse_bytes(args.memory_limit, "--memory-limit") if args.memory_limit else None,
        repeats=args.repeats,
        warmup=args.warmup,
        cold=not args.warm,
        vs=EngineConfig.load(args.vs) if args.vs else None,
        timeout_s=args.timeout,
        cache_dir=None if args.no_quality else default_cache_dir(),
    )
    probe = None if args.no_probe else load_or_probe(model, default_cache_dir(), **ENGINE_GRID)
    try:
        result = run_bench(request, probe)
    except BenchFailure as e:
        print(f"autoresearch bench: run failed: {e}", file=sys.stderr)
        return 3
    if args.out:
        result.write(Path(args.out))
    print(json.dumps(result.to_dict()) if args.json else result.summary())
    return 0


def _probe(args: argparse.Namespace) -> int:
    from engine.bench.probe import ENGINE_GRID, load_or_probe
    from engine.bench.probe_result import format_table
    from engine.paths import default_cache_dir

    grid = {} if args.fio_like else ENGINE_GRID
    result = load_or_probe(args.dir, default_cache_dir(), refresh=args.refresh, **grid)
    print(json.dumps(result.to_dict()) if args.json else format_table(result))
    return 0


def _routing_stats(args: argparse.Namespace) -> int:
    from engine.analysis.output_stats import format_table as output_table
    from engine.analysis.output_stats import output_stats
    from engine.analysis.routing_stats import format_table, measure
    from engine.bench.workloads import get_workload
    from engine.model.load import load_model

    workload = get_workload(args.workload)
    model = load_model(args.model)
    try:
        stats, logits = measure(model, workload)
    finally:
        model.close()
    outputs = output_stats(logits)
    if args.json:
        print(json.dumps({"routing": stats.to_dict(), "output": outputs.to_dict()}))
    else:
        print(f"{format_table(stats)}\n\n{output_table(outputs)}")
    return 0


def _trace(args: argparse.Namespace) -> int:
    from engine.analysis.trace import record_trace
    from engine.bench.workloads import get_workload
    from engine.config import EngineConfig
    from engine.units import format_bytes

    if args.backend == "transformers":
        from engine.analysis.trace_transformers import record_trace_transformers

        if args.config:
            raise ValueError("--config is the engine's: the transformers backend runs the checkpoint as stored")
        trace = record_trace_transformers(args.model, get_workload(args.workload), args.device)
    else:
        config = EngineConfig.load(args.config) if args.config else EngineConfig()
        trace = record_trace(args.model, get_workload(args.workload), config)
    path = trace.save(args.out)
    n, layers, r = trace.top_ids.shape
    print(
        f"wrote {path} ({format_bytes(path.stat().st_size)}): {n} tokens in {len(trace.call_tokens)} forward calls, "
        f"{layers} MoE layers, {r} router candidates per token and layer, gate_lookahead {trace.depth} layers ahead"
    )
    return 0


def _import_trace(args: argparse.Namespace) -> int:
    from engine.analysis.trace_import import import_trace
    from engine.units import format_bytes

    trace = import_trace(args.log, args.model_config, args.dtype)
    path = trace.save(args.out)
    n, layers, _ = trace.top_ids.shape
    print(
        f"wrote {path} ({format_bytes(path.stat().st_size)}): {n} tokens of {trace.meta['workload']['sequences']} "
        f"sequence(s), {layers} MoE layers, top-{trace.top_k} of {trace.num_experts}; no gate_lookahead proposals, "
        "no compute time (give simulate --compute-ms-per-token)"
    )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.analysis.simulator import disk_bandwidth, format_result, reader_bandwidth, simulate
    from engine.analysis.trace import load_trace
    from engine.bench.probe import ENGINE_GRID, load_or_probe
    from engine.config import EngineConfig
    from engine.paths import default_cache_dir
    from engine.units import parse_bytes

    trace = load_trace(args.trace)
    config = EngineConfig.load(args.config) if args.config else EngineConfig()
    if args.bandwidth is not None:
        bandwidth = float("inf") if args.bandwidth == "inf" else float(parse_bytes(args.bandwidth, "--bandwidth"))
    else:
        where = Path(args.probe or trace.meta["model"])
        if not where.is_dir():
            raise ValueError(
                f"the trace's model directory {where} is not here to measure its disk: give --probe DIR (a "
                "directory on the disk the model will stream from) or --bandwidth"
            )
        if args.reader:
            bandwidth = reader_bandwidth(where, config, trace.top_k)
        else:
            bandwidth = disk_bandwidth(load_or_probe(where, default_cache_dir(), **ENGINE_GRID), config)
    compute = None if args.compute_ms_per_token is None else args.compute_ms_per_token / 1e3
    if compute is None and trace.meta["decode_seconds_per_token"] is None:
        print("note: the trace holds no compute time (imported): the prediction counts reads only; "
              "give --compute-ms-per-token", file=sys.stderr)  # fmt: skip
    result = simulate(trace, config, bandwidth, compute, warmup=args.warmup, repeats=args.repeats)
    print(json.dumps(result.to_dict()) if args.json else format_result(result))
    return 0


def _report_trace(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.analysis.trace import load_trace
    from engine.analysis.trace_report import write_report

    path = write_report(load_trace(args.trace), args.out, Path(args.trace).stem)
    print(f"wrote {path}")
    return 0


def _workloads(args: argparse.Namespace) -> int:
    from engine.bench.workloads import WORKLOADS

    for w in WORKLOADS.values():
        print(f"{w.name:<14} v{w.version}  {w.kind:<8}  {w.description}")
    return 0


VERBS = {
    "generate": Verb(
        "decode from a checkpoint, streaming its experts from disk",
        _generate_arguments,
        _generate,
    ),
    "synth": Verb(
        "write a synthetic MoE checkpoint (structured random weights, real files)",
        _synth_arguments,
        _synth,
    ),
    "repack": Verb(
        "write a streaming layout: each expert one aligned range, optionally quantized",
        _repack_arguments,
        _repack,
    ),
    "bench": Verb(
        "measure one engine configuration (child process, memory limit, repeats)",
        _bench_arguments,
        _bench,
    ),
    "probe": Verb(
        "measure random-read bandwidth with O_DIRECT on a directory's disk",
        _probe_arguments,
        _probe,
    ),
    "routing-stats": Verb(
        "routing statistics of a model on a workload, beside real models'",
        _routing_stats_arguments,
        _routing_stats,
    ),
    "trace": Verb(
        "record a routing trace of a model on a workload, for `simulate`",
        _trace_arguments,
        _trace,
    ),
    "import-trace": Verb(
        "make a trace from a routing log (JSON Lines) and the model's config.json, for `simulate`",
        _import_trace_arguments,
        _import_trace,
    ),
    "simulate": Verb(
        "replay a trace through the engine's cache and prefetch logic, no weights",
        _simulate_arguments,
        _simulate,
    ),
    "report-trace": Verb(
        "a trace's routing as a markdown page with plots",
        _report_trace_arguments,
        _report_trace,
    ),
    "workloads": Verb(
        "list the named workloads",
        _workloads_arguments,
        _workloads,
    ),
}
