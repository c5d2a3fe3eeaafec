"""The streaming MoE inference engine: load a checkpoint, generate, score. Knows nothing of the search.

The names below load on first use, so that importing one of the engine's modules (a command's constants, say)
does not import the whole engine.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "engine.errors",
    "EngineError": "engine.errors",
    "UnsupportedModelError": "engine.errors",
    "GenerationResult": "engine.model.generate",
    "Sampler": "engine.model.generate",
    "generate": "engine.model.generate",
    "generate_steps": "engine.model.generate",
    "score": "engine.model.generate",
    "Model": "engine.model.load",
    "load_model": "engine.model.load",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
