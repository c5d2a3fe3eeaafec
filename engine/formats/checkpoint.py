"""Open a Hugging Face checkpoint directory: config.json, one or many safetensors files, byte-exact reads."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import CheckpointError
from engine.formats import quant
from engine.formats.safetensors_file import TensorInfo, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16")


def to_float32(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Convert the raw bytes ``raw`` (uint8) of a float tensor to float32, into ``out`` (1-D) when given.

    Writing into a reused ``out`` matters on the decode path: a fresh multi-MiB array is new pages, and
    faulting them in costs more than the conversion itself (measured: 3x for bf16 at 0.5-2 MiB).
    """
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    if out is None:
        out = np.empty(raw.nbytes // itemsize, np.float32)
    if dtype == "F32":
        np.copyto(out, raw.view(np.float32))
    elif dtype == "F16":
        np.copyto(out, raw.view(np.float16))
    else:  # bf16 is the top half of an fp32: widen and shift into place
        bits = out.view(np.uint32)
        np.copyto(bits, raw.view(np.uint16))
        bits <<= 16
    return out


def drop_cached_pages(fd: int) -> None:
    """Evict an open file's pages from the page cache (where ``posix_fadvise`` exists)."""
    os.fdatasync(fd)  # pages still waiting to be written (a file written just now) cannot be dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"not readable as JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, f"must hold a JSON object, got {type(value).__name__}")
    return value


@dataclass
class Checkpoint:
    """A checkpoint's config and the location of every tensor, with open file descriptors for reading."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    fds: dict[str, int]

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(path, "not a checkpoint directory")
        config = read_json(path / "config.json")
        tensors = _index_tensors(path)
        fds = {file: os.open(file, os.O_RDONLY) for file in sorted({t.path for t in tensors.values()})}
        if hasattr(os, "posix_fadvise"):  # expert reads are random: read exactly what is asked, no readahead
            for fd in fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return cls(path, config, tensors, fds)

    def drop_cached_pages(self) -> bool:
        """Ask the kernel to evict this checkpoint's files from the page cache; False where it cannot be asked."""
        if not hasattr(os, "posix_fadvise"):
            return False
        for fd in self.fds.values():
            drop_cached_pages(fd)
        return True

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def info(
        self, name: str, shape: tuple[int, ...] | None = None, dtypes: tuple[str, ...] = FLOAT_DTYPES
    ) -> TensorInfo:
        """The tensor ``name``, checked to be of one of ``dtypes`` and of ``shape`` when one is given."""
        info = self.tensors.get(name)
        if info is None:
            packed = name.removesuffix(".weight") + ".weight_packed"
            if name.endswith(".weight") and packed in self.tensors:
                raise CheckpointError(
                    self.path, "is quantized (compressed-tensors); the engine reads quantized weights only for "
                    "routed experts", tensor=packed)  # fmt: skip
            raise CheckpointError(self.path, "missing tensor", tensor=name)
        if info.dtype not in dtypes:
            raise CheckpointError(info.path, f"dtype {info.dtype} is not one of {dtypes}", tensor=name)
        if shape is not None and info.shape != shape:
            raise CheckpointError(
                info.path, f"shape {list(info.shape)} but the config implies {list(shape)}", tensor=name
            )
        return info

    def read(self, name: str, shape: tuple[int, ...] | None = None, fp8_block: int = 0) -> np.ndarray:
        """Read one whole tensor as float32; with ``fp8_block`` (a block-fp8 checkpoint's), a float8 e4m3 tensor
        too, scaled by its ``<name>_scale_inv`` per block."""
        info = self.info(name, shape, ("F8_E4M3", *FLOAT_DTYPES) if fp8_block else FLOAT_DTYPES)
        raw = np.empty(info.nbytes, dtype=np.uint8)
        self.read_into(info.path, info.start, raw, name)
        if info.dtype != "F8_E4M3":
            return to_float32(raw, info.dtype).reshape(info.shape)
        if len(info.shape) != 2:
            raise CheckpointError(info.path, f"float8 tensor of shape {list(info.shape)}, not a matrix", tensor=name)
        shape = (info.shape[0], info.shape[1])
        scales = self.read(f"{name}_scale_inv", quant.scales_shape_of("fp8", shape, fp8_block))
        return quant.dequantize(quant.PackedMatrix("fp8", shape, fp8_block, raw.reshape(shape), scales))

    def read_matrix(self, name: str, shape: tuple[int, int], fp8_block: int = 0) -> np.ndarray | quant.PackedMatrix:
        """A weight matrix for ``kernels.matmul``: as stored if bfloat16 (half the bytes of float32 to hold and to
        stream through the compute), otherwise as ``read`` gives it."""
        info = self.info(name, shape, ("F8_E4M3", *FLOAT_DTYPES))
        if info.dtype != "BF16":
            return self.read(name, shape, fp8_block)
        raw = np.empty(info.nbytes, dtype=np.uint8)
        self.read_into(info.path, info.start, raw, name)
        return quant.PackedMatrix("bf16", shape, 0, raw.view(np.uint16).reshape(shape), np.empty(0, np.float32))

    def read_into(self, path: str, offset: int, buffer: np.ndarray, tensor: str) -> None:
        """Fill ``buffer`` with the bytes at ``offset`` of ``path``; a short read means the file shrank."""
        got = os.preadv(self.fds[path], [buffer], offset)
        if got != buffer.nbytes:
            raise CheckpointError(
                path, f"read {got} of {buffer.nbytes} bytes at offset {offset} (truncated?)", tensor=tensor
            )


def _index_tensors(path: Path) -> dict[str, TensorInfo]:
    index_path = path / INDEX_FILE
    if index_path.exists():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(index_path, "must map tensor names to file names", field="weight_map")
        headers = {file: read_header(_shard(path, index_path, file)) for file in sorted(set(weight_map.values()))}
        tensors = {}
        for name, file in weight_map.items():
            if name not in headers[file]:
                raise CheckpointError(
                    path / file, f"missing tensor (the index {INDEX_FILE} places it here)", tensor=name
                )
            tensors[name] = headers[file][name]
        return tensors
    single = path / SINGLE_FILE
    if single.exists():
        return read_header(single)
    raise CheckpointError(path, f"holds neither {SINGLE_FILE} nor {INDEX_FILE}")


def _shard(path: Path, index_path: Path, file: str) -> Path:
    shard = path / file
    if Path(file).name != file or not shard.is_file():
        raise CheckpointError(index_path, f"names shard '{file}', which is not a file in {path}")
    return shard
