"""numba's cache per version of the engine's source: a change in any module gives a directory of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from engine.numba_config import ENGINE, source_hash


def test_the_hash_follows_every_source_file(tmp_path: Path) -> None:
    copy = tmp_path / "engine"
    shutil.copytree(ENGINE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = source_hash(copy)
    assert before == source_hash(ENGINE)
    callee = copy / "streaming" / "cache_policy.py"
    callee.write_text(callee.read_text() + "\n# changed\n")
    changed = source_hash(copy)
    assert changed != before
    (copy / "model" / "new_module.py").write_text("")
    assert source_hash(copy) not in (before, changed)


def test_compiled_functions_are_cached_in_this_source_versions_directory() -> None:
    env = {name: value for name, value in os.environ.items() if name != "NUMBA_CACHE_DIR"}  # as a user has it
    shown = "import engine.compute, numba; print(numba.config.CACHE_DIR)"
    run = subprocess.run([sys.executable, "-c", shown], env=env, capture_output=True, text=True, check=True)
    cache = run.stdout.strip()
    assert Path(cache) == ENGINE / "__pycache__" / f"numba-{source_hash()}"
    assert [path.name for path in Path(cache).parent.glob("numba-*")] == [Path(cache).name]  # older ones removed
