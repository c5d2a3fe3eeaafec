"""``make bench-peer``: the engine against llama.cpp's ``llama-bench`` on the same weights, side by side.

The 8 GiB synthetic checkpoint (qwen3_moe, bf16) and llama.cpp's conversion of it, built and converted once under
``data/peer`` (``engine/bench/llama_cpp.py``), in two formats: GGUF bf16 against our original bf16 weights, and
Q4_0 against our int4 in groups of 32 (a repacked copy the engine makes on first use). Per format:

- in RAM, page cache warm: ``llama-bench -p 0 -n 32`` against ``decode-short`` warm, the engine as ``mmap`` and as
  ``pread`` with a packed cache big enough for every expert (the faster of the two is the one compared);
- cold under enforced memory budgets (a fresh memory cgroup per run, the model files' pages dropped first):
  llama.cpp with its mmap against the engine streaming (``direct`` reads, an lru cache of half the budget,
  ``gate_lookahead`` prefetch).

Round by round the two tools alternate, and which goes first alternates too; every run is one process. Medians
with 95% bootstrap intervals, the ratio's interval over the rounds' pairs (``engine.bench.stats``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.bench.fingerprint import (
    command_line,
    engine_version,
    machine_fingerprint,
    model_identity,
    report_header,
    write_report,
)
from engine.bench.llama_cpp import CMAKE_FLAGS, PACKAGE, LlamaCpp, prepare
from engine.bench.memory_limit import MemoryLimit
from engine.bench.probe import ENGINE_GRID, load_or_probe
from engine.bench.probe_result import ProbeResult
from engine.bench.protocol import BenchFailure, BenchRequest, run_bench
from engine.bench.stats import median_ci, ratio_ci
from engine.bench.workloads import get_workload
from engine.config import EngineConfig
from engine.formats.checkpoint import Checkpoint, drop_cached_pages
from engine.formats.repack_manifest import is_repacked
from engine.formats.weights import weights_dir
from engine.paths import default_cache_dir
from engine.reports.engine_report import _synthetic
from engine.units import format_bytes, parse_bytes

WORKLOAD = "decode-short"  # a 32-token prompt, 32 tokens decoded
SUSTAINED = "decode-sustained"  # a 32-token prompt, 512 tokens decoded: throughput once the cache is steady
SUSTAINED_TOKENS = 512
IN_RAM = "pread + cache of every expert"
INT8 = ", int8 activations"  # the name of a configuration's variant with activations = "int8"
PROFILE_TIMEOUT_S = 900
LLAMA = "llama.cpp"
FORMATS = {  # our name: (llama.cpp's GGUF type, the engine's weights knobs)
    "bf16": ("bf16", {"weights": "original"}),
    "4-bit": ("Q4_0", {"weights": "int4", "group_size": 32, "resident_weights": "int4"}),
}
BUDGETS = ("4GiB", "2.5GiB", "1.5GiB")
QUICK_BUDGETS = ("2.5GiB",)
SLOT_SLACK = 1.02  # a cache of every expert: each is held in a slot of its planned bytes, rounded to pages at most
ENGINE_TIMEOUT_S = 1800
LLAMA_TIMEOUT_S = 900
READ_CHUNK = 16 << 20
STDERR_TAIL = 2000


@dataclass(frozen=True)
class Setting:
    """A memory setting: in RAM (no budget, page cache warm) or cold under an enforced budget."""

    name: str
    budget: int | None
    llama_tokens: int  # llama-bench -n
    workload: str = WORKLOAD  # the engine's


@dataclass
class Cell:
    """One format under one setting: llama.cpp's runs and each engine configuration's, one per round."""

    format: str
    setting: Setting
    gguf: Path
    configs: dict[str, EngineConfig]
    runs: dict[str, list[dict]] = field(default_factory=dict)

    def contenders(self) -> list[str]:
        return [LLAMA, *self.configs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data")
    parser.add_argument("--out", default="docs/benchmarks/peer.md")
    parser.add_argument("--size", default="8GiB")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each tool once per round)")
    parser.add_argument("--budgets", default=",".join(BUDGETS), help="comma-separated memory budgets")
    parser.add_argument("--warm-tokens", type=int, default=32, help="llama-bench -n in RAM")
    parser.add_argument("--cold-tokens", type=int, default=8, help="llama-bench -n under a budget (slow cold)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-bench -t")
    parser.add_argument("--quick", action="store_true", help=f"2 rounds, the {QUICK_BUDGETS[0]} budget only")
    args = parser.parse_args(argv)
    rounds, budgets = (2, QUICK_BUDGETS) if args.quick else (args.rounds, tuple(args.budgets.split(",")))
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    model = _synthetic(data, parse_bytes(args.size, "--size"))
    llama = prepare(data / "peer", model)
    limits = [parse_bytes(b, "--budgets") for b in budgets]
    settings = [Setting("in RAM", None, args.warm_tokens)]
    if not args.quick:
        settings.append(Setting(f"in RAM, {SUSTAINED_TOKENS} tokens", None, SUSTAINED_TOKENS, SUSTAINED))
    settings += [Setting(format_bytes(limit), limit, args.cold_tokens) for limit in limits]
    cells = [_cell(model, llama, name, setting) for setting in settings for name in FORMATS]
    # Probed again for this run: the shared disk's speed varies from day to day, and a roofline from another day
    # would over- or understate the efficiency.
    probe = load_or_probe(model, default_cache_dir(), refresh=True, **ENGINE_GRID)
    for r in range(rounds):
        for cell in cells:
            _round(cell, r, rounds, model, llama, args.threads, probe)
    out = Path(args.out)
    summaries = [summarize(cell) for cell in cells]
    version = _llama_version(cells)
    options = vars(args) | {"rounds": rounds, "budgets": budgets}
    _write_json(out.with_suffix(".json"), model, llama, version, cells, summaries, options)
    title, module = "llama.cpp against the engine", "engine.reports.peer_report"
    sections = [
        report_header(title, "bench-peer", module, command_line(argv), data),
        _versions(version),
        _method(model, llama, cells, rounds, args.threads, probe),
        _table(cells, summaries, out.with_suffix(".json")),
        _profiles(model, cells),
        _not_run(cells),
    ]
    write_report(out, sections)
    return 0


def engine_configs(model: Path, setting: Setting, weights: dict) -> dict[str, EngineConfig]:
    """The engine's configurations for a setting: in RAM the two fastest there, under a budget the streaming one;
    for int4 each also with int8 activations, as llama.cpp's Q4_0 multiplies Q8_0 ones."""
    if setting.budget is None:
        every = int(SLOT_SLACK * expert_bytes(weights_dir(model, weights["weights"], weights.get("group_size"))))
        configs = {
            "mmap": EngineConfig(io_mode="mmap", cache_format="packed", **weights),
            IN_RAM: EngineConfig(
                io_mode="pread", cache_format="packed", cache_policy="lru", cache_bytes=every, **weights
            ),
        }
    else:
        streaming = EngineConfig(
            io_mode="direct",
            cache_policy="lru",
            cache_bytes=setting.budget // 2,
            cache_format="packed",
            predictor="gate_lookahead",
            **weights,
        )
        configs = {"direct + lru + gate_lookahead": streaming}
    if weights["weights"] == "int4":
        configs |= {f"{name}{INT8}": replace(c, activations="int8") for name, c in configs.items()}
    return configs


def expert_bytes(directory: Path) -> int:
    """Bytes of every routed expert as stored: a repacked copy's ``experts.bin``, or the checkpoint's expert tensors."""
    if is_repacked(directory):
        return (directory / "experts.bin").stat().st_size
    checkpoint = Checkpoint.open(directory)
    try:
        return sum(t.nbytes for name, t in checkpoint.tensors.items() if ".experts." in name)
    finally:
        checkpoint.close()


def run_llama(llama: LlamaCpp, gguf: Path, setting: Setting, threads: int) -> dict:
    """One ``llama-bench`` process (its one-token warm-up, then one measured pass): tok/s and its JSON record.

    Under a budget the file's pages are dropped first and the process runs in a fresh memory cgroup, with
    ``--repack 0`` so Q4_0 weights stay in the mapping (by default they are copied into RAM at load); in RAM the
    file is read through first and llama.cpp runs with its defaults.
    """
    cold = setting.budget is not None
    (_drop_pages if cold else _read_through)(gguf)
    command = [str(llama.bench), "-m", str(gguf), "-p", "0", "-n", str(setting.llama_tokens), "-t", str(threads)]
    command += ["-r", "1", "-o", "json", *(["--repack", "0"] if cold else [])]
    limit = MemoryLimit.create(setting.budget) if setting.budget is not None else None
    run: dict = {"command": command}
    try:
        with limit if limit is not None else contextlib.nullcontext():
            done = subprocess.run(
                command,
                preexec_fn=limit.preexec_fn() if limit is not None else None,
                capture_output=True,
                text=True,
                timeout=LLAMA_TIMEOUT_S,
            )
    except subprocess.TimeoutExpired:
        return {**run, "failure": "timeout", "message": f"llama-bench exceeded {LLAMA_TIMEOUT_S} s and was killed"}
    run["limit"] = _limit_info(limit)
    if done.returncode != 0:
        reason = "out_of_memory" if limit is not None and limit.oom_kills() else "crashed"
        return {**run, "failure": reason, "message": done.stderr[-STDERR_TAIL:].strip()}
    record = json.loads(done.stdout)[0]
    return {**run, "tok_s": record["samples_ts"][0], "llama_bench": record}


def run_engine(model: Path, config: EngineConfig, setting: Setting, probe: ProbeResult) -> dict:
    """One ``autoresearch bench`` child: a warm-up pass, then one measured repeat (cold under a budget)."""
    request = BenchRequest(
        model=model,
        config=config,
        workload=get_workload(setting.workload),
        memory_limit=setting.budget,
        repeats=1,
        cold=setting.budget is not None,
        timeout_s=ENGINE_TIMEOUT_S,
        cache_dir=None,  # no quality: llama.cpp's output cannot be compared with it
    )
    try:
        result = run_bench(request, probe)
    except BenchFailure as failure:
        return {"failure": failure.reason, "message": str(failure)}
    return {"tok_s": result.decode_tok_s, "result": result.to_dict()}


def summarize(cell: Cell) -> dict:
    """Medians and intervals of every contender, and each engine configuration over llama.cpp, paired by round."""
    llama = _speeds(cell.runs[LLAMA])
    engines = {}
    for name in cell.configs:
        speeds = _speeds(cell.runs[name])
        pairs = [(e, b) for e, b in zip(speeds, llama, strict=True) if e is not None and b is not None]
        ratio = ratio_ci([e for e, _ in pairs], [b for _, b in pairs]) if pairs else None
        results = [run["result"] for run in cell.runs[name] if "result" in run]
        rooflines = [r["roofline_tok_s"] for r in results if r["roofline_tok_s"]]
        median = _median_ci(speeds)
        cold = cell.setting.budget is not None
        efficiency = median[0] / statistics.median(rooflines) if cold and median and rooflines else None
        engines[name] = {"tok_s": median, "ratio": ratio, "roofline_tok_s": rooflines, "efficiency": efficiency}
    return {"llama.cpp": _median_ci(llama), "engine": engines}


def _cell(model: Path, llama: LlamaCpp, name: str, setting: Setting) -> Cell:
    gguf_type, weights = FORMATS[name]
    configs = engine_configs(model, setting, weights)
    if setting.workload == SUSTAINED:  # long: only the configuration that is faster in RAM
        configs = {name: c for name, c in configs.items() if name in (IN_RAM, IN_RAM + INT8)}
    return Cell(name, setting, llama.gguf[gguf_type], configs, {c: [] for c in [LLAMA, *configs]})


def _round(cell: Cell, r: int, rounds: int, model: Path, llama: LlamaCpp, threads: int, probe: ProbeResult) -> None:
    """Each contender once, llama.cpp first in rounds 1, 3, ... and last in the others; no retry after a failure."""
    order = cell.contenders() if r % 2 == 0 else cell.contenders()[::-1]
    for name in order:
        runs = cell.runs[name]
        if any("failure" in run or "skipped" in run for run in runs):
            runs.append({"skipped": "failed in an earlier round"})
            continue
        start = time.monotonic()
        if name == LLAMA:
            run = run_llama(llama, cell.gguf, cell.setting, threads)
        else:
            run = run_engine(model, cell.configs[name], cell.setting, probe)
        run["wall_seconds"] = time.monotonic() - start
        runs.append(run)
        outcome = f"{run['tok_s']:.2f} tok/s" if "tok_s" in run else f"failed: {run['failure']}"
        print(
            f"bench-peer: round {r + 1}/{rounds}, {cell.format}, {cell.setting.name}, {name}: {outcome} "
            f"({run['wall_seconds']:.0f} s)",
            file=sys.stderr,
            flush=True,
        )


def _speeds(runs: list[dict]) -> list[float | None]:
    return [run.get("tok_s") for run in runs]


def _median_ci(speeds: list[float | None]) -> tuple[float, float, float] | None:
    present = [s for s in speeds if s is not None]
    return median_ci(present) if present else None


def _limit_info(limit: MemoryLimit | None) -> dict:
    if limit is None:
        return {"bytes": None, "enforced": False, "reason": "no limit given"}
    return {
        "bytes": limit.limit_bytes,
        "enforced": limit.enforced,
        "mechanism": limit.mechanism,
        "reason": limit.reason,
        "peak_bytes": limit.peak_bytes(),
    }


def _drop_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_cached_pages(fd)
    finally:
        os.close(fd)


def _read_through(path: Path) -> None:
    """Bring a whole file into the page cache."""
    buffer = bytearray(READ_CHUNK)
    with path.open("rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


def _llama_version(cells: list[Cell]) -> dict:
    """llama.cpp's build as llama-bench reports it (from any successful run), and the package that vendors it."""
    records = [run["llama_bench"] for cell in cells for run in cell.runs[LLAMA] if "llama_bench" in run]
    build = {key: records[0].get(key) for key in ("build_commit", "build_number", "cpu_info")} if records else {}
    return {"package": PACKAGE, "cmake_flags": list(CMAKE_FLAGS), **build}


def _engine(version: dict) -> dict:
    """The engine's package and commit, and the tracked files of the engine's packages that differ from it."""
    try:
        diff = subprocess.run(
            ["git", "diff", "--name-only", "HEAD", "--", "engine", "search"],
            cwd=Path(__file__).parents[2],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        diff = None
    return {**version, "uncommitted": diff}


def _versions(version: dict) -> str:
    ours = _engine(engine_version())
    changed = ours["uncommitted"]
    if changed is None:
        state = "work tree state unknown"
    elif changed:
        state = "with uncommitted changes to " + ", ".join(f"`{f}`" for f in changed)
    else:
        state = "no uncommitted changes"
    llama = (
        f"build `{version['build_commit']}` (number {version['build_number']}), cpu `{version['cpu_info']}`"
        if "build_commit" in version
        else "build unknown (no llama-bench run succeeded)"
    )
    return (
        f"llama.cpp: the copy vendored in `{version['package']}`'s sdist, {llama}, built with "
        f"`{' '.join(version['cmake_flags'])}`. Engine: package `{ours['package']}`, commit `{ours['commit']}`, "
        f"{state}."
    )


def _method(model: Path, llama: LlamaCpp, cells: list[Cell], rounds: int, threads: int, probe: ProbeResult) -> str:
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    ggufs = ", ".join(f"`{p.name}` ({format_bytes(p.stat().st_size)})" for p in llama.gguf.values())
    warm = next(c.setting.llama_tokens for c in cells if c.setting.budget is None)
    cold = [c.setting for c in cells if c.setting.budget is not None]
    cold_tokens = f"`-n {cold[0].llama_tokens}`" if cold else "(no budgets)"
    return "\n".join(
        [
            "## Method",
            "",
            f"- Weights: `{model}` ({format_bytes(size)}, qwen3_moe, bf16), converted by the llama.cpp tree's own "
            f"`convert_hf_to_gguf.py --outtype bf16` and `llama-quantize ... Q4_0`: {ggufs}. The synthetic "
            "tokenizer's pre-tokenizer hash is in no table of the converter; `engine/bench/hf_to_gguf.py` runs the "
            "converter unchanged except that it names the pre-tokenizer `gpt-2` after checking `tokenizer.json` "
            "holds GPT-2's byte-level one (the tree is not edited). Token ids do not matter to the speed.",
            "- Formats: GGUF bf16 (norms and router float32) against our original bf16 experts; Q4_0 (every "
            "matrix in blocks of 32 with a float16 scale, attention included; the output layer as llama-quantize "
            "chooses) against our int4 in groups of 32 with float16 scales: the experts repacked, the attention "
            'projections quantized when loaded (`resident_weights = "int4"`); router, embeddings and output layer '
            f"float32. Configurations named `{INT8.lstrip(', ')}` round the inputs of every int4 matrix to int8 per "
            'group of 32 with a float32 scale (`activations = "int8"`), as llama.cpp\'s Q4_0 kernels do with Q8_0; '
            "the others multiply float32 activations.",
            f"- llama.cpp: `llama-bench -m X.gguf -p 0 -n N -t {threads} -r 1 -o json`, one process per "
            f"measurement; in RAM `-n {warm}` after reading the file through, under a budget {cold_tokens} (it is "
            "slow cold) with `--repack 0`, so Q4_0 stays in the mapping instead of being copied into RAM at load, "
            "its pages dropped first. llama-bench warms up on one token and decodes random token ids.",
            f"- Engine: `autoresearch bench --model {model} --config C.toml --workload W --repeats 1 "
            "--no-quality` (`--warm` in RAM; `--memory-limit B` under a budget), called in process through "
            "`run_bench`: a child process, a warm-up pass, then one measured repeat, the pages dropped before "
            f"each under a budget; W = `{WORKLOAD}` (32 decoded tokens after a 32-token prompt that walks the "
            f"checkpoint's topics), and for the {SUSTAINED_TOKENS}-token rows `{SUSTAINED}` (the same prompt, "
            f"{SUSTAINED_TOKENS} tokens decoded), against `llama-bench -n {SUSTAINED_TOKENS}`.",
            "- Budgets: a fresh cgroup per process (`engine.bench.memory_limit`), page cache and process memory "
            "together, the same for both tools.",
            f"- {rounds} rounds; in each, every format and setting, the two tools one after the other, llama.cpp "
            "first in rounds 1, 3, ... and last in the others. Medians with 95% bootstrap intervals; the ratio "
            "engine / llama.cpp is over the rounds' pairs. Efficiency: the engine's median over its roofline (the disk "
            "probe's bandwidth over its disk bytes per token, `docs/benchmarks/engine.md`), cold rows only; the disk "
            f"probed at the start of this run ({probe.measured_at}).",
        ]
    )


def _table(cells: list[Cell], summaries: list[dict], details: Path) -> str:
    rows = []
    for cell, summary in zip(cells, summaries, strict=True):
        llama = _interval(summary["llama.cpp"], cell.runs[LLAMA])
        best = max(summary["engine"], key=lambda n: (summary["engine"][n]["tok_s"] or (0.0,))[0])
        for name, figures in summary["engine"].items():
            ratio = _interval(figures["ratio"], [], "x")
            if len(summary["engine"]) > 1 and name == best:
                ratio = f"**{ratio}**"
            efficiency = "n/a" if figures["efficiency"] is None else f"{100 * figures['efficiency']:.0f}%"
            rows.append(
                f"| {cell.format} | {cell.setting.name} | {llama} | {name} "
                f"| {_interval(figures['tok_s'], cell.runs[name])} | {ratio} | {efficiency} |"
            )
    return "\n".join(
        [
            "## Decode speed",
            "",
            f"Tokens per second, median [95% CI]. In RAM the faster engine configuration's ratio is in bold. All "
            f"figures of every run: `{details}`.",
            "",
            "| format | memory | llama.cpp tok/s | engine configuration | engine tok/s | engine / llama.cpp "
            "| engine efficiency |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


def _profiles(model: Path, cells: list[Cell]) -> str:
    """Where the engine's time goes in RAM, per format: ``engine.bench.profile`` in a child of its own."""
    sections = ["## Where a token's time goes (engine, in RAM)", ""]
    for cell in cells:
        if cell.setting.budget is not None or cell.setting.workload != WORKLOAD:
            continue
        for name in (n for n in (IN_RAM, IN_RAM + INT8) if n in cell.configs):
            sections += _profile(model, cell.format, name, cell.configs[name])
    return "\n".join(sections)


def _profile(model: Path, format: str, name: str, config: EngineConfig) -> list[str]:
    with tempfile.TemporaryDirectory() as scratch:
        toml = Path(scratch) / "config.toml"
        toml.write_text(config.to_toml())
        command = [sys.executable, "-m", "engine.bench.profile", "--model", str(model), "--config", str(toml)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PROFILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            done = None
    what = f"### {format}, {name}, `{WORKLOAD}` warm"
    if done is None or done.returncode != 0:
        reason = "timed out" if done is None else done.stderr[-STDERR_TAIL:].strip()
        return [what, "", f"The profile failed: {reason}", ""]
    return [what, "", f"`python -m engine.bench.profile --model {model} --config C.toml`", "", done.stdout]


def _interval(figures: tuple[float, float, float] | None, runs: list[dict], unit: str = "") -> str:
    if figures is None:
        failures = sorted({run["failure"] for run in runs if "failure" in run})
        return f"failed: {', '.join(failures)}" if failures else "n/a"
    median, low, high = figures
    measured = sum("tok_s" in run for run in runs)
    partial = f" ({measured} of {len(runs)} runs)" if measured < len(runs) else ""
    return f"{median:.2f}{unit} [{low:.2f}, {high:.2f}]{partial}"


def _not_run(cells: list[Cell]) -> str:
    lines = []
    for cell in cells:
        for name, runs in cell.runs.items():
            for r, run in enumerate(runs, 1):
                what = f"{cell.format}, {cell.setting.name}, {name}, round {r}"
                if "failure" in run:
                    lines.append(f"- {what}: {run['failure']}: {run['message'][-300:]}")
                elif "skipped" in run:
                    lines.append(f"- {what}: skipped, {run['skipped']}")
                elif cell.setting.budget is not None and not _enforced(run):
                    lines.append(f"- {what}: ran, but the budget was not enforced: {_limit_reason(run)}")
    return "\n".join(["## What did not run", "", *(lines or ["Everything ran; every budget was enforced."])])


def _enforced(run: dict) -> bool:
    limit = run["result"]["memory_limit"] if "result" in run else run.get("limit", {})
    return bool(limit.get("enforced"))


def _limit_reason(run: dict) -> str:
    limit = run["result"]["memory_limit"] if "result" in run else run.get("limit", {})
    return str(limit.get("reason"))


def _write_json(
    path: Path,
    model: Path,
    llama: LlamaCpp,
    version: dict,
    cells: list[Cell],
    summaries: list[dict],
    options: dict,
) -> None:
    document = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": options,
        "machine": machine_fingerprint(model),
        "engine": _engine(engine_version()),
        "llama_cpp": version,
        "model": model_identity(model),
        "gguf": {kind: {"path": str(p), "bytes": p.stat().st_size} for kind, p in llama.gguf.items()},
        "cells": [
            {
                "format": cell.format,
                "memory": cell.setting.name,
                "budget_bytes": cell.setting.budget,
                "llama_tokens": cell.setting.llama_tokens,
                "workload": cell.setting.workload,
                "gguf": str(cell.gguf),
                "configs": {name: config.to_dict() for name, config in cell.configs.items()},
                "runs": cell.runs,
                "summary": summary,
            }
            for cell, summary in zip(cells, summaries, strict=True)
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
