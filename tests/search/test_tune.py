"""The tuning loop end to end on a tiny checkpoint: a real local Ray, a real Optuna journal, a real MLflow
SQLite store read back through MLflow's own client. One study runs once for the module; in it one trial's
measurement crashes (SIGSEGV) and one hangs (SIGSTOP) past its timeout, and the study completes anyway."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import tomllib
import urllib.request

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from engine.config import EngineConfig
from engine.synth import SynthShape, synthesize
from search.experiment import load_experiment
from search.tracking import default_tracking_uri
from search.tune import TuneOptions, tune
from tests.search.conftest import AUTORESEARCH, ChildSaboteur, write_experiment

TRIALS = 5
CRASH, HANG = 2, 3  # the measured children to sabotage: trial 0 (the default) has repeats 0 and 1, trial 1 the 2nd
EXPERIMENT = f"""
[budget]
trials = {TRIALS}

[measure]
repeats = 2
warmup = 0
timeout = "40s"
confirm = 1
confirm_repeats = 2

[constraints]
min_quality_top1 = 0.5

[search]
sampler = "random"
seed = 3
"""


@pytest.fixture(scope="module")
def tuned(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune")
    experiment = load_experiment(write_experiment(folder, tiny_model, "e2e", EXPERIMENT))
    runs = folder / "runs"
    saboteur = ChildSaboteur({CRASH: signal.SIGSEGV, HANG: signal.SIGSTOP})
    saboteur.start()
    try:
        outcome = tune(experiment, TuneOptions(runs=runs, probe=False))
    finally:
        saboteur.stop()
    from search.study import open_study

    study = open_study(experiment, outcome.results)
    return experiment, runs, outcome, study, saboteur


def test_study_completes_with_a_crash_and_a_timeout_recorded_as_failures(tuned) -> None:
    _, _, outcome, study, saboteur = tuned
    assert not outcome.interrupted and set(saboteur.hit) == {CRASH, HANG}
    trials = study.get_trials()
    assert len(trials) == TRIALS
    failed = {t.number: t.user_attrs["failure"] for t in trials if t.state == TrialState.FAIL}
    assert len(failed) == 2, failed
    reasons = sorted(reason.split(":", 1)[0] for reason in failed.values())
    assert reasons == ["crashed", "timeout"], failed
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == TRIALS - 2
    assert trials[0].user_attrs["source"] == "default" and trials[0].state == TrialState.COMPLETE
    for t in complete:
        assert t.values[0] > 0 and t.intermediate_values.keys() == {0, 1}
        assert t.user_attrs["summary"]["quality_top1"] is not None and "quality_top1" in t.constraints


def test_mlflow_holds_the_parent_run_and_one_nested_run_per_trial(tuned) -> None:
    experiment, runs, outcome, study, _ = tuned
    assert outcome.tracking_uri == default_tracking_uri(runs) and (runs / "mlflow.db").exists()
    client = MlflowClient(outcome.tracking_uri)
    mlflow_experiment = client.get_experiment_by_name(experiment.name)
    all_runs = client.search_runs([mlflow_experiment.experiment_id])
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["machine.cores"]
    assert parent.data.tags["model.model_type"] == "qwen3_moe" and parent.data.tags["experiment_file"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"tuned.toml", "report.md", "history.png", "e2e.toml"} <= artifacts
    nested = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    search = {int(r.data.tags["trial"]): r for r in nested if r.data.tags["phase"] == "search"}
    assert sorted(search) == list(range(TRIALS))
    for t in study.get_trials():
        run = search[t.number]
        assert run.data.params["io_mode"] == t.user_attrs["config"]["io_mode"]
        if t.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED" and run.data.tags["state"] == "COMPLETE"
            history = client.get_metric_history(run.info.run_id, "repeat_decode_tok_s")
            assert sorted(m.step for m in history) == [0, 1]
            assert run.data.metrics["decode_tok_s"] == pytest.approx(t.values[0])
        else:
            assert run.info.status == "FAILED" and run.data.tags["failure"] == t.user_attrs["failure"]
    confirm = [r for r in nested if r.data.tags["phase"] == "confirm"]
    assert len(confirm) == 2  # the default and the best trial


def test_confirmation_and_export(tuned, tmp_path) -> None:
    _, runs, outcome, study, _ = tuned
    confirmation = study.user_attrs["confirmation"]["entries"]
    assert confirmation["default"]["repeats"] == 2
    (best,) = [name for name in confirmation if name != "default"]
    assert confirmation[best]["ratio"] > 0 and len(confirmation[best]["ratio_ci"]) == 2
    document = tomllib.loads(outcome.tuned.read_text())
    assert f"trial {document['provenance']['trial']}" == best
    assert document["provenance"]["confirmation"]["ratio"] == pytest.approx(confirmation[best]["ratio"])
    assert document["provenance"]["machine"]["cores"] > 0
    config = EngineConfig.load(outcome.tuned)
    assert config.to_dict() == study.trials[document["provenance"]["trial"]].user_attrs["config"]
    for pick in ("knee", "min-quality=0.5"):
        out = tmp_path / f"{pick}.toml"
        done = subprocess.run(
            [AUTORESEARCH, "export", "--experiment", "e2e", "--runs", str(runs), "--pick", pick, "-o", str(out)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        EngineConfig.load(out)
    bad = subprocess.run([AUTORESEARCH, "export", "--experiment", "e2e", "--runs", str(runs), "--pick", "slowest",
                          "-o", str(tmp_path / "x.toml")], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "--pick" in bad.stderr


def test_the_exported_config_benchmarks(tuned, tiny_model) -> None:
    _, _, outcome, _, _ = tuned
    done = subprocess.run(
        [AUTORESEARCH, "bench", "--model", str(tiny_model), "--config", str(outcome.tuned), "--repeats", "1",
         "--warmup", "0", "--memory-limit", "1GiB", "--no-probe", "--no-quality", "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["decode_tok_s"] > 0 and result["config"] == EngineConfig.load(outcome.tuned).to_dict()


def test_report_verb(tuned, tmp_path) -> None:
    _, runs, _, _, _ = tuned
    out = tmp_path / "r.md"
    done = subprocess.run([AUTORESEARCH, "report", "--experiment", "e2e", "--runs", str(runs), "--out", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "## Confirmation" in text and "timeout" in text and "crashed" in text
    assert (tmp_path / "history.png").stat().st_size > 0 and (tmp_path / "cache.png").exists()


def test_ui_serves_the_runs_on_loopback(tuned) -> None:
    experiment, runs, _, _, _ = tuned
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen([AUTORESEARCH, "ui", "--runs", str(runs), "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/experiments/get-by-name?experiment_name={experiment.name}") as r:
                    experiment_id = json.load(r)["experiment"]["experiment_id"]
                break
            except OSError:
                if time.monotonic() > deadline or ui.poll() is not None:
                    raise
                time.sleep(0.5)
        body = json.dumps({"experiment_ids": [experiment_id], "max_results": 100}).encode()
        request = urllib.request.Request(f"{base}/runs/search", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as r:
            listed = json.load(r)["runs"]
        assert len(listed) == 1 + TRIALS + 2  # parent, trials, confirmation runs
    finally:
        ui.terminate()
        ui.wait(timeout=30)


@pytest.mark.parametrize(
    ("shape", "experts"),
    [
        (SynthShape("deepseek_v3", 64, 3, 4, 4, 16, 16, 4, 32, 512, dense_layers=1, shared_experts=1), "int4"),
        (SynthShape("qwen3_5_moe", 64, 4, 4, 2, 16, 16, 4, 32, 512, shared_experts=1), "dtype"),
    ],
    ids=["kimi-k2.5-like-int4", "qwen3.5-like"],
)
def test_the_frontier_architectures_tune_as_the_others(tmp_path, shape, experts) -> None:
    """Kimi K2.5's architecture with its int4 experts, and Qwen3.5's with its recurrent layers, through the same
    loop: every trial measured, the best exported."""
    model = synthesize(tmp_path / shape.arch, shape, dtype="bf16", experts=experts)
    extra = '[budget]\ntrials = 3\n[measure]\nrepeats = 1\nwarmup = 0\nconfirm = 0\n[search]\nsampler = "random"\n'
    experiment = load_experiment(write_experiment(tmp_path, model, shape.arch, extra))
    outcome = tune(experiment, TuneOptions(runs=tmp_path / "runs", probe=False))
    from search.study import open_study

    study = open_study(experiment, outcome.results)
    assert [trial.state for trial in study.trials] == [TrialState.COMPLETE] * 3
    assert outcome.tuned is not None and outcome.tuned.exists()
