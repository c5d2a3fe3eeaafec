"""llama.cpp for ``make bench-peer``: built once from the llama-cpp-python sdist, the checkpoint converted once.

Everything lives under one directory (``data/peer``), kept between runs:

- ``llama_cpp_python-<version>.tar.gz`` from the package index, unpacked; ``llama-bench`` and ``llama-quantize``
  built from its ``vendor/llama.cpp`` with cmake (skipped while both binaries exist);
- ``venv/``: the converter's own interpreter (it imports torch, which the engine never needs), with a CPU build
  of torch only: the install is refused before anything is downloaded if pip would pick a CUDA one;
- ``<model>-<identity>-bf16.gguf`` from ``convert_hf_to_gguf.py`` run through ``engine/bench/hf_to_gguf.py``
  (the synthetic tokenizer's pre-tokenizer is unknown to the converter's hash table, see that file), and its
  ``Q4_0`` copy from ``llama-quantize``. The identity in the name is the checkpoint's, so a regenerated
  checkpoint gets new files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.bench.fingerprint import model_identity

VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors the llama.cpp built here
PACKAGE = f"llama-cpp-python=={VERSION}"
TARGETS = ("llama-bench", "llama-quantize")
CMAKE_FLAGS = ("-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=OFF")
TOOLCHAIN = {"cmake": "cmake", "c++": "g++", "make": "make"}  # command: the Debian package that provides it
TORCH = "torch==2.13.0"
# The converter's requirements (requirements/requirements-convert_legacy_llama.txt) less torch, installed
# above, and gguf, which the converter takes from its own tree's gguf-py.
CONVERTER_PACKAGES = ("numpy~=2.2.6", "sentencepiece>=0.1.98,<0.3.0", "transformers==4.57.6", "protobuf>=4.21.0,<5.0.0")
WRAPPER = Path(__file__).with_name("hf_to_gguf.py")


@dataclass(frozen=True)
class LlamaCpp:
    """The built ``llama-bench`` and the model's GGUF files, by llama.cpp's name for their type."""

    bench: Path
    gguf: dict[str, Path]  # "bf16" and "Q4_0"


def prepare(peer: Path, model: Path) -> LlamaCpp:
    """Build llama.cpp and convert ``model`` if not done before; each step says what it does on stderr."""
    peer.mkdir(parents=True, exist_ok=True)
    tree = source_tree(peer)
    bench, quantize = build(peer, tree)
    bf16 = peer / f"{model.name}-{_identity(model)}-bf16.gguf"
    if not bf16.exists():
        convert(tree, converter_python(peer), model, bf16)
    q4 = bf16.with_name(bf16.name.replace("-bf16.gguf", "-Q4_0.gguf"))
    if not q4.exists():
        _step(f"quantizing {bf16.name} to Q4_0")
        with _partial(q4) as part:
            _run([str(quantize), str(bf16), str(part), "Q4_0", str(os.cpu_count() or 1)])
    return LlamaCpp(bench, {"bf16": bf16, "Q4_0": q4})


def source_tree(peer: Path) -> Path:
    """``vendor/llama.cpp`` of the llama-cpp-python sdist, downloaded and unpacked under ``peer`` once."""
    tree = peer / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if tree.is_dir():
        return tree
    sdist = peer / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        _step(f"downloading the {PACKAGE} sdist")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(peer)])
    _step(f"unpacking {sdist.name}")
    with tempfile.TemporaryDirectory(dir=peer) as tmp, tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")
        (Path(tmp) / f"llama_cpp_python-{VERSION}").rename(peer / f"llama_cpp_python-{VERSION}")
    return tree


def build(peer: Path, tree: Path) -> tuple[Path, Path]:
    """(llama-bench, llama-quantize), built unless both exist; one build at a time (a lock under ``peer``)."""
    binaries = tuple(tree / "build" / "bin" / target for target in TARGETS)
    with _locked(peer / "build.lock"):
        if not all(b.exists() for b in binaries):
            _install_toolchain()
            _step(f"building {' and '.join(TARGETS)} in {tree / 'build'} (about 20 minutes on 2 cores)")
            _run(["cmake", "-S", str(tree), "-B", str(tree / "build"), *CMAKE_FLAGS])
            jobs = str(os.cpu_count() or 1)
            _run(["cmake", "--build", str(tree / "build"), "-j", jobs, "--target", *TARGETS])
    return binaries[0], binaries[1]


def converter_python(peer: Path) -> Path:
    """The interpreter of ``peer/venv``, made once with a CPU torch and the converter's other requirements."""
    venv = peer / "venv"
    python = venv / "bin" / "python"
    ready = venv / ".ready"
    if ready.exists():
        return python
    _step(f"making the converter's venv {venv} ({TORCH}, CPU build)")
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(venv)])
    _refuse_cuda_torch(python)
    _run([str(python), "-m", "pip", "install", "--quiet", TORCH])
    _run([str(python), "-m", "pip", "install", "--quiet", *CONVERTER_PACKAGES])
    ready.touch()
    return python


def convert(tree: Path, python: Path, model: Path, out: Path) -> None:
    """``model`` to a bf16 GGUF at ``out`` with the tree's converter (written aside, renamed when complete)."""
    _step(f"converting {model} to {out.name} with {tree / 'convert_hf_to_gguf.py'}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "gguf-py")])}
    with _partial(out) as part:  # -P: the wrapper's folder holds profile.py, which would shadow cProfile's import
        _run([str(python), "-P", str(WRAPPER), str(tree), str(model), str(part)], env=env)


def _refuse_cuda_torch(python: Path) -> None:
    """Ask pip what ``TORCH`` would install, without installing; refuse anything but a CPU build."""
    report = subprocess.run(
        [str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", TORCH],
        capture_output=True,
        text=True,
        check=True,
    )
    chosen = {item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(report.stdout)["install"]}
    cuda = sorted(name for name in chosen if name.startswith(("nvidia-", "triton")))
    if not chosen.get("torch", "").endswith("+cpu") or cuda:
        raise SystemExit(
            f"pip would install torch {chosen.get('torch')} with {', '.join(cuda) or 'no CUDA packages'}; the "
            f"converter needs a CPU build ({TORCH}+cpu): make one reachable to pip, e.g. in its find-links"
        )


def _install_toolchain() -> None:
    missing = {command: package for command, package in TOOLCHAIN.items() if shutil.which(command) is None}
    if not missing:
        return
    _step(f"{', '.join(missing)} missing: installing {' '.join(missing.values())} with apt-get")
    _run(["apt-get", "update"])
    _run(["apt-get", "install", "-y", *missing.values()])


def _identity(model: Path) -> str:
    """A short hash of the checkpoint's identity (config, weight files' sizes, synth knobs)."""
    return hashlib.sha256(json.dumps(model_identity(model), sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _partial(out: Path) -> Iterator[Path]:
    """A path beside ``out`` to write to, renamed to ``out`` if the block completes, else removed."""
    part = out.with_name(f"{out.stem}.part{out.suffix}")
    try:
        yield part
        part.rename(out)
    finally:
        part.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _step(message: str) -> None:
    print(f"bench-peer: {message}", file=sys.stderr, flush=True)


def _run(command: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(command, check=True, env=env)
