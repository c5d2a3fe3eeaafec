"""Synthetic Hugging Face checkpoints: config.json, sharded safetensors with an index, a tokenizer, and
``synth.json`` (the routing knobs, which the workloads use to draw topic-structured token streams).

The files are real, so the engine and transformers both load them; the weights are random but structured
so that routing looks like a trained model's (``weights.py``). Tensors are built in parallel threads
(numpy's generators release the GIL) and written in order, a few at a time, so RAM stays small.
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engine.safetensors_file import SafetensorsWriter
from engine.synth import archs
from engine.synth.shapes import ARCHS, DTYPE_BYTES, PRESETS, SynthShape, sized_shape
from engine.synth.tokenizer import EOS, train_tokenizer
from engine.synth.weights import RoutingKnobs, WeightBuilder, encode, topic_of

SYNTH_FILE = "synth.json"
SYNTH_FORMAT_VERSION = 1
SAFETENSORS_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}

__all__ = [
    "ARCHS",
    "PRESETS",
    "SYNTH_FILE",
    "RoutingKnobs",
    "SynthShape",
    "read_synth_info",
    "sized_shape",
    "synthesize",
    "topic_of",
]


def synthesize(
    out: str | Path,
    shape: SynthShape,
    dtype: str = "bf16",
    seed: int = 0,
    knobs: RoutingKnobs = RoutingKnobs(),
    shard_bytes: int = 1 << 30,
) -> Path:
    """Write a checkpoint of ``shape`` to ``out``; returns the directory."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SAFETENSORS_DTYPES)} but got {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(shape.vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    shape = SynthShape(**{**shape.__dict__, "vocab_size": tokenizer.get_vocab_size()})
    eos = tokenizer.token_to_id(EOS)
    builder = WeightBuilder(shape, knobs, seed)
    specs = archs.tensor_specs(shape, knobs.residual_scale(shape.num_layers))
    weight_map = _write_shards(out, specs, builder, dtype, shard_bytes)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(archs.config(shape, dtype, eos), indent=2))
    info = {"version": SYNTH_FORMAT_VERSION, "seed": seed, "dtype": dtype, "knobs": knobs.to_dict()}
    (out / SYNTH_FILE).write_text(json.dumps(info, indent=2))
    return out


def read_synth_info(model_dir: str | Path) -> RoutingKnobs | None:
    """The routing knobs a synthetic checkpoint was built with, or None for any other checkpoint."""
    from engine.checkpoint import read_json
    from engine.errors import CheckpointError

    path = Path(model_dir) / SYNTH_FILE
    if not path.exists():
        return None
    info = read_json(path)
    if info.get("version") != SYNTH_FORMAT_VERSION:
        raise CheckpointError(
            path, f"expected version {SYNTH_FORMAT_VERSION}, got {info.get('version')!r}", field="version"
        )
    try:
        return RoutingKnobs(**info["knobs"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid routing knobs: {e}", field="knobs") from None


def _write_shards(
    out: Path, specs: list[archs.TensorSpec], builder: WeightBuilder, dtype: str, shard_bytes: int
) -> dict[str, str]:
    shards = _split(specs, shard_bytes, DTYPE_BYTES[dtype])
    weight_map = {}
    index = 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for n, shard in enumerate(shards):
            file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            writer = SafetensorsWriter(out / file, [(s.name, SAFETENSORS_DTYPES[dtype], s.dims) for s in shard])
            pending: deque[Future[np.ndarray]] = deque()
            for spec in shard:
                pending.append(pool.submit(lambda i, s: encode(builder.build(i, s), dtype), index, spec))
                index += 1
                if len(pending) > 2 * (os.cpu_count() or 1):
                    _write_next(writer, pending)
            while pending:
                _write_next(writer, pending)
            writer.close()
            weight_map.update({spec.name: file for spec in shard})
    return weight_map


def _write_next(writer: SafetensorsWriter, pending: deque[Future[np.ndarray]]) -> None:
    name = writer.sizes[writer.next][0]
    writer.write(name, memoryview(pending.popleft().result()).cast("B"))


def _split(specs: list[archs.TensorSpec], shard_bytes: int, itemsize: int) -> list[list[archs.TensorSpec]]:
    shards: list[list[archs.TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec.dims)) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards
