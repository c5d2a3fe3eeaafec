"""EngineConfig: validated, frozen, round-trips through TOML, and refuses what it does not know."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.errors import ConfigError


def test_round_trip_through_toml(tmp_path):
    config = EngineConfig(top_k=2)
    path = tmp_path / "engine.toml"
    path.write_text(config.to_toml())
    assert EngineConfig.load(path) == config
    path.write_text(EngineConfig().to_toml())
    assert EngineConfig.load(path) == EngineConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[engine]\ntop_k = 0\n", "field 'top_k': top_k must be a positive integer"),
        ("[engine]\ntop_k = 1.5\n", "field 'top_k'"),
        ("[engine]\ncache_size = 1\n", "field 'cache_size': unknown engine setting"),
        ("top_k = 2\n", "expected an [engine] table"),
        ("[engine\n", "not valid TOML"),
    ],
)
def test_bad_files_name_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "engine.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)) as error:
        EngineConfig.load(path)
    assert message in str(error.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="no such file"):
        EngineConfig.load("/nonexistent/engine.toml")


def test_top_k_above_the_models_is_refused(synth_tiny):
    from engine import load_model

    with pytest.raises(ValueError, match="top_k 3 exceeds the model's 2 active experts"):
        load_model(synth_tiny, EngineConfig(top_k=3))
