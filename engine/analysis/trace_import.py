"""Traces from routing logs (``autoresearch import-trace``): a real model's routing, replayed with no weights.

A routing log is JSON Lines, one object per token and MoE layer::

    {"token_idx": 0, "layer": 3, "experts": [5, 1], "gating_probs": [0.61, 0.39], "problem_id": "gsm8k/17"}

``layer`` is the model's layer index (a MoE layer), ``experts`` the router's top-k and ``gating_probs`` their
probabilities; a sequence id (``problem_id`` or ``sequence``) is optional. The sequences are replayed one after
another in the order they first appear, each token its own forward call (a generation's decode steps), the cache
kept across them.

What a log cannot give, the trace says rather than invents: no gate_lookahead proposals (``depth`` 0, so
``simulate`` refuses that predictor by name), no router candidates beyond the top-k (no ``prefetch_extra``), no
token ids (-1) and no compute time (``simulate --compute-ms-per-token`` gives one). The experts' bytes follow from
config.json and the dtype, laid out as a Hugging Face checkpoint stores them: each expert's gate, up and down
matrices one after another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.analysis.trace import Trace, TraceError, header
from engine.architectures import parse_config
from engine.architectures.spec import DecoderSpec
from engine.formats.checkpoint import read_json
from engine.synth.shapes import DTYPE_BYTES

SEQUENCE_FIELDS = ("problem_id", "sequence")  # either names the generation a line belongs to


def import_trace(log: str | Path, model_config: str | Path, dtype: str = "bf16") -> Trace:
    """The trace of the routing log ``log`` for the model that ``model_config`` (its config.json) describes, its
    experts stored in ``dtype``. Every line is checked; the first bad one is an error naming its line number."""
    log, model_config = Path(log), Path(model_config)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPE_BYTES)}")
    spec = parse_config(read_json(model_config), model_config)
    moe_layers = spec.moe_layers
    tokens = _read(log, spec, moe_layers)
    n, layers, k = len(tokens), len(moe_layers), spec.top_k
    top_ids = np.zeros((n, layers, k), np.int16)
    top_probs = np.zeros((n, layers, k), np.float32)
    for t, (where, routed) in enumerate(tokens.items()):
        missing = [moe_layers[li] for li in range(layers) if li not in routed]
        if missing:
            raise TraceError(f"{log}:{where[2]}", f"token {where[1]}{_of(where[0])} has no line for layer "
                             f"{missing[0]} (nor for {len(missing) - 1} other MoE layers)", field="layer")  # fmt: skip
        for li, (experts, probs) in routed.items():
            order = np.argsort(-np.asarray(probs), kind="stable")  # best first, as the engine records them
            top_ids[t, li] = np.asarray(experts)[order]
            top_probs[t, li] = np.asarray(probs)[order]
    offsets, nbytes = _expert_ranges(spec, dtype, layers)
    sequences = list(dict.fromkeys(sequence for sequence, _, _ in tokens))
    identity = {"config_sha256": hashlib.sha256(model_config.read_bytes()).hexdigest(), "dtype": dtype}
    imported = {"name": f"routing log {log.name}", "imported": str(log.resolve()),
                "sha256": hashlib.sha256(log.read_bytes()).hexdigest(), "sequences": len(sequences)}  # fmt: skip
    meta = header(spec, model_config.resolve().parent, identity, imported, {"weights": "original"}, False, None, None)
    meta["imported_from"] = str(log.resolve())
    return Trace(
        meta,
        token_ids=np.full(n, -1, np.int32),
        call_tokens=np.ones(n, np.int32),
        top_ids=top_ids,
        top_probs=top_probs,
        lookahead_ids=np.zeros((n, layers, 0, k), np.int16),
        expert_offsets=offsets,
        expert_nbytes=nbytes,
    )


Routed = dict[int, tuple[list[int], list[float]]]  # MoE layer position: (experts, their probabilities)


def _read(log: Path, spec: DecoderSpec, moe_layers: list[int]) -> dict[tuple[str, int, int], Routed]:
    """Each token's routing by (sequence, token_idx, the line that began it), sequences in the order they first
    appear and tokens in order within each."""
    position = {layer: li for li, layer in enumerate(moe_layers)}
    tokens: dict[tuple[str, int], Routed] = {}
    first_line: dict[tuple[str, int], int] = {}
    try:
        lines = log.open()
    except OSError as e:
        raise TraceError(log, f"cannot read the routing log: {e}") from None
    with lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{log}:{number}"
            row = _row(where, line)
            sequence, token = _sequence(where, row), _integer(where, row, "token_idx")
            layer = _integer(where, row, "layer")
            if layer not in position:
                raise TraceError(where, f"{layer} is not one of the model's MoE layers ({_span(moe_layers)})",
                                 field="layer")  # fmt: skip
            experts, probs = _routing(where, row, spec)
            routed = tokens.setdefault((sequence, token), {})
            first_line.setdefault((sequence, token), number)
            if position[layer] in routed:
                raise TraceError(where, f"token {token}{_of(sequence)} already has layer {layer}", field="layer")
            routed[position[layer]] = (experts, probs)
    if not tokens:
        raise TraceError(log, "holds no routing: expected one JSON object per token and MoE layer")
    order = {sequence: i for i, sequence in enumerate(dict.fromkeys(sequence for sequence, _ in tokens))}
    keys = sorted(tokens, key=lambda key: (order[key[0]], key[1]))
    return {(sequence, token, first_line[(sequence, token)]): tokens[(sequence, token)] for sequence, token in keys}


def _row(where: str, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(where, f"not JSON: {e}") from None
    if not isinstance(row, dict):
        raise TraceError(where, f"expected a JSON object, got {type(row).__name__}")
    return row


def _sequence(where: str, row: dict[str, Any]) -> str:
    given = [name for name in SEQUENCE_FIELDS if name in row]
    if len(given) > 1:
        raise TraceError(where, f"both {' and '.join(given)} given; one names the sequence", field=given[1])
    value = row[given[0]] if given else ""
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise TraceError(where, f"expected a string or an integer, got {value!r}", field=given[0])
    return str(value)


def _integer(where: str, row: dict[str, Any], name: str) -> int:
    if name not in row:
        raise TraceError(where, "missing", field=name)
    value = row[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TraceError(where, f"expected an integer >= 0, got {value!r}", field=name)
    return value


def _routing(where: str, row: dict[str, Any], spec: DecoderSpec) -> tuple[list[int], list[float]]:
    for name in ("experts", "gating_probs"):
        if name not in row:
            raise TraceError(where, "missing", field=name)
        if not isinstance(row[name], list) or len(row[name]) != spec.top_k:
            got = f"{len(row[name])} entries" if isinstance(row[name], list) else repr(row[name])
            raise TraceError(where, f"expected a list of the model's top_k = {spec.top_k}, got {got}", field=name)
    experts, probs = row["experts"], row["gating_probs"]
    for expert in experts:
        if not isinstance(expert, int) or isinstance(expert, bool) or not 0 <= expert < spec.num_experts:
            raise TraceError(where, f"{expert!r} is not an expert id in [0, {spec.num_experts})", field="experts")
    if len(set(experts)) != len(experts):
        raise TraceError(where, f"{experts} names an expert twice", field="experts")
    for p in probs:
        if not isinstance(p, int | float) or isinstance(p, bool) or not 0 <= p <= 1:
            raise TraceError(where, f"{p!r} is not a probability in [0, 1]", field="gating_probs")
    return experts, [float(p) for p in probs]


def _expert_ranges(spec: DecoderSpec, dtype: str, layers: int) -> tuple[np.ndarray, np.ndarray]:
    """[L, E, 3] offsets and sizes: each expert's gate, up and down matrices, one after another."""
    matrix = spec.hidden_size * spec.moe_intermediate_size * DTYPE_BYTES[dtype]
    nbytes = np.full((layers, spec.num_experts, 3), matrix, np.int64)
    offsets = (np.arange(layers * spec.num_experts * 3, dtype=np.int64) * matrix).reshape(nbytes.shape)
    return offsets, nbytes


def _of(sequence: str) -> str:
    return f" of sequence {sequence!r}" if sequence else ""


def _span(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]} to {layers[-1]}"
    return ", ".join(map(str, layers))
