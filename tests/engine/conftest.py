from __future__ import annotations

import pytest

from engine.synth import PRESETS, synthesize


@pytest.fixture
def synth_tiny(tmp_path):
    """A tiny fp32 qwen3_moe checkpoint with a tokenizer, in one shard."""
    return synthesize(tmp_path / "tiny", PRESETS["tiny"], dtype="fp32")
