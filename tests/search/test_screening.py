"""The low fidelity: configs screened in the trace simulator first, only the promising ones measured; both
levels recorded and told apart in Optuna and MLflow."""

from __future__ import annotations

from mlflow import MlflowClient
from optuna.trial import TrialState

from search.experiment import load_experiment
from search.study import open_study
from search.tune import TuneOptions, tune
from tests.search.conftest import write_experiment

MEASURED = 5


def test_screening_measures_only_promising_configs(tiny_model, tmp_path) -> None:
    trace = tmp_path / "trace.npz"
    extra = (
        f"[budget]\ntrials = {MEASURED}\n[measure]\nrepeats = 1\nwarmup = 0\nconfirm = 0\n"
        '[search]\nsampler = "random"\nseed = 2\n'
        f'[fidelity]\ntrace = "{trace}"\nscreen_ratio = 0.99\nmax_screened = 8\nbandwidth = "5MB"\n'
    )
    experiment = load_experiment(write_experiment(tmp_path, tiny_model, "screen", extra))
    outcome = tune(experiment, TuneOptions(runs=tmp_path / "runs", probe=False))
    assert trace.exists()  # recorded on first use
    trials = open_study(experiment, outcome.results).get_trials()
    screened = [t for t in trials if t.user_attrs.get("fidelity") == "simulator"]
    measured = [t for t in trials if t.user_attrs.get("fidelity") != "simulator"]
    assert screened and len(screened) <= 8
    assert all(t.state == TrialState.PRUNED and t.user_attrs["simulation"]["predicted_decode_tok_s"] > 0
               for t in screened)  # fmt: skip
    assert sum(t.state == TrialState.COMPLETE for t in measured) == MEASURED
    for t in trials:  # screened: below the threshold of the best prediction before it; measured: not
        simulation = t.user_attrs.get("simulation", {})
        if "predicted_decode_tok_s" in simulation:
            below = simulation["predicted_decode_tok_s"] < 0.99 * simulation["best_before"]
            assert below == (t in screened)

    client = MlflowClient(outcome.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("screen").experiment_id])
    by_trial = {int(r.data.tags["trial"]): r for r in runs if r.data.tags.get("phase") == "search"}
    for t in screened:
        run = by_trial[t.number]
        assert run.data.tags["fidelity"] == "simulator" and run.data.tags["state"] == "SCREENED"
        assert run.data.metrics["sim_predicted_decode_tok_s"] > 0 and "decode_tok_s" not in run.data.metrics
    for t in measured:
        assert by_trial[t.number].data.tags["fidelity"] == "engine"
