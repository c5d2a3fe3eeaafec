"""engine/ in layers: every module imports only from its own layer or those below (function-level imports too)."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "engine"
# Bottom to top. config is the knobs' contract: it sits with streaming, the first layer that reads it.
LAYERS = (
    ("engine.errors", "engine.units", "engine.paths", "engine.numba_config", "engine.buffers"),
    ("engine.architectures",),
    ("engine.formats",),
    ("engine.compute", "engine.synth"),
    ("engine.streaming", "engine.config"),
    ("engine.model",),
    ("engine.bench",),
    ("engine.analysis",),
    ("engine.reports",),
    ("engine.cli",),
)
FACADE = "engine"  # engine/__init__.py: the public API, above everything (engine's own modules import the real ones)


def layer_of(module: str) -> int:
    for rank, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """Every engine module ``path`` imports, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "engine":
            if node.module == "engine":  # a module of engine, or a name of the facade
                found += [(_engine_member(alias.name), node.lineno) for alias in node.names]
            else:
                found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "engine"]
    return found


def _engine_member(name: str) -> str:
    is_module = (ENGINE / f"{name}.py").exists() or (ENGINE / name / "__init__.py").exists()
    return f"engine.{name}" if is_module else FACADE


def test_every_import_points_down_or_sideways():
    upward = []
    for path in sorted(ENGINE.rglob("*.py")):
        name = module_name(path)
        if name == FACADE:
            continue
        rank = layer_of(name)
        for target, line in imports(path):
            if target == FACADE or layer_of(target) > rank:
                upward.append(f"{path.relative_to(ENGINE.parent)}:{line} {name} imports {target}")
    assert not upward, "\n".join(upward)


def test_the_layers_are_the_folders():
    top_level = {module_name(p) for p in ENGINE.glob("*.py")} | {
        module_name(p / "__init__.py") for p in ENGINE.glob("*/")
    }
    top_level -= {FACADE, "engine.__pycache__"}
    named = {m for members in LAYERS for m in members}
    assert top_level == named


def test_compiled_code_is_configured_before_it_is_defined():
    """A module using numba lives in a package whose ``__init__`` imports ``numba_config`` first."""
    unconfigured = []
    for path in sorted(ENGINE.rglob("*.py")):
        uses_numba = any(name.split(".")[0] in ("numba", "llvmlite") for name in _all_imports(path))
        if uses_numba and path.parent != ENGINE:
            init = ast.parse((path.parent / "__init__.py").read_text()).body
            first = next((node for node in init if isinstance(node, ast.ImportFrom | ast.Import)), None)
            if not (
                isinstance(first, ast.ImportFrom) and first.module == "engine" and first.names[0].name == "numba_config"
            ):
                unconfigured.append(str(path.relative_to(ENGINE.parent)))
    assert not unconfigured


def _all_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names
