"""Stopping a study by hand: Ctrl-C records the state (the measured trial failed as interrupted and queued
again, MLflow runs closed as KILLED, the report written) and exits 130; and the Wilcoxon pruner stops trials
that are clearly slower than the best, repeat by repeat."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from search.experiment import load_experiment
from search.study import journal, open_study
from search.tune import TuneOptions, tune
from search.ui import default_tracking_uri
from tests.search.conftest import bench_children, tune_command, write_experiment


def test_ctrl_c_stops_cleanly_and_queues_the_trial_again(tiny_model, tmp_path) -> None:
    extra = "[budget]\ntrials = 6\n[measure]\nrepeats = 1\nwarmup = 0\nconfirm = 0\n"
    experiment = write_experiment(tmp_path, tiny_model, "stop", extra)
    runs = tmp_path / "runs"
    driver = subprocess.Popen(tune_command(experiment, runs), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while True:
        assert driver.poll() is None and time.monotonic() < deadline, "no trial to interrupt"
        if (runs / "stop" / "study.journal").exists():
            study = optuna.load_study(study_name="stop", storage=journal(runs / "stop"))
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            children = [pid for pid, r in bench_children() if r["mode"] == "bench"]
            if done and children:
                break
        time.sleep(0.1)
    os.kill(children[0], signal.SIGSTOP)  # the measurement cannot finish before the stop reaches the loop
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err
    assert "interrupted" in err and "run the same command again" in err
    trials = optuna.load_study(study_name="stop", storage=journal(runs / "stop")).get_trials()
    (stopped,) = [t for t in trials if t.state == TrialState.FAIL]
    assert stopped.user_attrs["failure"] == "driver stopped: interrupted"
    (queued,) = [t for t in trials if t.state == TrialState.WAITING]
    assert queued.user_attrs["rerun_of"] == stopped.number and queued.system_attrs["fixed_params"] == stopped.params
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert (runs / "stop" / "report.md").exists()
    client = MlflowClient(default_tracking_uri(runs))
    runs_ = client.search_runs([client.get_experiment_by_name("stop").experiment_id])
    assert {r.info.status for r in runs_ if "mlflow.parentRunId" not in r.data.tags} == {"KILLED"}
    by_trial = {int(r.data.tags["trial"]): r for r in runs_ if r.data.tags.get("phase") == "search"}
    assert by_trial[stopped.number].info.status == "KILLED"
    assert not bench_children()  # the measurement did not outlive its driver


def test_wilcoxon_pruner_stops_clearly_slower_trials(tiny_model, tmp_path) -> None:
    """Every expert read with O_DIRECT, one request at a time; a cached config (an exported one, warm-started)
    is measured first and is the best: the sampler's uncached proposals lose every paired repeat and are pruned
    before their last. (The space fixes O_DIRECT, so the engine's default is skipped, with a warning.)"""
    exported = tmp_path / "cached.toml"
    exported.write_text('[engine]\nio_mode = "direct"\nio_threads = 1\ncache_policy = "lru"\ncache_bytes = "280MiB"\n')
    extra = (
        "[budget]\ntrials = 5\n[measure]\nrepeats = 5\nwarmup = 1\nconfirm = 0\n"
        f'[search]\nsampler = "random"\nseed = 4\nprune_p = 0.1\nwarm_start = ["{exported}"]\n'
    )
    path = write_experiment(tmp_path, tiny_model, "prune", extra)
    (tmp_path / "small.toml").write_text(
        '[fixed]\nio_mode = "direct"\nio_threads = 1\n'
        '[params.cache_policy]\nchoices = ["none", "lru"]\n'
        '[params.cache_bytes]\nlow = 0.25\nhigh = 0.3\nfraction_of = "memory_budget"\n'
        'when = { cache_policy = ["lru"] }\n'
    )
    experiment = load_experiment(path)
    assert experiment.pruner == "wilcoxon"
    tune(experiment, TuneOptions(runs=tmp_path / "runs", probe=False))
    trials = open_study(experiment, tmp_path / "runs" / "prune").get_trials()
    assert trials[0].user_attrs["source"] == str(exported) and trials[0].state == TrialState.COMPLETE
    uncached = [t for t in trials if t.params["cache_policy"] == "none"]
    assert uncached, [(t.number, t.state, t.params) for t in trials]
    for t in uncached:
        assert t.state == TrialState.PRUNED and len(t.intermediate_values) == 4
        assert all(v < trials[0].intermediate_values[step] for step, v in t.intermediate_values.items())
