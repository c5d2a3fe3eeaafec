"""How numba compiles and runs the engine's code; imported by each package that holds compiled code, first.

Where compiled functions are cached: one directory per version of the engine's source. numba invalidates a
cached function when its own file changes, not when a function it calls from another module does, and the
engine's compiled code calls across modules (the simulator's replay runs the expert ledger, which runs the cache
policies): after an edit or a partial update a stale caller would run against changed callees, and crash. So the
cache lives in ``__pycache__/numba-<hash of every engine source file>``, and older ones go.

The vector width: on CPUs with AVX-512, LLVM vectorises 256 bits wide by default (``prefer-256-bit``); the
engine's code is told to use the full 512 (unless ``NUMBA_CPU_FEATURES`` says otherwise), which measured 15-25%
faster on the project's Cascade Lake for the int4, int8 and bf16 kernels.

OpenMP's spinning: numba's workers busy-wait for a while after each parallel kernel before they sleep. Waking a
sleeping worker costs tens of microseconds (more on a virtual machine), paid by each of the hundred-odd kernel
calls of a decode token; spinning for 20,000 rounds (``GOMP_SPINCOUNT``, unless the environment sets it or
``OMP_WAIT_POLICY``; read when numba starts its threads) took a token of the 8 GiB bf16 checkpoint in RAM from
60-85 ms to 47-56 on 2 cores (see ``compute/kernels.py`` for what it costs BLAS).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import llvmlite.binding
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
    # dropping what the engine set in it (the CPU features below).
    numba.config.CACHE_DIR = str(target)


def prefer_512_bit_vectors() -> None:
    if numba.config.CPU_FEATURES is not None:  # NUMBA_CPU_FEATURES: the user's choice
        return
    features = llvmlite.binding.get_host_cpu_features().flatten()
    if "+avx512f" in features.split(","):
        numba.config.CPU_FEATURES = features + ",-prefer-256-bit"


use_versioned_cache()
prefer_512_bit_vectors()
