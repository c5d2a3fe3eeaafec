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

from engine.formats.expert_layout import PACKED_PER_WORD
from engine.formats.quant import quantize
from engine.formats.safetensors_file import DTYPE_SIZES, SafetensorsWriter
from engine.synth import archs
from engine.synth.shapes import ARCHS, EXPERT_FORMATS, INT4_GROUP_SIZE, PRESETS, SynthShape, sized_shape
from engine.synth.tokenizer import EOS, train_tokenizer
from engine.synth.weights import RoutingKnobs, WeightBuilder, encode, topic_of

SYNTH_FILE = "synth.json"
SYNTH_FORMAT_VERSION = 2  # 2: lm_head rows distinct per token (logit_spread)
SAFETENSORS_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}

__all__ = [
    "ARCHS",
    "PRESETS",
    "SYNTH_FILE",
    "SYNTH_FORMAT_VERSION",
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
    experts: str = "dtype",
) -> Path:
    """Write a checkpoint of ``shape`` to ``out``; returns the directory. ``experts = "int4"`` stores the routed
    experts as Kimi K2.5 does: compressed-tensors' pack-quantized int4, groups of 32, bfloat16 scales."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SAFETENSORS_DTYPES)} but got {dtype!r}")
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"experts must be one of {', '.join(EXPERT_FORMATS)} but got {experts!r}")
    if experts == "int4" and shape.arch == "qwen3_5_moe":
        raise ValueError("int4 experts are per-expert tensors; qwen3_5_moe's synthetic experts are fused")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(shape.vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    shape = SynthShape(**{**shape.__dict__, "vocab_size": tokenizer.get_vocab_size()})
    eos = tokenizer.token_to_id(EOS)
    builder = WeightBuilder(shape, knobs, seed)
    specs = archs.tensor_specs(shape, knobs.residual_scale(shape.num_layers))
    weight_map = _write_shards(out, specs, builder, dtype, shard_bytes, experts)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    config = archs.config(shape, dtype, eos)
    if experts == "int4":
        config["quantization_config"] = archs.int4_quantization_config(INT4_GROUP_SIZE)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    info = {"version": SYNTH_FORMAT_VERSION, "seed": seed, "dtype": dtype, "experts": experts, "knobs": knobs.to_dict()}
    (out / SYNTH_FILE).write_text(json.dumps(info, indent=2))
    return out


def read_synth_info(model_dir: str | Path) -> RoutingKnobs | None:
    """The routing knobs a synthetic checkpoint was built with, or None for any other checkpoint."""
    from engine.errors import CheckpointError
    from engine.formats.checkpoint import read_json

    path = Path(model_dir) / SYNTH_FILE
    if not path.exists():
        return None
    info = read_json(path)
    if info.get("version") != SYNTH_FORMAT_VERSION:
        raise CheckpointError(
            path,
            f"expected version {SYNTH_FORMAT_VERSION}, got {info.get('version')!r}: an older autoresearch made this "
            "checkpoint; make it again with `autoresearch synth`",
            field="version",
        )
    try:
        return RoutingKnobs(**info["knobs"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid routing knobs: {e}", field="knobs") from None


Stored = list[tuple[str, str, tuple[int, ...]]]  # what a tensor spec is stored as: (name, dtype, dims) each


def _stored(spec: archs.TensorSpec, dtype: str, experts: str) -> Stored:
    if experts == "int4" and archs.is_routed_expert(spec.name):
        (rows, cols), module = spec.dims, spec.name.removesuffix(".weight")
        return [(f"{module}.weight_packed", "I32", (rows, cols // PACKED_PER_WORD)),
                (f"{module}.weight_scale", "BF16", (rows, cols // INT4_GROUP_SIZE)),
                (f"{module}.weight_shape", "I32", (2,))]  # fmt: skip
    return [(spec.name, SAFETENSORS_DTYPES[dtype], spec.dims)]


def _encode(values: np.ndarray, spec: archs.TensorSpec, dtype: str, experts: str) -> list[np.ndarray]:
    """The stored arrays of ``spec``, in ``_stored``'s order."""
    if experts == "int4" and archs.is_routed_expert(spec.name):
        packed = quantize(values, "int4_bf16", INT4_GROUP_SIZE)  # int4's byte order is the int32 words'
        return [packed.data, packed.scales, np.array(spec.dims, np.int32)]
    return [encode(values, dtype)]


def _write_shards(
    out: Path, specs: list[archs.TensorSpec], builder: WeightBuilder, dtype: str, shard_bytes: int, experts: str
) -> dict[str, str]:
    stored = [_stored(spec, dtype, experts) for spec in specs]
    weight_map = {}
    index = 0

    def build(index: int, spec: archs.TensorSpec) -> list[np.ndarray]:
        return _encode(builder.build(index, spec), spec, dtype, experts)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        shards = _split(list(zip(specs, stored, strict=True)), shard_bytes)
        for n, shard in enumerate(shards):
            file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            writer = SafetensorsWriter(out / file, [entry for _, entries in shard for entry in entries])
            pending: deque[Future[list[np.ndarray]]] = deque()
            for spec, _ in shard:
                pending.append(pool.submit(build, index, spec))
                index += 1
                if len(pending) > 2 * (os.cpu_count() or 1):
                    _write_next(writer, pending)
            while pending:
                _write_next(writer, pending)
            writer.close()
            weight_map.update({name: file for _, entries in shard for name, _, _ in entries})
    return weight_map


def _write_next(writer: SafetensorsWriter, pending: deque[Future[list[np.ndarray]]]) -> None:
    for array in pending.popleft().result():
        writer.write(writer.sizes[writer.next][0], memoryview(np.ascontiguousarray(array)).cast("B"))


def _split(
    specs: list[tuple[archs.TensorSpec, Stored]], shard_bytes: int
) -> list[list[tuple[archs.TensorSpec, Stored]]]:
    shards: list[list[tuple[archs.TensorSpec, Stored]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = sum(int(np.prod(dims)) * DTYPE_SIZES[dtype] for _, dtype, dims in spec[1])
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards
