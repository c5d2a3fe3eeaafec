"""Where numba keeps the engine's compiled functions: one directory per version of the engine's source.

numba invalidates a cached function when its own file changes, not when a function it calls from another module
does, and the engine's compiled code calls across modules (the simulator's replay runs the expert ledger, which
runs the cache policies): after an edit or a partial update a stale caller would run against changed callees,
and crash. So the cache lives in ``__pycache__/numba-<hash of every engine source file>``, and older ones go.
Imported for this effect by ``engine/__init__.py`` before any compiled function is defined.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import numba

ENGINE = Path(__file__).parent


def source_hash(root: Path = ENGINE) -> str:
    """A hash of the names and contents of every Python file under ``root``."""
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def use_versioned_cache() -> None:
    """Point numba's cache at this source version's directory, unless ``NUMBA_CACHE_DIR`` chose one. Where the
    package is read-only, numba's per-user cache stays: an install rewrites every file, so no caller is stale."""
    if numba.config.CACHE_DIR:
        return
    root = ENGINE / "__pycache__"
    target = root / f"numba-{source_hash()}"
    try:
        target.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=target).close()
    except OSError:
        return
    for old in root.glob("numba-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    # Not exported to the environment: numba would see a NUMBA_ variable change and reload its whole configuration,
    # dropping what the engine set in it (kernels.py's CPU features).
    numba.config.CACHE_DIR = str(target)


use_versioned_cache()
