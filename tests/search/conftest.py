from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.synth import PRESETS, synthesize

ROOT = Path(__file__).resolve().parents[2]
AUTORESEARCH = str(Path(sys.executable).parent / "autoresearch")

# A small space: fast to measure on the tiny model, and with both a cache and a predictor to choose.
SPACE = """
[params.cache_policy]
choices = ["none", "lru", "slru"]

[params.cache_bytes]
low = 0.05
high = 0.3
fraction_of = "memory_budget"
when = { cache_policy = ["lru", "slru"] }

[params.predictor]
choices = ["none", "gate_lookahead"]

[params.io_mode]
choices = ["pread", "direct"]
"""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("model") / "tiny", PRESETS["tiny"], dtype="fp32")


def write_experiment(folder: Path, model: Path, name: str, extra: str) -> Path:
    (folder / "small.toml").write_text(SPACE)
    path = folder / f"{name}.toml"
    path.write_text(
        f'[experiment]\nmodel = "{model}"\nworkload = "decode-short"\nspace = "small.toml"\n'
        f'memory_budget = "1GiB"\n{extra}'
    )
    return path


def tune_command(experiment: Path, runs: Path) -> list[str]:
    return [AUTORESEARCH, "tune", str(experiment), "--runs", str(runs), "--no-probe"]


def bench_children() -> list[tuple[int, dict]]:
    """The benchmark's worker processes running now, with their requests."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"engine.bench.worker" not in argv:
                continue
            request = Path(argv[argv.index(b"engine.bench.worker") + 1].decode())
            found.append((int(entry.name), json.loads(request.read_text())))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or still starting
    return found


class ChildSaboteur(threading.Thread):
    """Sends ``signals[i]`` to the i-th measured (mode "bench") worker process that appears, if given."""

    def __init__(self, signals: dict[int, signal.Signals]) -> None:
        super().__init__(daemon=True)
        self.signals, self.seen, self.hit = signals, [], {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for pid, request in bench_children():
                if request["mode"] == "bench" and pid not in self.seen:
                    self.seen.append(pid)
                    index = len(self.seen) - 1
                    if index in self.signals:
                        os.kill(pid, self.signals[index])
                        self.hit[index] = request["config"]
            time.sleep(0.02)

    def stop(self) -> None:
        self.stopping.set()
        self.join()
