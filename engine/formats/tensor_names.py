"""Where a checkpoint keeps the decoder's tensors: its model prefix, its output head and each layer's MoE block."""

from __future__ import annotations

from engine.architectures.spec import DecoderSpec
from engine.errors import CheckpointError
from engine.formats.checkpoint import Checkpoint

# Where a checkpoint keeps the decoder's tensors, and its output head: a text model's, or a multimodal model's
# text model (Qwen3.5's, Kimi K2.5's), whose other towers the engine never reads.
MODEL_PREFIXES = {
    "model": "lm_head.weight",
    "model.language_model": "lm_head.weight",
    "language_model.model": "language_model.lm_head.weight",
}


def model_prefix(ckpt: Checkpoint) -> str:
    """The prefix of ``MODEL_PREFIXES`` under which ``ckpt`` holds its token embeddings (``model`` if none)."""
    found = [prefix for prefix in MODEL_PREFIXES if f"{prefix}.embed_tokens.weight" in ckpt.tensors]
    return found[0] if found else "model"


def moe_prefix(ckpt: Checkpoint, layer_prefix: str, spec: DecoderSpec) -> str:
    """The MoE block's name: the architecture's own, or ``mlp`` where transformers 5 saved it so."""
    for block in dict.fromkeys((spec.moe_prefix, "mlp")):
        if f"{layer_prefix}.{block}.gate.weight" in ckpt.tensors:
            return f"{layer_prefix}.{block}"
    raise CheckpointError(
        ckpt.path, "missing tensor (the MoE router)", tensor=f"{layer_prefix}.{spec.moe_prefix}.gate.weight"
    )
