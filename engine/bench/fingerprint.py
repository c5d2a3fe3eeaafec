"""Who measured what: the machine's fingerprint and a checkpoint's identity, recorded in every result."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from engine.bench.device import device_name
from engine.formats.checkpoint import read_json


def machine_fingerprint(directory: Path) -> dict:
    """CPU, cores, RAM, the disk holding ``directory``, OS, Python and numpy's BLAS."""
    return {
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "disk": disk_of(directory),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "blas": _blas(),
    }


def disk_of(directory: Path) -> dict:
    """The block device holding ``directory``: its name and, where sysfs tells, its model and rotational flag."""
    info: dict = {"name": device_name(directory)}
    block = Path("/sys/class/block") / info["name"]
    if block.exists():
        disk = block if (block / "queue").exists() else block.resolve().parent  # a partition's disk is its parent
        for key, file in (("model", "device/model"), ("rotational", "queue/rotational")):
            if (disk / file).exists():
                info[key] = (disk / file).read_text().strip()
    return info


def model_identity(model_dir: Path) -> dict:
    """A hash of config.json and the weight files' names and sizes (hashing GiB of weights would take minutes)."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.suffix == ".safetensors")
    sizes = {p.name: p.stat().st_size for p in files}
    config = (model_dir / "config.json").read_bytes()
    identity = {
        "path": str(model_dir.resolve()),
        "model_type": read_json(model_dir / "config.json").get("model_type"),
        "config_sha256": hashlib.sha256(config).hexdigest()[:16],
        "weight_files": sizes,
        "weight_bytes": sum(sizes.values()),
    }
    synth = model_dir / "synth.json"
    if synth.exists():
        identity["synth"] = read_json(synth)
    return identity


def engine_version() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("autoresearch")
    except PackageNotFoundError:
        package = None
    return {"package": package, "commit": _git_commit()}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if out.stdout.strip():
            return out.stdout.strip()
    return platform.processor() or platform.machine()


def _blas() -> str | None:
    try:
        config = np.show_config(mode="dicts")
    except (TypeError, ValueError):
        return None
    blas = config.get("Build Dependencies", {}).get("blas", {})
    return f"{blas.get('name')} {blas.get('version')}".strip() if blas else None


def command_line(argv: list[str] | None) -> str:
    """A report's options as given: ``argv`` when called from Python, else the process's own."""
    return " ".join(argv if argv is not None else sys.argv[1:])


def report_header(title: str, target: str, module: str, options: str, data: Path) -> str:
    """The opening of a benchmark report: what wrote it, when, and on which machine."""
    machine = machine_fingerprint(data)
    return "\n".join(
        [
            f"# {title}",
            "",
            f"Written by `make {target}` (`python -m {module} {options}`) "
            f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            "Machine: " + ", ".join(f"{k} `{v}`" for k, v in machine.items()),
        ]
    )


def write_report(out: Path, sections: list[str]) -> None:
    """A benchmark report's markdown, its sections apart by a blank line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(sections) + "\n")
    print(f"wrote {out}", file=sys.stderr)
