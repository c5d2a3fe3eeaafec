"""``python -m engine.bench.kernel_bench``: throughput of ``engine.compute.kernels.matmul`` against numpy, as a
markdown table.

Throughput is packed weight bytes (data and scales) per second of the median call. "Hot" calls one matrix again
and again, so it stays in cache as an expert's buffer does right after its read; "cold" cycles through copies
filling ``COLD_BYTES``, more than the last-level cache, as weights arriving by DMA (``O_DIRECT``) would be.
The numpy baseline is the engine's path before the kernels: widen the whole matrix into a reused float32 buffer,
then BLAS. Cells are measured in rounds, each round visiting every cell, and the table shows medians over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
from threadpoolctl import threadpool_limits

from engine.compute import kernels
from engine.formats.checkpoint import to_float32
from engine.formats.quant import FORMATS, INT4_OFFSET, PackedMatrix, quantize

INT8_ACTIVATIONS = "int4, int8 activations"  # int4 weights, x rounded to int8 (``engine.compute.int8_activations``)
KERNELS = (*FORMATS, INT8_ACTIVATIONS)
SHAPES = ((1536, 1024), (1024, 768))  # gate_up [2I, H] and down [H, I] of the 8 GiB synthetic model's experts
TOKENS = (1, 8, 128)
COLD_BYTES = 256 << 20


def kernel_throughput(
    format: str,
    rows: int,
    cols: int,
    tokens: int = 1,
    group_size: int = 64,
    threads: int = 2,
    seconds: float = 1.0,
    *,
    baseline: bool = False,
    cold: bool = False,
) -> float:
    """Packed bytes per second of x [tokens, cols] @ W.T for W [rows, cols] in ``format`` (one of ``KERNELS``):
    kernel or numpy baseline (the float32 one, for int8 activations)."""
    int8_activations = format == INT8_ACTIVATIONS
    p = _packed("int4" if int8_activations else format, rows, cols, group_size)
    copies = -(-COLD_BYTES // p.nbytes) if cold else 1
    matrices = [p] + [dataclasses.replace(p, data=p.data.copy(), scales=p.scales.copy()) for _ in range(copies - 1)]
    x = np.random.default_rng(1).standard_normal((tokens, cols), np.float32)
    out = np.empty((tokens, rows), np.float32)
    if baseline:
        scratch = np.empty(p.shape, np.float32)
        calls = itertools.cycle([_numpy_matmul(x, m, out, scratch) for m in matrices])
    else:
        calls = itertools.cycle([functools.partial(kernels.matmul, x, m, out, int8_activations) for m in matrices])
    with _threads(threads):
        return p.nbytes / _median_call(lambda: next(calls)(), seconds)


@functools.cache
def _packed(format: str, rows: int, cols: int, group_size: int) -> PackedMatrix:
    return quantize(np.random.default_rng(0).standard_normal((rows, cols), np.float32), format, group_size)


def call_overhead(seconds: float = 0.5) -> float:
    """Seconds per ``matmul`` call on an int4 matrix small enough that the call is all overhead."""
    p = quantize(np.ones((16, 64), np.float32), "int4")
    x = np.ones((1, 64), np.float32)
    out = np.empty((1, 16), np.float32)
    return _median_call(lambda: kernels.matmul(x, p, out), seconds)


def _median_call(call: Callable[[], object], seconds: float) -> float:
    call()  # compiles, or loads numba's cache
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    kernels.set_threads(threads)
    try:
        with threadpool_limits(threads):
            yield
    finally:
        kernels.set_threads(kernels.max_threads())


def _numpy_matmul(x: np.ndarray, p: PackedMatrix, out: np.ndarray, scratch: np.ndarray) -> Callable[[], object]:
    w = p.data if p.format == "fp32" else scratch

    def widen() -> None:
        if p.format in ("bf16", "fp16"):
            to_float32(p.data.view(np.uint8).reshape(-1), {"bf16": "BF16", "fp16": "F16"}[p.format], w.reshape(-1))
        elif p.format == "int8":
            np.multiply(p.data, p.scales[:, None], out=w)
        elif p.format == "int4":
            w[:, 0::2] = p.data & 0xF
            w[:, 1::2] = p.data >> 4
            groups = w.reshape(p.shape[0], -1, p.group_size)
            groups -= INT4_OFFSET
            groups *= p.scales[:, :, None]

    return lambda: (widen(), np.matmul(x, w.T, out=out))


def kernel_table(
    rounds: int = 3, seconds: float = 0.2, group_size: int = 64, formats: tuple[str, ...] = KERNELS
) -> str:
    """Every format x matrix x tokens x threads cell, kernel and numpy, hot and cold, as a markdown table."""
    thread_counts = sorted({1, kernels.max_threads()})
    cells = [(f, shape, t, n) for f in formats for shape in SHAPES for t in TOKENS for n in thread_counts]
    variants = [(False, False), (False, True), (True, False), (True, True)]  # (baseline, cold)
    rates: dict[tuple, list[float]] = {(c, v): [] for c in cells for v in variants}
    for _ in range(rounds):
        for c in cells:
            f, (rows, cols), tokens, threads = c
            for baseline, cold in variants:
                rate = kernel_throughput(
                    f, rows, cols, tokens, group_size, threads, seconds, baseline=baseline, cold=cold
                )
                rates[(c, (baseline, cold))].append(rate / 1e9)
    lines = [
        f"Packed GB/s, medians of {rounds} rounds of {seconds:g} s per cell; int4 group size {group_size}; BLAS "
        f"threads limited with threadpoolctl; `matmul` overhead {call_overhead() * 1e6:.1f} µs per call. With more "
        "than one thread a kernel runs a shape on one if its first calls found that faster (`engine.compute.kernels`).",
        "",
        "| format | matrix | tokens | threads | kernel hot | kernel cold | numpy hot | numpy cold | gain (hot) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        f, (rows, cols), tokens, threads = c
        hot, cold, numpy_hot, numpy_cold = (statistics.median(rates[(c, v)]) for v in variants)
        lines.append(
            f"| {f} | {rows}x{cols} | {tokens} | {threads} | {hot:.2f} | {cold:.2f} | {numpy_hot:.2f} | "
            f"{numpy_cold:.2f} | {hot / numpy_hot:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=0.2, help="per cell and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--formats", default=",".join(KERNELS), help=f"comma-separated, of: {', '.join(KERNELS)}")
    args = parser.parse_args(argv)
    formats = tuple(args.formats.split(","))
    unknown = sorted(set(formats) - set(KERNELS))
    if unknown:
        parser.error(f"--formats: unknown {', '.join(unknown)}; expected some of {', '.join(KERNELS)}")
    print(kernel_table(args.rounds, args.seconds, args.group_size, formats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
