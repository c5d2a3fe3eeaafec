"""``autoresearch``: the one command-line program. Verbs import what they need lazily, so --help is instant."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

SYNTH_DIMS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "num_experts",
    "top_k",
    "moe_intermediate_size",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autoresearch", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    g = verbs.add_parser("generate", help="decode from a checkpoint, streaming its experts from disk")
    g.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, tokenized with the checkpoint's tokenizer.json")
    prompt.add_argument("--ids", help="comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--config", help="engine config TOML with an [engine] table")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    g.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    g.set_defaults(run=_generate)

    s = verbs.add_parser("synth", help="write a synthetic MoE checkpoint (structured random weights, real files)")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", choices=["tiny", "quickstart"])
    what.add_argument(
        "--arch",
        choices=["qwen3_moe", "mixtral", "deepseek_v3", "qwen3_5_moe"],
        help="with --size, or with --num-layers",
    )
    s.add_argument("--size", help="target size, e.g. 8GiB: the arch's default shape, as deep as fits")
    for dim in SYNTH_DIMS:
        s.add_argument(f"--{dim.replace('_', '-')}", type=int, help="override the arch's default")
    s.add_argument("--locality", type=float, help="P(next token keeps its topic), in (0, 1): higher = friendlier")
    s.add_argument("--skew", type=float, help=">= 0: higher = some experts much busier than others")
    s.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    s.add_argument(
        "--experts",
        default="dtype",
        choices=["dtype", "int4"],
        help="int4: routed experts as Kimi K2.5 ships them (compressed-tensors int4, groups of 32)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(run=_synth)

    k = verbs.add_parser("repack", help="write a streaming layout: each expert one aligned range, optionally quantized")
    k.add_argument("model", help="checkpoint directory to repack")
    k.add_argument("--format", required=True, choices=("fp32", "bf16", "fp16", "int8", "int4"))
    k.add_argument("--group-size", type=int, default=64, help="int4 only: weights per scale (default 64)")
    k.add_argument("--align", type=int, default=4096, help="byte alignment of each expert's range (default 4096)")
    k.add_argument("--out", required=True, help="new, empty directory for the repacked checkpoint")
    k.set_defaults(run=_repack)

    b = verbs.add_parser("bench", help="measure one engine configuration (child process, memory limit, repeats)")
    b.add_argument("--model", required=True, help="checkpoint directory")
    b.add_argument("--config", help="engine config TOML with an [engine] table (default: the engine's defaults)")
    b.add_argument("--workload", default="decode-short", help="a named workload (see `autoresearch workloads`)")
    b.add_argument("--memory-limit", help="RAM budget for page cache and process together, e.g. 6GiB")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--warmup", type=int, default=1, help="passes run first and not counted")
    b.add_argument("--warm", action="store_true", help="keep the page cache between repeats (default: cold)")
    b.add_argument("--vs", help="a second engine config TOML, interleaved with --config; reports the speed ratio")
    b.add_argument("--timeout", type=float, help="seconds per child process before it is killed")
    b.add_argument("--no-quality", action="store_true", help="skip the comparison against the reference run")
    b.add_argument("--no-probe", action="store_true", help="skip the disk probe (no roofline)")
    b.add_argument("--out", help="write the BenchResult JSON here")
    b.add_argument("--json", action="store_true", help="print the BenchResult JSON instead of the table")
    b.set_defaults(run=_bench)

    p = verbs.add_parser("probe", help="measure random-read bandwidth with O_DIRECT on a directory's disk")
    p.add_argument("--dir", default=".", help="a directory on the disk to measure (e.g. the model's)")
    p.add_argument("--refresh", action="store_true", help="measure again even if this disk's result is cached")
    p.add_argument(
        "--fio-like",
        action="store_true",
        help="fio's grid and 4 KiB-page buffers (default: the grid the engine's rooflines use, into huge pages)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_probe)

    r = verbs.add_parser("routing-stats", help="routing statistics of a model on a workload, beside real models'")
    r.add_argument("--model", required=True)
    r.add_argument("--workload", default="score-2048")
    r.add_argument("--json", action="store_true")
    r.set_defaults(run=_routing_stats)

    t = verbs.add_parser("trace", help="record a routing trace of a model on a workload, for `simulate`")
    t.add_argument("--model", required=True, help="checkpoint directory")
    t.add_argument("--workload", default="decode-short", help="a named workload (see `autoresearch workloads`)")
    t.add_argument("--config", help="engine config TOML the recording runs with (its weights are the trace's)")
    t.add_argument("--out", required=True, help="the trace file to write (.npz)")
    t.set_defaults(run=_trace)

    m = verbs.add_parser("simulate", help="replay a trace through the engine's cache and prefetch logic, no weights")
    m.add_argument("--trace", required=True, help="a file written by `autoresearch trace`")
    m.add_argument("--config", help="engine config TOML to simulate (default: the engine's defaults)")
    disk = m.add_mutually_exclusive_group()
    disk.add_argument("--probe", help="directory whose disk's probe gives the bandwidth (default: the trace's model)")
    disk.add_argument("--bandwidth", help="disk bandwidth in bytes/s instead of a probe, e.g. 2GB or inf")
    disk.add_argument(
        "--reader",
        action="store_true",
        help="serve reads at the bandwidth the engine's reader reaches on the trace's model (3 s), not the probe's",
    )
    m.add_argument("--compute-ms-per-token", type=float, help="decode compute per token (default: as recorded)")
    m.add_argument("--warmup", type=int, default=1, help="passes replayed first and not counted")
    m.add_argument("--repeats", type=int, default=1, help="passes counted")
    m.add_argument("--json", action="store_true")
    m.set_defaults(run=_simulate)

    o = verbs.add_parser("report-trace", help="a trace's routing as a markdown page with plots")
    o.add_argument("trace", help="a file written by `autoresearch trace`")
    o.add_argument("--out", default=".", help="directory for the page and its PNGs (default: here)")
    o.set_defaults(run=_report_trace)

    w = verbs.add_parser("workloads", help="list the named workloads")
    w.set_defaults(run=_workloads)

    u = verbs.add_parser("tune", help="search engine configs for an experiment (Optuna, Ray, MLflow); resumable")
    u.add_argument("experiment", help="an experiment file (experiments/*.toml)")
    u.add_argument("--runs", default="runs", help="where studies, logs, tuned configs and the MLflow store go")
    u.add_argument("--tracking-uri", help="an MLflow tracking URI (default: sqlite:///RUNS/mlflow.db)")
    u.add_argument("--ray-address", help="an existing Ray cluster (default: the experiment's, else a local one)")
    u.add_argument("--no-probe", action="store_true", help="skip the disk probe (results without a roofline)")
    u.set_defaults(run=_tune)

    x = verbs.add_parser("export", help="write a tuned config (with its provenance) from an experiment's study")
    x.add_argument("--experiment", required=True, help="the experiment file or its name")
    x.add_argument("--pick", default="fastest", help="fastest | knee | min-quality=<top-1>, e.g. min-quality=0.99")
    x.add_argument("-o", "--out", required=True, help="the TOML file to write")
    x.add_argument("--runs", default="runs")
    x.set_defaults(run=_export)

    e = verbs.add_parser("report", help="write an experiment's study as a markdown page with plots")
    e.add_argument("--experiment", required=True, help="the experiment file or its name")
    e.add_argument("--out", help="the page to write (default: RUNS/<experiment>/report.md)")
    e.add_argument("--runs", default="runs")
    e.set_defaults(run=_report)

    i = verbs.add_parser("ui", help="the MLflow UI over the tuning runs, on 127.0.0.1")
    i.add_argument("--runs", default="runs")
    i.add_argument("--tracking-uri", help="an MLflow tracking URI (default: sqlite:///RUNS/mlflow.db)")
    i.add_argument("--port", type=int, default=5000)
    i.set_defaults(run=_ui)

    args = parser.parse_args(argv)
    from engine.errors import EngineError
    from search.errors import SearchError

    try:
        return args.run(args)
    except (EngineError, ValueError, SearchError) as e:
        print(f"autoresearch {args.verb}: error: {e}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    from engine import Sampler, generate, load_model
    from engine.config import EngineConfig

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
    from engine.repack import repack

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
    from engine.checkpoint import Checkpoint
    from engine.config import EngineConfig
    from engine.paths import default_cache_dir
    from engine.units import parse_bytes
    from engine.workloads import get_workload

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
    from engine.bench.probe import ENGINE_GRID, format_table, load_or_probe
    from engine.paths import default_cache_dir

    grid = {} if args.fio_like else ENGINE_GRID
    result = load_or_probe(args.dir, default_cache_dir(), refresh=args.refresh, **grid)
    print(json.dumps(result.to_dict()) if args.json else format_table(result))
    return 0


def _routing_stats(args: argparse.Namespace) -> int:
    from engine import load_model
    from engine.output_stats import format_table as output_table
    from engine.output_stats import output_stats
    from engine.routing_stats import format_table, measure
    from engine.workloads import get_workload

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
    from engine.config import EngineConfig
    from engine.trace import record_trace
    from engine.units import format_bytes
    from engine.workloads import get_workload

    config = EngineConfig.load(args.config) if args.config else EngineConfig()
    trace = record_trace(args.model, get_workload(args.workload), config)
    path = trace.save(args.out)
    n, layers, r = trace.top_ids.shape
    print(
        f"wrote {path} ({format_bytes(path.stat().st_size)}): {n} tokens in {len(trace.call_tokens)} forward calls, "
        f"{layers} MoE layers, {r} router candidates per token and layer, gate_lookahead {trace.depth} layers ahead"
    )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.bench.probe import ENGINE_GRID, load_or_probe
    from engine.config import EngineConfig
    from engine.paths import default_cache_dir
    from engine.simulator import disk_bandwidth, format_result, reader_bandwidth, simulate
    from engine.trace import load_trace
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
    result = simulate(trace, config, bandwidth, compute, warmup=args.warmup, repeats=args.repeats)
    print(json.dumps(result.to_dict()) if args.json else format_result(result))
    return 0


def _report_trace(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.trace import load_trace
    from engine.trace_report import write_report

    path = write_report(load_trace(args.trace), args.out, Path(args.trace).stem)
    print(f"wrote {path}")
    return 0


def _workloads(args: argparse.Namespace) -> int:
    from engine.workloads import WORKLOADS

    for w in WORKLOADS.values():
        print(f"{w.name:<14} v{w.version}  {w.kind:<8}  {w.description}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from search.experiment import load_experiment
    from search.tune import TuneOptions, tune

    experiment = load_experiment(args.experiment)  # every table and key checked before anything runs
    options = TuneOptions(Path(args.runs), args.tracking_uri, args.ray_address, probe=not args.no_probe)
    outcome = tune(experiment, options)
    report = outcome.report.read_text() if outcome.report else ""
    start = min((report.find(h) for h in ("## Confirmation", "## Best trials") if h in report), default=len(report))
    print("\n" + report[start : report.find("## Plots") if "## Plots" in report else None].strip() + "\n")
    print(f"study and log:  {outcome.results}/ (study.journal, tune.log)")
    print(f"report:         {outcome.report}")
    print(f"tuned config:   {outcome.tuned or 'none (nothing exported; why below)'}")
    store = f"--tracking-uri {args.tracking_uri}" if args.tracking_uri else f"--runs {args.runs}"
    print(f"MLflow UI:      {sys.argv[0]} ui {store}   (then http://127.0.0.1:5000)")
    if outcome.interrupted:
        print("interrupted: run the same command again to continue the study", file=sys.stderr)
        return 130
    if outcome.tuned is None:  # no trial meets every constraint (or none was measured to the end)
        print(f"autoresearch tune: {outcome.unmet}", file=sys.stderr)
        return 1
    return 0


def _open_study(experiment: str, runs: str):
    from pathlib import Path

    import optuna

    from search.errors import SearchError
    from search.study import JOURNAL, journal
    from search.tune import results_dir

    name = Path(experiment).stem
    results = results_dir(Path(runs), name)
    if not (results / JOURNAL).exists():
        raise SearchError(
            f"no study for experiment {name!r}: {results / JOURNAL} does not exist (run `autoresearch tune` first)"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=journal(results))


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from search.export import export, no_choice, parse_pick, pick

    parse_pick(args.pick)
    study = _open_study(args.experiment, args.runs)
    choice = pick(study, study.user_attrs["objectives"], args.pick)
    if choice is None:  # nothing written: no trial meets every constraint (and the pick's bound)
        print(f"autoresearch export: {no_choice(study, args.pick)}", file=sys.stderr)
        return 1
    out = export(study, choice, Path(args.out))
    print(f"wrote {out}: trial {choice.trial.number} ({args.pick})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from search.report import write_report
    from search.tune import results_dir

    study = _open_study(args.experiment, args.runs)
    out = Path(args.out) if args.out else results_dir(Path(args.runs), study.study_name) / "report.md"
    print(f"wrote {write_report(study, study.user_attrs['objectives'], out)}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from search.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(Path(args.runs))
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    command += ["--port", str(args.port)]
    print(f"MLflow UI on http://127.0.0.1:{args.port} over {uri} (Ctrl-C stops it)", flush=True)
    os.execv(sys.executable, command)


if __name__ == "__main__":
    sys.exit(main())
