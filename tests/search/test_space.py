"""Search spaces: the default covers every knob, sampled configs are valid, a bad space fails at load naming the key."""

from __future__ import annotations

import dataclasses

import optuna
import pytest

from engine.config import CACHE_POLICIES, PREDICTORS, EngineConfig
from search.space import SpaceError, load_space

CONTEXT = {"memory_budget": 3 << 30, "model_top_k": 8, "cpu_cores": 2}


def test_default_space_covers_every_knob() -> None:
    space = load_space("default")
    assert {p.name for p in space.params} == {f.name for f in dataclasses.fields(EngineConfig)}


def test_sampled_configs_are_valid_and_respect_conditions(tmp_path) -> None:
    space = load_space("default")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(seed=1))
    seen_policies, seen_predictors = set(), set()
    for _ in range(60):
        trial = study.ask()
        config = space.sample(trial, CONTEXT)
        params = trial.params
        seen_policies.add(config.cache_policy)
        seen_predictors.add(config.predictor)
        assert ("cache_bytes" in params) == (config.cache_policy != "none")
        assert ("prefetch_depth" in params) == (config.predictor != "none")
        assert ("group_size" in params) == (config.weights == "int4")
        if config.cache_policy != "none":
            assert 0.05 * CONTEXT["memory_budget"] - 1 <= config.cache_bytes <= 0.6 * CONTEXT["memory_budget"] + 1
        assert 4 <= config.top_k <= 8 and 1 <= config.compute_threads <= 2
        study.tell(trial, 1.0)
    assert seen_policies == set(CACHE_POLICIES) and seen_predictors == set(PREDICTORS)
    assert len(optuna.load_study(study_name=study.study_name, storage=storage).trials) == 60


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("[params.cache_size]\nchoices = [1, 2]\n", "params.cache_size", "not an engine setting"),
        ("[params.io_threads]\nlow = 1\nhigh = 4\nlgo = true\n", "params.io_threads.lgo", "unknown key"),
        ("[params.io_threads]\nlow = 4\nhigh = 4\n", "params.io_threads", "empty range"),
        ("[params.io_threads]\nlow = 8\nhigh = 2\n", "params.io_threads", "empty range"),
        ("[params.io_threads]\nlow = 0\nhigh = 4\nlog = true\n", "params.io_threads.low", "log range"),
        ("[params.io_threads]\nlow = 1\n", "params.io_threads", "needs choices, or low and high"),
        ("[params.cache_policy]\nchoices = []\n", "params.cache_policy.choices", "non-empty"),
        ('[params.cache_policy]\nchoices = ["lru", "mru"]\n', "params.cache_policy", "'mru' is refused"),
        ("[params.io_threads]\nlow = 0\nhigh = 4\n", "params.io_threads", "0 is refused"),
        (
            '[params.prefetch_depth]\nlow = 1\nhigh = 2\nwhen = { predictor = ["gate_lookahead"] }\n'
            '[params.predictor]\nchoices = ["none", "gate_lookahead"]\n',
            "params.prefetch_depth.when.predictor",
            "defined above",
        ),
        (
            '[params.predictor]\nchoices = ["none"]\n[params.prefetch_depth]\nlow = 1\nhigh = 2\n'
            'when = { predictor = ["gate_lookahead"] }\n',
            "params.prefetch_depth.when.predictor",
            "not among predictor's choices",
        ),
        ("[fixed]\nio_threads = 4\n[params.io_threads]\nlow = 1\nhigh = 8\n", "params.io_threads", "both fixed"),
        ("[fixed]\nio_thread = 4\n[params.io_threads]\nlow = 1\nhigh = 8\n", "fixed.io_thread", "not an engine"),
        (
            '[params.cache_bytes]\nlow = 0.1\nhigh = 0.5\nfraction_of = "disk"\n',
            "params.cache_bytes.fraction_of",
            "one of",
        ),
        ("[search]\nx = 1\n", "search", "unknown table"),
        ("fixed = 3\n[params.io_threads]\nlow = 1\nhigh = 8\n", "fixed", "expected a table"),
        ('[params.io_block_bytes]\nlow = "lots"\nhigh = "1MiB"\n', "params.io_block_bytes.low", "byte size"),
        ("[params.io_threads]\nlow = 1\nhigh = 8\nstep = 0.5\n", "params.io_threads.step", "an integer"),
        (
            '[params.weights]\nchoices = ["original", "int4"]\n[params.group_size]\nchoices = [32, 64]\n',
            "params.group_size",
            "int4 weights only",
        ),
        (
            '[params.weights]\nchoices = ["original", "int4"]\n[params.activations]\nchoices = ["float32", "int8"]\n'
            'when = { weights = ["int4"] }\n',
            "params.activations",
            "'int8' is refused: .*needs cache_format = packed",
        ),
        ("", "params", "no parameters"),
    ],
)
def test_a_bad_space_fails_at_load_naming_the_key(tmp_path, text, key, message) -> None:
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=message) as info:
        load_space(path)
    assert info.value.field == key and str(path) in str(info.value)


def test_missing_and_malformed_files(tmp_path) -> None:
    with pytest.raises(SpaceError, match="no such search space file"):
        load_space(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[params\n")
    with pytest.raises(SpaceError, match="not valid TOML"):
        load_space(tmp_path / "bad.toml")


def test_a_fraction_with_integer_ends_is_still_a_fraction(tmp_path) -> None:
    path = tmp_path / "space.toml"
    path.write_text(
        '[params.cache_policy]\nchoices = ["lru"]\n'
        '[params.cache_bytes]\nlow = 0\nhigh = 1\nfraction_of = "memory_budget"\n'
    )
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sizes = {space.sample(study.ask(), CONTEXT).cache_bytes for _ in range(10)}
    assert len(sizes) == 10 and all(0 < size <= CONTEXT["memory_budget"] for size in sizes)
