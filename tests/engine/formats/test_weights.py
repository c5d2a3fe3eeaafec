"""The ``weights`` knob: repacked copies made once per source, refreshed when it changes, used by the engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine import load_model
from engine.config import EngineConfig
from engine.errors import CheckpointError, ConfigError
from engine.formats.repack_manifest import MANIFEST_FILE, load_manifest
from engine.formats.weights import source_dir, weights_dir
from engine.paths import default_cache_dir
from engine.synth import SynthShape, synthesize

SHAPE = SynthShape("qwen3_moe", 64, 2, 4, 2, 16, 8, 2, 32, 256)
PROMPT = np.arange(3, 30, 2)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return synthesize(tmp_path / "m", SHAPE, dtype="bf16")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def logits(model_dir: Path, config: EngineConfig) -> np.ndarray:
    model = load_model(model_dir, config)
    try:
        return model.decoder.forward(PROMPT, model.decoder.new_cache())
    finally:
        model.close()


def test_default_cache_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("AUTORESEARCH_CACHE")
    assert default_cache_dir() == tmp_path / "x" / "autoresearch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "autoresearch"


def test_original_weights_are_the_checkpoint_itself(model_dir: Path, cache: Path) -> None:
    assert weights_dir(model_dir, "original") == model_dir
    assert not cache.exists()


def test_a_copy_is_made_once_and_records_its_source(model_dir: Path, cache: Path) -> None:
    copy = weights_dir(model_dir, "int8")
    assert copy.is_relative_to(cache / "repacked") and copy.name == "int8"
    manifest = (copy / MANIFEST_FILE).stat().st_mtime_ns
    assert weights_dir(model_dir, "int8") == copy
    assert (copy / MANIFEST_FILE).stat().st_mtime_ns == manifest  # not written again
    assert load_manifest(copy).format == "int8"
    assert source_dir(copy) == model_dir.resolve()
    assert weights_dir(model_dir, "int4", group_size=16).name == "int4-g16"


def test_a_changed_source_is_repacked_again(model_dir: Path) -> None:
    copy = weights_dir(model_dir, "int8")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))  # same model, other bytes
    assert source_dir(copy) is None
    assert weights_dir(model_dir, "int8") == copy
    assert source_dir(copy) == model_dir.resolve()


def test_a_half_written_copy_is_written_again(model_dir: Path) -> None:
    copy = weights_dir(model_dir, "int8")
    (copy / MANIFEST_FILE).unlink()  # what a run killed mid-repack leaves
    assert weights_dir(model_dir, "int8") == copy
    assert load_manifest(copy).format == "int8"


def test_a_repacked_directory_serves_only_its_own_format(model_dir: Path) -> None:
    copy = weights_dir(model_dir, "int8")
    assert weights_dir(copy, "int8") == copy
    with pytest.raises(CheckpointError, match="already repacked as int8; weights = bf16 needs the original"):
        weights_dir(copy, "bf16")


def test_the_engine_runs_the_format_asked_for(model_dir: Path) -> None:
    original = logits(model_dir, EngineConfig())
    assert np.array_equal(logits(model_dir, EngineConfig(weights="bf16")), original)  # bf16 to bf16: lossless
    int4 = logits(model_dir, EngineConfig(weights="int4", group_size=16))
    assert not np.array_equal(int4, original)
    assert np.linalg.norm(int4 - original) < 0.2 * np.linalg.norm(original)  # near: 4 bits per weight


def test_a_group_size_int4_cannot_use_is_refused_naming_it(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="group_size"):
        load_model(model_dir, EngineConfig(weights="int4", group_size=48))


def decoded(model_dir: Path, config: EngineConfig) -> np.ndarray:
    """Logits of PROMPT fed one token at a time (decode steps)."""
    model = load_model(model_dir, config)
    try:
        cache = model.decoder.new_cache()
        return np.concatenate([model.decoder.forward(PROMPT[i : i + 1], cache) for i in range(len(PROMPT))])
    finally:
        model.close()


def test_int8_activations_change_int4_prefill_and_decode_a_little_and_alike(model_dir: Path) -> None:
    int4 = {"weights": "int4", "group_size": 32, "cache_format": "packed"}
    exact = decoded(model_dir, EngineConfig(**int4))
    rounded = decoded(model_dir, EngineConfig(**int4, activations="int8"))
    assert not np.array_equal(rounded, exact)
    assert np.linalg.norm(rounded - exact) < 0.05 * np.linalg.norm(exact)
    prefill = logits(model_dir, EngineConfig(**int4, activations="int8"))  # BLAS over the rounded activations
    np.testing.assert_allclose(prefill, rounded, rtol=0, atol=1e-4 * np.abs(rounded).max())


def test_int8_activations_on_experts_stored_otherwise_are_refused_naming_them(model_dir: Path) -> None:
    config = EngineConfig(cache_format="packed", activations="int8")
    with pytest.raises(ConfigError, match=r"activations.*int4 experts in groups of a multiple of 32.*stored as BF16"):
        load_model(model_dir, config)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"weights": "int8", "cache_format": "packed", "activations": "int8"}, "activations = int8 needs int4 experts"),
        ({"weights": "int4", "group_size": 48, "cache_format": "packed", "activations": "int8"}, "multiple of 32"),
        ({"weights": "int4", "activations": "int8"}, "needs cache_format = packed"),
        ({"activations": "int4"}, "activations must be one of float32, int8 but got 'int4'"),
        ({"weights": "q4_k"}, "weights must be one of original, fp32, bf16, fp16, int8, int4 but got 'q4_k'"),
        ({"weights": "int8", "group_size": 32}, "group_size applies only to weights = int4, not 'int8'"),
        ({"weights": "int4", "group_size": 7}, "group_size must be even"),
        ({"weights": "int4", "group_size": 0}, "group_size must be an integer of at least 2"),
    ],
)
def test_bad_weights_settings_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_dict(values, "engine.toml")


def test_copies_of_two_checkpoints_do_not_collide(model_dir: Path, tmp_path: Path) -> None:
    other = shutil.copytree(model_dir, tmp_path / "elsewhere" / model_dir.name)
    assert weights_dir(model_dir, "int8") != weights_dir(other, "int8")
