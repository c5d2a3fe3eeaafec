"""Routing traces: what the routers chose on one pass over a workload, for the simulator to replay.

A trace is the forward calls of one pass exactly as the benchmark makes them (the prompt, then one call per
decoded token), and for every token of every call and every MoE layer:

- the router's best ``R`` experts with their probabilities, best first (the first ``top_k`` are the ones it chose;
  the others let the simulator replay cache-aware routing and prefetch candidates beyond the top-k);
- what ``gate_lookahead`` proposed for each of the next ``D`` MoE layers: their routers applied to this layer's
  input, computed by the engine's own predictor, as its best ``R`` experts (-1 past the last layer).

Beside them: the token ids, where every expert's bytes lie (so bytes per read follow for any ``io_mode`` without
the checkpoint), and the compute time per token measured while recording. ``previous_token`` and
``coactivation`` need nothing more: they learn from the recorded routing. Saved as one compressed ``.npz``
holding numpy arrays and a JSON header; ``TRACE_VERSION`` changes whenever the format does.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.architectures.spec import DecoderSpec
from engine.bench.workloads import Workload
from engine.config import EngineConfig
from engine.errors import FileError
from engine.formats.expert_layout import ByteRange, ExpertLayout
from engine.model.decoder import Routing
from engine.model.load import Model, load_model
from engine.streaming.expert_store import RouterScores

TRACE_VERSION = 1
RECORDED_EXTRA = 8  # router candidates recorded beyond the top-k: the most prefetch_extra a replay can ask for
LOOKAHEAD_DEPTH = 4  # MoE layers ahead that gate_lookahead's proposals are recorded for
ARRAYS = {  # name: (dtype, dimensions)
    "token_ids": (np.int32, ("N",)),
    "call_tokens": (np.int32, ("C",)),
    "top_ids": (np.int16, ("N", "L", "R")),
    "top_probs": (np.float32, ("N", "L", "R")),
    "lookahead_ids": (np.int16, ("N", "L", "D", "R")),
    "expert_offsets": (np.int64, ("L", "E", "P")),
    "expert_nbytes": (np.int64, ("L", "E", "P")),
}
META_FIELDS = (
    "version", "model", "model_identity", "workload", "recorded_with", "num_experts", "top_k", "moe_layers",
    "num_layers", "hidden_size", "intermediate_size", "repacked", "prefill_seconds_per_token",
    "decode_seconds_per_token", "recorded_at",
)  # fmt: skip


class TraceError(FileError):
    """A trace file that cannot be used."""


@dataclass(frozen=True)
class Trace:
    meta: dict[str, Any]
    token_ids: np.ndarray  # [N] the ids fed to the forward calls, in order
    call_tokens: np.ndarray  # [C] tokens per forward call; they sum to N
    top_ids: np.ndarray  # [N, L, R] per token and MoE layer, the router's best experts, best first
    top_probs: np.ndarray  # [N, L, R] their router probabilities
    lookahead_ids: np.ndarray  # [N, L, D, R] gate_lookahead's best experts for the d-th next MoE layer, or -1
    expert_offsets: np.ndarray  # [L, E, P] file offset of each byte range of each expert (padding: nbytes 0)
    expert_nbytes: np.ndarray  # [L, E, P]

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def moe_layers(self) -> list[int]:
        return list(self.meta["moe_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def candidates(self) -> int:
        return self.top_ids.shape[2]

    @property
    def depth(self) -> int:
        return self.lookahead_ids.shape[2]

    def call_bounds(self) -> list[tuple[int, int]]:
        """(first token, end) of each forward call."""
        ends = np.cumsum(self.call_tokens).tolist()
        return list(zip([0, *ends[:-1]], ends, strict=True))

    def layouts(self) -> dict[tuple[int, int], ExpertLayout]:
        """Each expert's byte ranges as layouts (one file, no dtype: enough to count the bytes a read takes)."""
        layouts = {}
        for li, layer in enumerate(self.moe_layers):
            for expert in range(self.num_experts):
                ranges = tuple(
                    ByteRange("trace", int(offset), int(nbytes), "U8", f"layer {layer} expert {expert}")
                    for offset, nbytes in zip(
                        self.expert_offsets[li, expert], self.expert_nbytes[li, expert], strict=True
                    )
                    if nbytes
                )
                layouts[(layer, expert)] = ExpertLayout(ranges, None)
        return layouts

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {name: getattr(self, name) for name in ARRAYS}
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # a reader never sees half a trace
        with partial.open("wb") as f:  # a file object: numpy would append .npz to a bare name
            np.savez_compressed(f, meta=np.asarray(json.dumps(self.meta)), **arrays)
        os.replace(partial, path)
        return path


def load_trace(path: str | Path) -> Trace:
    """A saved trace, checked: its version, every field of the header and every array's type and shape."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(path, "no such trace file (record one with `autoresearch trace`)")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with data:
            contents = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise TraceError(path, f"not a trace (an .npz written by `autoresearch trace`): {e}") from None
    if "meta" not in contents:
        raise TraceError(path, "missing; expected the trace's JSON header", field="meta")
    try:
        meta = json.loads(str(contents.pop("meta")))
    except json.JSONDecodeError as e:
        raise TraceError(path, f"not valid JSON: {e}", field="meta") from None
    if not isinstance(meta, dict) or meta.get("version") != TRACE_VERSION:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise TraceError(path, f"is {version!r}; this engine reads trace version {TRACE_VERSION}", field="version")
    missing = [name for name in META_FIELDS if name not in meta]
    if missing:
        raise TraceError(path, "missing from the header", field=missing[0])
    for name, kind in (("num_experts", int), ("top_k", int), ("num_layers", int), ("moe_layers", list)):
        if not isinstance(meta[name], kind) or isinstance(meta[name], bool):
            raise TraceError(path, f"expected {kind.__name__}, got {meta[name]!r}", field=name)
    layers = meta["moe_layers"]
    if not layers or not all(isinstance(i, int) and 0 <= i < meta["num_layers"] for i in layers):
        raise TraceError(path, f"expected layer indices below num_layers {meta['num_layers']}", field="moe_layers")
    extra = sorted(set(contents) - set(ARRAYS))
    if extra:
        raise TraceError(path, "not an array of a trace", field=extra[0])
    sizes: dict[str, int] = {"L": len(layers), "E": meta["num_experts"]}
    for name, (dtype, dims) in ARRAYS.items():
        if name not in contents:
            raise TraceError(path, "array missing", field=name)
        array = contents[name]
        if array.dtype != dtype or array.ndim != len(dims):
            raise TraceError(
                path, f"is {array.dtype} in {array.ndim} dims; expected {np.dtype(dtype)} over {dims}", field=name
            )
        for dim, size in zip(dims, array.shape, strict=True):
            if sizes.setdefault(dim, size) != size:
                raise TraceError(path, f"has {size} along {dim}, the rest of the trace {sizes[dim]}", field=name)
    trace = Trace(meta=meta, **contents)
    if not len(trace.call_tokens):
        raise TraceError(path, "records no forward call", field="call_tokens")
    if int(trace.call_tokens.sum()) != len(trace.token_ids) or (trace.call_tokens < 1).any():
        raise TraceError(path, f"must be positive and sum to the {len(trace.token_ids)} tokens", field="call_tokens")
    if trace.candidates < trace.top_k:
        raise TraceError(path, f"records {trace.candidates} experts per token, fewer than top_k", field="top_ids")
    if trace.top_ids.size and not (trace.top_ids.min() >= 0 and trace.top_ids.max() < trace.num_experts):
        raise TraceError(path, f"holds expert ids outside [0, {trace.num_experts})", field="top_ids")
    for li in range(len(layers)):  # -1 exactly where no later layer is
        present = trace.lookahead_ids[:, li, : len(layers) - 1 - li]
        absent = trace.lookahead_ids[:, li, len(layers) - 1 - li :]
        if (present.size and not (present.min() >= 0 and present.max() < trace.num_experts)) or (absent != -1).any():
            raise TraceError(path, f"MoE layer {li}: expert ids outside [0, {trace.num_experts}) or misplaced -1",
                             field="lookahead_ids")  # fmt: skip
    return trace


class Recorder:
    """Keeps each MoE layer's candidates and lookahead proposals: attached to a decoder as its route observer, or
    given the routing another implementation computed (``observe``)."""

    def __init__(self, moe_layers: list[int], router_scores: RouterScores, candidates: int, depth: int) -> None:
        self.moe_layers = moe_layers
        self.router_scores = router_scores  # what gate_lookahead ranks a later layer's experts by
        self.candidates, self.depth = candidates, depth
        self.calls: list[int] = []
        self.seconds: list[float] = []  # per forward call, spent recording
        self.rows: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {i: [] for i in self.moe_layers}

    def __call__(self, layer: int, h: np.ndarray, routing: Routing) -> None:
        self.observe(layer, h, routing.probs)

    def observe(self, layer: int, h: np.ndarray, scores: np.ndarray) -> None:
        """MoE layer ``layer``'s input ``h`` [T, hidden] and its router's ``scores`` [T, E] for one forward call."""
        began = time.perf_counter()
        if layer == self.moe_layers[0]:
            self.calls.append(h.shape[0])
            self.seconds.append(0.0)
        r = self.candidates
        order = np.argsort(-scores, axis=1, kind="stable")[:, :r]  # the decoder's own order
        probs = np.take_along_axis(scores, order, axis=1)
        position = self.moe_layers.index(layer)
        ahead = np.full((h.shape[0], self.depth, r), -1, np.int16)
        for d, target in enumerate(self.moe_layers[position + 1 : position + 1 + self.depth]):
            scores = self.router_scores(target, h)
            ahead[:, d] = np.argsort(-scores, axis=1, kind="stable")[:, :r]
        self.rows[layer].append((order.astype(np.int16), probs.astype(np.float32), ahead))
        self.seconds[-1] += time.perf_counter() - began  # not the engine's: taken out of its compute time

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stacked = [[np.concatenate(parts) for parts in zip(*self.rows[i], strict=True)] for i in self.moe_layers]
        return tuple(np.stack([layer[n] for layer in stacked], axis=1) for n in range(3))  # type: ignore[return-value]


def record_trace(model_dir: str | Path, workload: Workload, config: EngineConfig) -> Trace:
    """One pass of ``workload`` on the checkpoint ``model_dir`` loaded with ``config``, as the benchmark makes it
    (after a warm-up pass), recorded."""
    if config.cache_routing_tolerance or config.top_k is not None:
        raise ValueError(
            "a trace records the router's own choice: record it with the model's top_k and cache_routing_tolerance "
            "= 0 (the simulator replays fewer experts and any tolerance from the recorded candidates)"
        )
    if config.io_mode == "mmap":
        raise ValueError("record a trace with io_mode pread or direct: under mmap page faults count as compute")
    model = load_model(model_dir, config)
    try:
        return _record(model, workload, config)
    finally:
        model.close()


def _record(model: Model, workload: Workload, config: EngineConfig) -> Trace:
    from engine.bench.worker import measure

    decoder = model.decoder
    prompt = workload.tokens(model)
    # A warm-up pass first, as the benchmark runs one: numba compiles each kernel at its first call (after every
    # update of the engine), and compiling counted as compute made the simulator predict up to 10x too slow.
    measure(model, workload, prompt)
    recorder = new_recorder(model)
    decoder.route_observer = recorder
    try:
        run = measure(model, workload, prompt)
    finally:
        decoder.route_observer = None
    prefill = _compute_per_token(run, "prefill", run.get("ttft_seconds"), len(prompt), recorder.seconds[0])
    if workload.kind == "score":
        prefill = _compute_per_token(run, "prefill", run["prefill_seconds"], len(prompt), recorder.seconds[0])
    decode = _compute_per_token(
        run, "decode", run.get("decode_seconds"), len(run.get("step_seconds", [])), sum(recorder.seconds[1:])
    )
    fed = prompt + run.get("tokens", [])[:-1]  # the last sampled token is never fed back
    return assemble(model, workload, prompt, fed, recorder, config.to_dict(), prefill, decode)


def new_recorder(model: Model, router_scores: RouterScores | None = None) -> Recorder:
    """A recorder of ``model``'s MoE layers, its lookahead ranked by ``router_scores`` (default: the model's own
    routers)."""
    decoder = model.decoder
    candidates = min(decoder.spec.num_experts, decoder.spec.top_k + RECORDED_EXTRA)
    return Recorder(decoder.spec.moe_layers, router_scores or decoder.router_scores, candidates, LOOKAHEAD_DEPTH)


def assemble(
    model: Model,
    workload: Workload,
    prompt: list[int],
    fed: list[int],
    recorder: Recorder,
    recorded_with: dict[str, Any],
    prefill_seconds_per_token: float | None,
    decode_seconds_per_token: float | None,
) -> Trace:
    """The trace of one recorded pass of ``workload`` (``fed``: every token id the forward calls took)."""
    from engine.bench.fingerprint import model_identity

    spec = model.decoder.spec
    top_ids, top_probs, lookahead = recorder.arrays()
    offsets, nbytes, repacked = _expert_ranges(model.decoder.store.layouts, recorder.moe_layers, spec.num_experts)
    meta = header(spec, model.path, model_identity(model.path), workload.identity(prompt), recorded_with, repacked,
                  prefill_seconds_per_token, decode_seconds_per_token)  # fmt: skip
    return Trace(
        meta,
        np.asarray(fed, np.int32),
        np.asarray(recorder.calls, np.int32),
        top_ids,
        top_probs,
        lookahead,
        offsets,
        nbytes,
    )


def header(
    spec: DecoderSpec,
    model: Path,
    identity: dict[str, Any],
    workload: dict[str, Any],
    recorded_with: dict[str, Any],
    repacked: bool,
    prefill_seconds_per_token: float | None,
    decode_seconds_per_token: float | None,
) -> dict[str, Any]:
    """A trace's JSON header (``META_FIELDS``) for the model ``spec`` describes."""
    return {
        "version": TRACE_VERSION,
        "model": str(model),
        "model_identity": identity,
        "workload": workload,
        "recorded_with": recorded_with,
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "moe_layers": spec.moe_layers,
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.moe_intermediate_size,
        "repacked": repacked,
        "prefill_seconds_per_token": prefill_seconds_per_token,
        "decode_seconds_per_token": decode_seconds_per_token,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _compute_per_token(run: dict, phase: str, seconds: float | None, tokens: int, recording: float) -> float | None:
    """Seconds per token the compute took in ``phase``: the phase's time less the time it waited for reads and
    the time the recorder itself took."""
    if seconds is None or tokens == 0:
        return None
    return max(0.0, seconds - run[phase]["stall_seconds"] - recording) / tokens


def _expert_ranges(
    layouts: dict[tuple[int, int], ExpertLayout], moe_layers: list[int], num_experts: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    pieces = max(len(layout.byte_ranges) for layout in layouts.values())
    offsets = np.zeros((len(moe_layers), num_experts, pieces), np.int64)
    nbytes = np.zeros_like(offsets)
    for li, layer in enumerate(moe_layers):
        for expert in range(num_experts):
            for p, r in enumerate(layouts[(layer, expert)].byte_ranges):
                offsets[li, expert, p], nbytes[li, expert, p] = r.offset, r.nbytes
    return offsets, nbytes, any(layout.packed_on_disk for layout in layouts.values())
