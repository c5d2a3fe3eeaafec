"""The repacked expert layout's manifest, ``repack.json``: its schema, strict loading, and views of one expert.

A repacked directory holds the source's config.json (and tokenizer and generation files), ``model.safetensors``
with every non-expert tensor unchanged, ``experts.bin`` and ``repack.json``. ``experts.bin`` holds one byte
range per (MoE layer, expert), layer-major then expert-minor, each starting at a multiple of ``align`` (a
multiple of 4096, so direct reads start aligned): the expert's gate_up [2I, H] (gate rows, then up rows) packed
by ``quant.to_bytes``, zero bytes up to a multiple of 16, then its down [H, I] packed likewise. Zero bytes fill
the gaps and pad the file to a multiple of ``align``, so every range rounded up to ``align`` lies in the file.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.architectures import parse_config
from engine.architectures.spec import DecoderSpec
from engine.errors import CheckpointError
from engine.formats import quant
from engine.formats.checkpoint import read_json
from engine.formats.quant import PackedMatrix

SCHEMA_VERSION = 1
MANIFEST_FILE = "repack.json"
EXPERTS_FILE = "experts.bin"
CONFIG_FILE = "config.json"
MIN_ALIGN = 4096
MATRICES = ("gate_up", "down")


@dataclass(frozen=True)
class MatrixEntry:
    """One packed matrix of an expert; ``offset`` counts from the start of the expert's range."""

    offset: int
    nbytes: int
    shape: tuple[int, int]
    format: str
    group_size: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "nbytes": self.nbytes,
            "shape": list(self.shape),
            "format": self.format,
            "group_size": self.group_size,
        }


@dataclass(frozen=True)
class ExpertEntry:
    """Where one expert lies: ``nbytes`` bytes at ``offset`` of ``file`` (a name in the repacked directory)."""

    layer: int
    expert: int
    file: str
    offset: int
    nbytes: int
    gate_up: MatrixEntry
    down: MatrixEntry

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "expert": self.expert,
            "file": self.file,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "gate_up": self.gate_up.to_dict(),
            "down": self.down.to_dict(),
        }


@dataclass(frozen=True)
class RepackManifest:
    """A validated ``repack.json`` of the directory ``path``; ``experts`` is keyed by (layer, expert)."""

    path: Path
    format: str
    group_size: int  # 0 unless format is int4
    align: int
    source: dict[str, Any]  # path (absolute), config_sha256, weight_files {name: bytes}
    files: dict[str, int]  # name: size in bytes
    experts: dict[tuple[int, int], ExpertEntry]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "format": self.format,
            "group_size": self.group_size,
            "align": self.align,
            "source": self.source,
            "files": self.files,
            "experts": [entry.to_dict() for entry in self.experts.values()],
        }


def expert_shapes(spec: DecoderSpec) -> dict[str, tuple[int, int]]:
    """gate_up [2I, H] and down [H, I], the shapes every repacked expert has."""
    h, i = spec.hidden_size, spec.moe_intermediate_size
    return {"gate_up": (2 * i, h), "down": (h, i)}


def config_sha256(directory: Path) -> str:
    return hashlib.sha256((directory / CONFIG_FILE).read_bytes()).hexdigest()


def is_repacked(directory: str | Path) -> bool:
    """Whether ``directory`` holds a repack manifest (``load_manifest`` says whether it is a valid one)."""
    return (Path(directory) / MANIFEST_FILE).is_file()


def unpack_expert(raw: np.ndarray, entry: ExpertEntry) -> tuple[PackedMatrix, PackedMatrix]:
    """(gate_up, down) viewing, not copying, ``raw``: the uint8 bytes of exactly ``entry``'s range."""
    if raw.nbytes != entry.nbytes:
        raise ValueError(
            f"raw must hold the {entry.nbytes} bytes of layer {entry.layer} expert {entry.expert}, got {raw.nbytes}"
        )
    gate_up, down = (
        quant.from_bytes(raw[m.offset : m.offset + m.nbytes], m.format, m.shape, m.group_size)
        for m in (entry.gate_up, entry.down)
    )
    return gate_up, down


def load_manifest(directory: str | Path) -> RepackManifest:
    """Read ``repack.json`` and check it as ``check_manifest`` does."""
    directory = Path(directory)
    return check_manifest(directory, read_json(directory / MANIFEST_FILE))


def check_manifest(directory: Path, raw: dict[str, Any]) -> RepackManifest:
    """``raw``, the manifest's JSON, checked against ``directory``'s config.json and files.

    Any fault is a CheckpointError naming repack.json and the field (or the expert file, when it is missing
    or its size is not the recorded one).
    """
    spec = parse_config(read_json(directory / CONFIG_FILE), directory / CONFIG_FILE)
    return _Parser(directory, spec).manifest(raw)


class _Parser:
    def __init__(self, directory: Path, spec: DecoderSpec):
        self.directory = directory
        self.path = directory / MANIFEST_FILE
        self.spec = spec

    def error(self, field: str, message: str) -> CheckpointError:
        return CheckpointError(self.path, message, field=field)

    def get(self, obj: dict[str, Any], key: str, kind: type, where: str = "") -> Any:
        field = f"{where}.{key}" if where else key
        if key not in obj:
            raise self.error(field, "required field is missing")
        value = obj[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.error(field, f"expected {kind.__name__}, got {value!r}")
        return value

    def count(self, obj: dict[str, Any], key: str, where: str = "") -> int:
        value = self.get(obj, key, int, where)
        if value < 0:
            raise self.error(f"{where}.{key}" if where else key, f"must not be negative, got {value}")
        return value

    def manifest(self, raw: dict[str, Any]) -> RepackManifest:
        version = self.get(raw, "schema_version", int)
        if version != SCHEMA_VERSION:
            raise self.error("schema_version", f"expected {SCHEMA_VERSION}, got {version} (another engine version?)")
        format = self.get(raw, "format", str)
        if format not in quant.FORMATS:
            raise self.error("format", f"unknown format {format!r}; expected one of {quant.FORMATS}")
        group_size = self.count(raw, "group_size")
        if (format == "int4") != (group_size > 0):
            raise self.error("group_size", f"must be positive for int4 and 0 otherwise, got {group_size} for {format}")
        for name, shape in expert_shapes(self.spec).items():
            try:
                quant.byte_size(format, shape, group_size)
            except ValueError as e:
                raise self.error("group_size", f"{name} {list(shape)}: {e}") from None
        align = self.get(raw, "align", int)
        if align < MIN_ALIGN or align % MIN_ALIGN:
            raise self.error("align", f"must be a positive multiple of {MIN_ALIGN}, got {align}")
        source = self.source(self.get(raw, "source", dict))
        files = self.files(self.get(raw, "files", dict), align)
        items = self.get(raw, "experts", list)
        experts: dict[tuple[int, int], ExpertEntry] = {}
        for n, item in enumerate(items):
            where = f"experts[{n}]"
            if not isinstance(item, dict):
                raise self.error(where, f"expected an object, got {item!r}")
            entry = self.expert(item, where, format, group_size, align, files)
            key = (entry.layer, entry.expert)
            if key in experts:
                raise self.error(where, f"layer {key[0]} expert {key[1]} appears twice")
            experts[key] = entry
        self.check_complete(experts)
        self.check_disjoint(list(experts.values()))
        return RepackManifest(self.directory, format, group_size, align, source, files, experts)

    def source(self, source: dict[str, Any]) -> dict[str, Any]:
        if "path" in source and not isinstance(source["path"], str):
            raise self.error("source.path", f"must be the source checkpoint's directory, got {source['path']!r}")
        sha = self.get(source, "config_sha256", str, "source")
        weight_files = self.get(source, "weight_files", dict, "source")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in weight_files.values()):
            raise self.error("source.weight_files", f"must map file names to sizes, got {weight_files!r}")
        if sha != config_sha256(self.directory):
            raise self.error(
                "source.config_sha256", f"{CONFIG_FILE} is not the one repacked (its sha256 differs); repack again"
            )
        return source

    def files(self, files: dict[str, Any], align: int) -> dict[str, int]:
        for name in files:
            size = self.count(files, name, "files")
            if Path(name).name != name or name in (MANIFEST_FILE, CONFIG_FILE):
                raise self.error(f"files.{name}", "must name a data file in the repacked directory")
            if size % align:
                raise self.error(f"files.{name}", f"size {size} is not a multiple of align {align}")
            path = self.directory / name
            if not path.is_file():
                raise CheckpointError(path, f"missing ({MANIFEST_FILE} places experts here)")
            actual = os.stat(path).st_size
            if actual != size:
                raise CheckpointError(path, f"is {actual} bytes but {MANIFEST_FILE} records {size} (truncated?)")
        return files

    def expert(
        self, item: dict[str, Any], where: str, format: str, group_size: int, align: int, files: dict[str, int]
    ) -> ExpertEntry:
        layer, expert = self.count(item, "layer", where), self.count(item, "expert", where)
        if layer >= self.spec.num_layers or not self.spec.sparse_layers[layer]:
            raise self.error(f"{where}.layer", f"layer {layer} is not a MoE layer of {CONFIG_FILE}")
        if expert >= self.spec.num_experts:
            raise self.error(f"{where}.expert", f"expert {expert} >= num_experts {self.spec.num_experts}")
        file = self.get(item, "file", str, where)
        if file not in files:
            raise self.error(f"{where}.file", f"'{file}' is not listed in files")
        offset, nbytes = self.count(item, "offset", where), self.count(item, "nbytes", where)
        if offset % align:
            raise self.error(f"{where}.offset", f"{offset} is not a multiple of align {align}")
        if offset + nbytes > files[file]:
            raise self.error(
                f"{where}.nbytes", f"range [{offset}, {offset + nbytes}) runs past the end of {file} ({files[file]})"
            )
        shapes = expert_shapes(self.spec)
        gate_up, down = (
            self.matrix(self.get(item, name, dict, where), f"{where}.{name}", shapes[name], format, group_size, nbytes)
            for name in MATRICES
        )
        if gate_up.offset < down.offset + down.nbytes and down.offset < gate_up.offset + gate_up.nbytes:
            raise self.error(f"{where}.down.offset", "down overlaps gate_up")
        return ExpertEntry(layer, expert, file, offset, nbytes, gate_up, down)

    def matrix(
        self,
        item: dict[str, Any],
        where: str,
        shape: tuple[int, int],
        format: str,
        group_size: int,
        range_nbytes: int,
    ) -> MatrixEntry:
        offset, nbytes = self.count(item, "offset", where), self.count(item, "nbytes", where)
        if offset % quant.ALIGN:
            raise self.error(f"{where}.offset", f"{offset} is not a multiple of {quant.ALIGN}")
        if offset + nbytes > range_nbytes:
            raise self.error(f"{where}.nbytes", f"ends at {offset + nbytes}, past the expert's {range_nbytes} bytes")
        if self.get(item, "shape", list, where) != list(shape):
            raise self.error(
                f"{where}.shape",
                f"expected {list(shape)} from {CONFIG_FILE} (hidden_size, moe_intermediate_size), got {item['shape']}",
            )
        for key, expected in (("format", format), ("group_size", group_size)):
            if item.get(key) != expected:
                raise self.error(f"{where}.{key}", f"expected the manifest's {expected!r}, got {item.get(key)!r}")
        expected_nbytes = quant.byte_size(format, shape, group_size)
        if nbytes != expected_nbytes:
            raise self.error(
                f"{where}.nbytes", f"{format} {list(shape)} packs to {expected_nbytes} bytes, got {nbytes}"
            )
        return MatrixEntry(offset, nbytes, shape, format, group_size)

    def check_complete(self, experts: dict[tuple[int, int], ExpertEntry]) -> None:
        layers = self.spec.moe_layers
        missing = [(i, e) for i in layers for e in range(self.spec.num_experts) if (i, e) not in experts]
        if missing:
            layer, expert = missing[0]
            raise self.error("experts", f"no entry for layer {layer} expert {expert} ({len(missing)} missing)")

    def check_disjoint(self, entries: list[ExpertEntry]) -> None:
        ordered = sorted(range(len(entries)), key=lambda n: (entries[n].file, entries[n].offset))
        for before, after in itertools.pairwise(ordered):
            a, b = entries[before], entries[after]
            if a.file == b.file and b.offset < a.offset + a.nbytes:
                raise self.error(
                    f"experts[{after}].offset",
                    f"range [{b.offset}, {b.offset + b.nbytes}) of layer {b.layer} expert {b.expert} overlaps "
                    f"[{a.offset}, {a.offset + a.nbytes}) of layer {a.layer} expert {a.expert}",
                )
