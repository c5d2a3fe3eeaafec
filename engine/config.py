"""EngineConfig: every knob of the engine, frozen and validated, round-tripping through a TOML ``[engine]`` table.

Field names are the contract with ``spaces/`` and ``search/``: a search space parameter names a field here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.buffers import PAGE
from engine.compute.int8_activations import BLOCK as INT8_BLOCK
from engine.errors import ConfigError, FileError
from engine.formats.quant import FORMATS
from engine.streaming.cache_policy import POLICIES
from engine.streaming.predictors import PREDICTORS
from engine.units import parse_bytes

TABLE = "engine"
CACHE_POLICIES = tuple(POLICIES)
CACHE_SCOPES = ("global", "per_layer")
CACHE_FORMATS = ("dequantized", "packed")
IO_MODES = ("pread", "direct", "mmap")
WEIGHTS = ("original", *FORMATS)
ACTIVATIONS = ("float32", "int8")
RESIDENT_WEIGHTS = ("original", "int8", "int4")
RESIDENT_GROUP_SIZE = INT8_BLOCK  # resident int4's group: int8 activations' block, and llama.cpp Q4_0's


@dataclass(frozen=True)
class EngineConfig:
    """Every knob of the engine. The defaults are engine part 1's behaviour: synchronous buffered reads, no cache."""

    # The experts' stored format: the checkpoint as it is, or a repacked copy (made once, see engine.formats.weights) in
    # another format; int4 groups ``group_size`` weights per scale (None: 64). Changes the output unless lossless.
    weights: str = "original"
    group_size: int | None = None
    # Active experts per token; None keeps the model's own. Fewer is faster and changes the output.
    top_k: int | None = None
    # The resident matrices (attention projections, shared experts, dense layers' MLPs; not the router, embeddings
    # or output layer): as the checkpoint stores them, or quantized when loaded, int4 in groups of 32 as llama.cpp's
    # Q4_0 does. A quarter of bf16's bytes per token, read at every token. Changes the output unless "original".
    resident_weights: str = "original"
    # Cache-aware routing: an expert whose router probability is within this of the k-th best may replace a
    # better-scored one that is not in RAM. 0 routes exactly. Changes the output.
    cache_routing_tolerance: float = 0.0
    # The engine's expert cache: a byte budget (an int, or a string such as "2GiB"), its eviction policy, and
    # whether one budget serves all layers or each layer gets an equal share.
    cache_bytes: int = 0
    cache_policy: str = "none"
    cache_scope: str = "global"
    # What the cache holds and the compute reads: "dequantized" float32 (numpy's BLAS) or "packed", the bytes as
    # stored (half the RAM per expert for bf16), multiplied by the fused kernels.
    cache_format: str = "dequantized"
    # What int4 experts (and resident matrices made int4 by resident_weights) multiply: the float32 activations, or
    # the activations rounded to int8 per group of weights (llama.cpp's Q4_0 x Q8_0), twice the decode kernel's speed
    # (engine.compute.int8_activations). "int8" needs int4 experts (stored, or weights = "int4") in groups of a
    # multiple of 32, and the packed cache format. Changes the output.
    activations: str = "float32"
    # How expert bytes come off the disk: buffered pread, O_DIRECT (F_NOCACHE on macOS) or a memory map.
    io_mode: str = "pread"
    io_block_bytes: int = 1 << 20  # size of one read request
    io_threads: int = 4  # read requests in flight
    # Prefetch: which predictor proposes the experts of the next layers, how many layers ahead, and how many
    # candidates beyond the predicted top-k.
    predictor: str = "none"
    prefetch_depth: int = 1
    prefetch_extra: int = 0
    # Threads for the compute (the fused kernels and BLAS), for the whole process; None leaves the libraries'
    # defaults (every core).
    compute_threads: int | None = None

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)} but got {self.weights!r}")
        if self.group_size is not None:
            if self.weights != "int4":
                raise ValueError(f"group_size applies only to weights = int4, not {self.weights!r}")
            _check_int("group_size", self.group_size, 2)
            if self.group_size % 2:
                raise ValueError(f"group_size must be even (two int4 weights per byte) but got {self.group_size}")
        if self.top_k is not None and (type(self.top_k) is not int or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or absent but got {self.top_k!r}")
        tolerance = self.cache_routing_tolerance
        if type(tolerance) not in (int, float) or not 0 <= tolerance <= 1:
            raise ValueError(f"cache_routing_tolerance must be a number in [0, 1] but got {tolerance!r}")
        object.__setattr__(self, "cache_routing_tolerance", float(tolerance))
        if isinstance(self.cache_bytes, str):
            object.__setattr__(self, "cache_bytes", parse_bytes(self.cache_bytes, "cache_bytes"))
        _check_int("cache_bytes", self.cache_bytes, 0)
        for name, allowed in (
            ("cache_policy", CACHE_POLICIES),
            ("cache_scope", CACHE_SCOPES),
            ("cache_format", CACHE_FORMATS),
            ("activations", ACTIVATIONS),
            ("resident_weights", RESIDENT_WEIGHTS),
            ("io_mode", IO_MODES),
            ("predictor", PREDICTORS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)} but got {value!r}")
        if self.activations == "int8":
            _check_int8_activations(self.weights, self.group_size, self.cache_format)
        if isinstance(self.io_block_bytes, str):
            object.__setattr__(self, "io_block_bytes", parse_bytes(self.io_block_bytes, "io_block_bytes"))
        _check_int("io_block_bytes", self.io_block_bytes, PAGE)
        if self.io_block_bytes % PAGE:
            raise ValueError(f"io_block_bytes must be a multiple of {PAGE} but got {self.io_block_bytes}")
        _check_int("io_threads", self.io_threads, 1)
        _check_int("prefetch_depth", self.prefetch_depth, 1)
        _check_int("prefetch_extra", self.prefetch_extra, 0)
        if self.compute_threads is not None:
            _check_int("compute_threads", self.compute_threads, 1)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | Path = "<config>") -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(source, f"unknown engine setting; known: {', '.join(sorted(known))}", field=key)
        try:
            return cls(**values)
        except ValueError as e:
            field = str(e).split(" ", 1)[0]  # __post_init__'s messages start with the field's name
            raise ConfigError(source, str(e), field=field) from None

    @classmethod
    def load(cls, path: str | Path) -> EngineConfig:
        """Read the ``[engine]`` table of a TOML file (other tables are left to their owners)."""
        path = Path(path)
        document = read_toml(path, ConfigError, "no such file")
        table = document.get(TABLE)
        if not isinstance(table, dict):
            raise ConfigError(path, f"expected an [{TABLE}] table", field=TABLE)
        return cls.from_dict(table, path)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (TOML has no null: an absent key means the default None)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def to_toml(self) -> str:
        lines = [f"[{TABLE}]"]
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {toml_value(value)}")
        return "\n".join(lines) + "\n"


def _check_int8_activations(weights: str, group_size: int | None, cache_format: str) -> None:
    needs = "activations = int8 needs"
    if weights not in ("original", "int4"):
        raise ValueError(f"{needs} int4 experts (weights = int4, or an int4 original), not weights = {weights}")
    if group_size is not None and group_size % INT8_BLOCK:
        raise ValueError(f"{needs} int4 groups of a multiple of {INT8_BLOCK}, not group_size = {group_size}")
    if cache_format != "packed":
        raise ValueError(f"{needs} cache_format = packed (the {cache_format} cache is float32, for BLAS)")


def read_toml(path: Path, error: type[FileError], missing: str) -> dict[str, Any]:
    """A TOML file's document; a missing or malformed file is ``error`` naming it (``missing`` says what it is)."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise error(path, missing) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(path, f"not valid TOML: {e}") from None


def _check_int(name: str, value: object, minimum: int) -> None:
    if type(value) is not int or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum} but got {value!r}")


def toml_value(value: object) -> str:
    """``value`` as TOML: booleans, numbers (nan and inf included), strings, arrays, inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's string escapes are TOML's basic-string escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"cannot write {value!r} as a TOML value")


def toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)
