"""Experiment files: the quickstart loads; every bad table, key or value fails at load, naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.synth import PRESETS
from search.experiment import ExperimentError, load_experiment
from search.space import SpaceError

ROOT = Path(__file__).resolve().parents[2]
BASE = """
[experiment]
model = "data/m"
workload = "decode-short"
space = "default"
memory_budget = "2GiB"

[budget]
trials = 5
"""


def test_quickstart_loads() -> None:
    experiment = load_experiment(ROOT / "experiments" / "quickstart.toml")
    assert experiment.name == "quickstart" and experiment.synth_preset == "quickstart"
    # a real streaming problem: the checkpoint is at least twice the budget (the vocabulary the tokenizer reaches is
    # under the preset's, which only makes the checkpoint smaller)
    shape = PRESETS["quickstart"]
    assert shape.total_bytes("bf16") - 2 * shape.vocab_size * shape.hidden_size * 2 >= 2 * experiment.memory_budget
    assert experiment.objectives == (("decode_tok_s", "maximize"),) and not experiment.multi_objective
    assert experiment.constraints == {"min_quality_top1": 0.95, "max_quality_kl": 0.05}
    assert experiment.sampler == "tpe" and experiment.trial_timeout_s == 120
    assert experiment.trace is None


def test_defaults_and_pareto(tmp_path) -> None:
    path = tmp_path / "e.toml"
    path.write_text(BASE + '[objective]\nmaximize = ["decode_tok_s"]\nminimize = ["quality_kl"]\n')
    experiment = load_experiment(path)
    assert experiment.multi_objective and experiment.objectives[1] == ("quality_kl", "minimize")
    assert (experiment.sampler, experiment.seed, experiment.repeats, experiment.warmup) == ("tpe", 0, 3, 1)
    assert experiment.time_budget_s is None and experiment.trials == 5


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        ("[sweep]\nx = 1\n", "sweep", "unknown table"),
        ('[search]\nsampler = "tpe"\nseeds = 1\n', "search.seeds", "unknown key"),
        ('[search]\nsampler = "bayes"\n', "search.sampler", "must be one of"),
        ("[measure]\nrepeats = 0\n", "measure.repeats", "at least 1"),
        ('[measure]\ntimeout = "soon"\n', "measure.timeout", "duration"),
        ('[objective]\nmaximize = "speed"\n', "objective.maximize", "unknown metric"),
        ('[objective]\nmaximize = "quality_kl"\n', "objective.maximize", "better minimized"),
        (
            '[objective]\nmaximize = ["decode_tok_s"]\nminimize = ["quality_kl"]\n[search]\nsampler = "cmaes"\n',
            "search.sampler",
            "optimises one objective",
        ),
        ('[constraints]\nmin_quality_top1 = "high"\n', "constraints.min_quality_top1", "expected a number"),
        ("[constraints]\nmin_quality_top1 = 1.5\n", "constraints.min_quality_top1", "from 0.0 to 1.0"),
        ('[search]\npruner = "median"\n', "search.pruner", "must be one of"),
        ("[search]\nprune_p = 2\n", "search.prune_p", "from 0.0 to 1.0"),
        ('[search]\nrecipes = "yes"\n', "search.recipes", "must be true or false"),
        ('[search]\npruner = "wilcoxon"\n', "measure.repeats", "needs at least 5 repeats"),
        (
            '[measure]\nrepeats = 5\n[objective]\nmaximize = ["decode_tok_s", "quality_top1"]\n'
            '[search]\npruner = "wilcoxon"\n',
            "search.pruner",
            "single-objective",
        ),
        ('[objective]\nmaximize = [["decode_tok_s"]]\n', "objective.maximize", "unknown metric"),
        ('[search]\nwarm_start = ["nowhere/*.toml"]\n', "search.warm_start", "matches no file"),
        ("[search]\nwarm_start = 3\n", "search.warm_start", "list of paths"),
        ("[measure]\nconfirm_repeats = 1\n", "measure.confirm_repeats", "at least 2"),
        ("[executor]\nray_address = 5\n", "executor.ray_address", "wrong type"),
        ("[fidelity]\nscreen_ratio = 0.5\n", "fidelity.trace", "missing"),
        ('[fidelity]\ntrace = "t.npz"\nscreen_ratio = 1.5\n', "fidelity.screen_ratio", "from 0.0 to 1.0"),
        ('[fidelity]\ntrace = "t.npz"\nbandwidth = "fast"\n', "fidelity.bandwidth", "byte size"),
    ],
)
def test_bad_values_name_the_key(tmp_path, change, key, message) -> None:
    path = tmp_path / "e.toml"
    path.write_text(BASE + change)
    with pytest.raises(ExperimentError, match=message) as info:
        load_experiment(path)
    assert info.value.field == key and str(path) in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        ('workload = "decode-short"\n', 'workload = "chat"\n', "experiment.workload", "unknown workload"),
        ('memory_budget = "2GiB"\n', 'memory_budget = "lots"\n', "experiment.memory_budget", "byte size"),
        ('model = "data/m"\n', "", "experiment.model", "missing"),
        ("trials = 5\n", "", "budget", "give trials, time, or both"),
        ("trials = 5\n", "trials = 0\n", "budget.trials", "at least 1"),
        ('model = "data/m"\n', 'model = "data/m"\nsynth_preset = "huge"\n', "experiment.synth_preset", "one of"),
    ],
)
def test_missing_or_bad_settings_name_the_key(tmp_path, old, new, key, message) -> None:
    path = tmp_path / "e.toml"
    path.write_text(BASE.replace(old, new))
    with pytest.raises(ExperimentError, match=message) as info:
        load_experiment(path)
    assert info.value.field == key


def test_a_bad_space_fails_with_the_space_file(tmp_path) -> None:
    (tmp_path / "mine.toml").write_text("[params.io_threads]\nlow = 4\nhigh = 2\n")
    path = tmp_path / "e.toml"
    path.write_text(BASE.replace('space = "default"', 'space = "mine.toml"'))
    with pytest.raises(SpaceError, match="empty range") as info:
        load_experiment(path)
    assert info.value.path == str(tmp_path / "mine.toml")
    with pytest.raises(ExperimentError, match="no such experiment file"):
        load_experiment(tmp_path / "none.toml")
