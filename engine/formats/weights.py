"""The ``weights`` knob: run a checkpoint as stored, or a repacked copy of it in another format, made once.

Copies live in ``<cache>/repacked/<name>-<path hash>/<format>`` (``int4-g<group size>`` for int4), under the
cache directory of ``engine.paths``. A copy is used only while its manifest's record of the source (config.json
and the weight files' sizes) still matches the checkpoint; otherwise it is written again. Repacking holds an
exclusive lock on ``<copy>.lock``, so processes asking for the same copy at once repack it once. A copy a killed
run left half-written has no manifest (``repack`` writes it last) and is written again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from engine.errors import CheckpointError
from engine.formats.repack import repack
from engine.formats.repack_manifest import RepackManifest, config_sha256, is_repacked, load_manifest
from engine.paths import default_cache_dir

DEFAULT_GROUP_SIZE = 64  # int4's, when the config does not set one


def weights_dir(
    model_dir: str | Path, weights: str, group_size: int | None = None, cache_dir: Path | None = None
) -> Path:
    """The directory holding ``model_dir``'s weights in the format ``weights``, repacking them if needed."""
    model_dir = Path(model_dir)
    if weights == "original":
        return model_dir
    groups = (group_size or DEFAULT_GROUP_SIZE) if weights == "int4" else 0
    if is_repacked(model_dir):
        manifest = load_manifest(model_dir)
        if (manifest.format, manifest.group_size) == (weights, groups):
            return model_dir
        raise CheckpointError(
            model_dir,
            f"is already repacked as {_variant(manifest.format, manifest.group_size)}; weights = "
            f"{_variant(weights, groups)} needs the original checkpoint",
        )
    name = f"{model_dir.name}-{hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:12]}"
    copy = (cache_dir or default_cache_dir()) / "repacked" / name / _variant(weights, groups)
    with _locked(copy.with_name(copy.name + ".lock")):
        if is_repacked(copy) and _same_source(load_manifest(copy), model_dir):
            return copy
        if copy.exists():
            shutil.rmtree(copy)
        print(f"repacking {model_dir} as {_variant(weights, groups)} into {copy}", file=sys.stderr)
        repack(model_dir, copy, weights, groups or DEFAULT_GROUP_SIZE)
    return copy


def source_dir(model_dir: str | Path) -> Path | None:
    """The checkpoint a repacked ``model_dir`` was made from, if it is still there unchanged; else None."""
    manifest = load_manifest(model_dir)
    path = manifest.source.get("path")
    if path is None or not (Path(path) / "config.json").is_file():
        return None
    return Path(path) if _same_source(manifest, Path(path)) else None


def _same_source(manifest: RepackManifest, model_dir: Path) -> bool:
    sizes = {p.name: p.stat().st_size for p in sorted(model_dir.glob("*.safetensors"))}
    return manifest.source.get("weight_files") == sizes and manifest.source.get("config_sha256") == config_sha256(
        model_dir
    )


def _variant(format: str, group_size: int) -> str:
    return f"{format}-g{group_size}" if format == "int4" else format


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
