"""Every third-party module that engine/ and search/ import at load time comes with the runtime dependencies
pyproject.toml declares (or theirs), not only with the test extras: ``make run`` installs no extras."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _name(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _runtime_closure() -> set[str]:
    """The declared runtime dependencies and everything they require, extras left out."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [Requirement(r) for r in declared]
    found: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = _name(requirement.name)
        if name in found or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        found.add(name)
        todo += [Requirement(r) for r in metadata.requires(requirement.name) or []]
    return found


def _load_time_imports() -> dict[str, str]:
    """Top-level modules imported by a module-level statement, each with a file that imports it."""
    imports = {}
    for path in [*ROOT.glob("engine/**/*.py"), *ROOT.glob("search/**/*.py")]:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                imports.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return imports


def test_every_module_imported_at_load_time_is_a_runtime_dependency() -> None:
    closure, providers = _runtime_closure(), metadata.packages_distributions()
    missing = {
        module: where
        for module, where in _load_time_imports().items()
        if module not in sys.stdlib_module_names
        and module not in ("engine", "search", "__future__")
        and not {_name(d) for d in providers.get(module, [])} & closure
    }
    assert not missing, f"imported at load time but not a runtime dependency (pyproject.toml): {missing}"
