"""The streaming MoE inference engine: load a checkpoint, generate, score. Knows nothing of the search."""

from engine import compiled_cache  # noqa: F401  (first: where compiled functions are cached)
from engine.errors import CheckpointError, EngineError, UnsupportedModelError
from engine.generate import GenerationResult, Sampler, generate, generate_steps, score
from engine.model import Model, load_model

__all__ = [
    "CheckpointError",
    "EngineError",
    "GenerationResult",
    "Model",
    "Sampler",
    "UnsupportedModelError",
    "generate",
    "generate_steps",
    "load_model",
    "score",
]
