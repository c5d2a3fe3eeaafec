"""The multi-objective mode: speed against quality, the Pareto front kept by the study, confirmed and exported."""

from __future__ import annotations

import tomllib

from optuna.study import StudyDirection
from optuna.trial import TrialState

from search.experiment import load_experiment
from search.study import open_study
from search.tune import TuneOptions, tune
from tests.search.conftest import write_experiment


def test_speed_against_quality_keeps_the_pareto_front(tiny_model, tmp_path) -> None:
    extra = (
        '[objective]\nmaximize = ["decode_tok_s"]\nminimize = ["quality_kl"]\n'
        "[budget]\ntrials = 5\n[measure]\nrepeats = 1\nwarmup = 0\nconfirm = 2\nconfirm_repeats = 2\n"
        '[search]\nsampler = "nsga2"\nseed = 0\n'
    )
    path = write_experiment(tmp_path, tiny_model, "pareto", extra)
    (tmp_path / "small.toml").write_text(
        '[params.top_k]\nlow = 0.25\nhigh = 1.0\nfraction_of = "model_top_k"\n'
        '[params.cache_policy]\nchoices = ["none", "lru"]\n'
    )
    experiment = load_experiment(path)
    assert experiment.multi_objective and experiment.pruner == "none"
    outcome = tune(experiment, TuneOptions(runs=tmp_path / "runs", probe=False))
    study = open_study(experiment, outcome.results)
    assert study.directions == [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 5 and all(len(t.values) == 2 for t in complete)
    front = study.best_trials
    assert front
    for t in front:  # nobody beats a front member on both objectives
        assert not any(o.values[0] > t.values[0] and o.values[1] < t.values[1] for o in complete)
    confirmed = [name for name in study.user_attrs["confirmation"]["entries"] if name != "default"]
    assert confirmed and all(int(name.split()[1]) in {t.number for t in front} for name in confirmed)
    document = tomllib.loads(outcome.tuned.read_text())
    assert document["provenance"]["trial"] in {t.number for t in front}
    assert (outcome.results / "pareto.png").exists()
