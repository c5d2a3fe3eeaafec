"""The study's pieces without measuring: warm starts projected into a space, resumed seeds, grids, picks,
exported TOML, and bad experiment files failing before any trial."""

from __future__ import annotations

import subprocess
import tomllib

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from engine.config import EngineConfig, toml_value
from search.experiment import SAMPLERS, ExperimentError, load_experiment
from search.export import parse_pick, pick
from search.space import load_space
from search.study import check_space, engine_recipes, enqueue_warm_start, open_study, project
from search.trials import speed_quality_front
from tests.search.conftest import AUTORESEARCH, write_experiment

CONTEXT = {"memory_budget": 1 << 30, "model_top_k": 8, "cpu_cores": 2}


def test_default_config_projects_into_the_default_space() -> None:
    space = load_space("default")
    params = project(space, EngineConfig(), CONTEXT)
    assert params["cache_policy"] == "none" and "cache_bytes" not in params
    assert params["top_k"] == 1.0 and params["compute_threads"] == 1.0 and params["io_block_bytes"] == "1MiB"
    sampled = space.sample(optuna.trial.FixedTrial(params), CONTEXT)
    assert sampled == EngineConfig(top_k=8, compute_threads=2)


def test_exported_config_round_trips_through_the_space() -> None:
    space = load_space("default")
    config = EngineConfig(weights="int4", group_size=32, cache_policy="slru", cache_bytes=300 << 20,
                          predictor="gate_lookahead", prefetch_depth=2, io_mode="direct", io_threads=8)  # fmt: skip
    params = project(space, config, CONTEXT)
    assert params["cache_bytes"] == pytest.approx(300 / 1024)
    sampled = space.sample(optuna.trial.FixedTrial(params), CONTEXT)
    assert sampled == EngineConfig(**{**config.__dict__, "top_k": 8, "compute_threads": 2})


def test_config_outside_the_space_is_skipped_with_the_reason(tmp_path, tiny_model) -> None:
    exported = tmp_path / "other.toml"
    exported.write_text('[engine]\nio_block_bytes = "8MiB"\n')
    extra = f'[budget]\ntrials = 2\n[search]\nwarm_start = ["{exported}"]\n'
    path = write_experiment(tmp_path, tiny_model, "warm", extra)
    experiment = load_experiment(path)
    study = open_study(experiment, tmp_path / "runs")
    with pytest.warns(UserWarning, match="io_block_bytes"):
        queued = enqueue_warm_start(study, experiment, CONTEXT)
    assert queued == ["default"]
    with pytest.warns(UserWarning, match="io_block_bytes"):
        assert enqueue_warm_start(study, experiment, CONTEXT) == []  # the default is queued once per study


@pytest.mark.parametrize("recipes", [True, False])
def test_engine_recipes_are_queued_beside_the_default_unless_turned_off(tmp_path, tiny_model, recipes) -> None:
    extra = f"[budget]\ntrials = 2\n[search]\nrecipes = {str(recipes).lower()}\n"
    path = write_experiment(tmp_path, tiny_model, "recipes", extra)
    (tmp_path / "small.toml").write_text(load_space("default").path.read_text())  # every knob the recipes set
    experiment = load_experiment(path)
    study = open_study(experiment, tmp_path / "runs")
    queued = enqueue_warm_start(study, experiment, CONTEXT)
    assert queued == ["default", *(engine_recipes(experiment.memory_budget) if recipes else [])]
    assert len(study.get_trials(states=(TrialState.WAITING,))) == len(queued)


def test_resumed_study_does_not_replay_its_first_proposals(tmp_path, tiny_model) -> None:
    experiment = load_experiment(write_experiment(tmp_path, tiny_model, "seeds", "[budget]\ntrials = 4\n"))
    first = open_study(experiment, tmp_path / "runs")
    proposals = []
    for _ in range(3):
        trial = first.ask()
        proposals.append(experiment.space.sample(trial, CONTEXT))
        first.tell(trial, 1.0)
    resumed = open_study(experiment, tmp_path / "runs")
    again = [experiment.space.sample(resumed.ask(), CONTEXT) for _ in range(3)]
    assert again != proposals


def test_a_resumed_study_whose_choices_changed_is_refused_by_name(tmp_path, tiny_model) -> None:
    experiment = load_experiment(write_experiment(tmp_path, tiny_model, "grown", "[budget]\ntrials = 2\n"))
    study = open_study(experiment, tmp_path / "runs")
    trial = study.ask()
    experiment.space.sample(trial, CONTEXT)
    study.tell(trial, 1.0)
    check_space(study, experiment, tmp_path / "runs")  # unchanged: resumes
    space = tmp_path / "small.toml"
    space.write_text(space.read_text().replace('["none", "lru", "slru"]', '["none", "lru", "slru", "next_use"]'))
    grown = load_experiment(tmp_path / "grown.toml")
    with pytest.raises(ExperimentError, match="new name") as e:
        check_space(open_study(grown, tmp_path / "runs"), grown, tmp_path / "runs")
    assert e.value.field == "params.cache_policy"
    with pytest.raises(ValueError, match="dynamic value space"):  # what Optuna would have said at every trial
        grown.space.sample(open_study(grown, tmp_path / "runs").ask(), CONTEXT)


def test_grid_lists_every_value(tmp_path, tiny_model) -> None:
    (tmp_path / "g.toml").write_text(
        '[params.cache_policy]\nchoices = ["none", "lru"]\n[params.io_threads]\nlow = 1\nhigh = 4\n'
        '[params.top_k]\nlow = 0.5\nhigh = 1.0\nstep = 0.25\nfraction_of = "model_top_k"\n'
    )
    assert load_space(tmp_path / "g.toml").grid() == {
        "cache_policy": ["none", "lru"], "io_threads": [1, 2, 3, 4], "top_k": [0.5, 0.75, 1.0]
    }  # fmt: skip
    path = write_experiment(tmp_path, tiny_model, "grid", '[budget]\ntrials = 2\n[search]\nsampler = "grid"\n')
    path.write_text(path.read_text().replace('"small.toml"', '"default"'))
    with pytest.raises(ExperimentError, match="step") as e:
        load_experiment(path)
    assert e.value.field == "params.top_k"


def _trial(number: int, speed: float, kl: float, top1: float) -> optuna.trial.FrozenTrial:
    summary = {"decode_tok_s": speed, "quality_kl": kl, "quality_top1": top1}
    return create_trial(
        state=TrialState.COMPLETE, values=[speed], user_attrs={"config": {"io_threads": number + 1}, "summary": summary}
    )


def test_picks() -> None:
    study = optuna.create_study(direction="maximize")
    for i, (speed, kl, top1) in enumerate([(10, 0.0, 1.0), (18, 0.01, 0.99), (20, 0.2, 0.9), (5, 0.3, 0.8)]):
        study.add_trial(_trial(i, speed, kl, top1))
    objectives = [("decode_tok_s", "maximize")]
    assert pick(study, objectives, "fastest").config.io_threads == 3
    assert pick(study, objectives, "knee").config.io_threads == 2  # most speed for the least KL
    assert pick(study, objectives, "min-quality=0.95").config.io_threads == 2
    assert pick(study, objectives, "min-quality=1.0").config.io_threads == 1
    with pytest.raises(ValueError, match="--pick"):
        parse_pick("min-quality=2")


def test_the_front_takes_kls_within_float_rounding_as_equal() -> None:
    """Two lossless trials whose KLs differ by rounding alone: the slower is not on the front, nor the knee."""
    study = optuna.create_study(direction="maximize")
    for i, (speed, kl) in enumerate([(11, 1.9201e-9), (38, 1.9208e-9), (56, 0.0017), (60, 0.2)]):
        study.add_trial(_trial(i, speed, kl, 1.0))
    front = speed_quality_front(study.trials)
    assert [t.user_attrs["config"]["io_threads"] for t in front] == [2, 3, 4]
    assert pick(study, [("decode_tok_s", "maximize")], "knee").config.io_threads == 3


def test_toml_values_parse_back() -> None:
    value = {"a": 1, "b-c": [1.5, 'x"y'], "d e": {"f": True}, "g": float("nan")}
    parsed = tomllib.loads(f"v = {toml_value(value)}")["v"]
    assert parsed["a"] == 1 and parsed["b-c"] == [1.5, 'x"y'] and parsed["d e"] == {"f": True}
    assert parsed["g"] != parsed["g"]


@pytest.mark.parametrize(
    ("experiment", "space", "key"),
    [
        ('[experiment]\nmodel = "m"\nworkload = "decode-short"\nspace = "s.toml"\nmemory_budget = "1GiB"\n'
         "[budget]\ntrials = 2\nrepeat = 3\n", "[params.io_threads]\nlow = 1\nhigh = 4\n", "budget.repeat"),
        ('[experiment]\nmodel = "m"\nworkload = "decode-short"\nspace = "s.toml"\nmemory_budget = "1GiB"\n'
         "[budget]\ntrials = 2\n", "[params.io_threads]\nlow = 4\nhigh = 4\n", "params.io_threads"),
        ('[experiment]\nmodel = "m"\nworkload = "decode-short"\nspace = "s.toml"\nmemory_budget = "1GiB"\n'
         "[budget]\ntrials = 2\n", "[params.cache_size]\nlow = 1\nhigh = 4\n", "params.cache_size"),
    ],
)  # fmt: skip
def test_bad_files_fail_before_any_trial(tmp_path, experiment, space, key) -> None:
    (tmp_path / "s.toml").write_text(space)
    (tmp_path / "bad.toml").write_text(experiment)
    runs = tmp_path / "runs"
    done = subprocess.run([AUTORESEARCH, "tune", str(tmp_path / "bad.toml"), "--runs", str(runs)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and key in done.stderr, done.stderr
    assert not runs.exists()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_proposes_configs(tmp_path, tiny_model, sampler) -> None:
    (tmp_path / "g.toml").write_text(
        '[params.cache_policy]\nchoices = ["none", "lru"]\n[params.io_threads]\nlow = 1\nhigh = 8\n'
        '[params.cache_bytes]\nlow = 0.1\nhigh = 0.5\nstep = 0.1\nfraction_of = "memory_budget"\n'
        'when = { cache_policy = ["lru"] }\n'
    )
    path = write_experiment(tmp_path, tiny_model, "s", f'[budget]\ntrials = 6\n[search]\nsampler = "{sampler}"\n')
    path.write_text(path.read_text().replace('"small.toml"', '"g.toml"'))
    experiment = load_experiment(path)
    study = open_study(experiment, tmp_path / "runs")
    for i in range(6):
        trial = study.ask()
        config = experiment.space.sample(trial, CONTEXT)
        assert 1 <= config.io_threads <= 8
        study.tell(trial, float(config.io_threads + i))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 6
