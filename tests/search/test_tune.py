"""The tuning loop end to end on a tiny checkpoint: a real local Ray, a real Optuna journal, a real MLflow
SQLite store read back through MLflow's own client. One study runs once for the module; in it one trial's
measurement crashes (SIGSEGV) and one hangs (SIGSTOP) past its timeout, and the study completes anyway."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from engine.config import EngineConfig
from engine.synth import SynthShape, synthesize
from engine.units import format_bytes
from search import trials as figures
from search.experiment import load_experiment
from search.tune import TuneOptions, tune
from search.ui import FEASIBLE_FASTEST, default_tracking_uri
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
    assert {"tuned.toml", "report.md", "report.html", "history.png", "e2e.toml"} <= artifacts
    exported = tomllib.loads(outcome.tuned.read_text())
    best = study.trials[exported["provenance"]["trial"]]
    assert parent.data.metrics["best_trial"] == best.number and parent.data.metrics["feasible"] == 1
    assert parent.data.metrics["decode_tok_s"] == pytest.approx(best.values[0])
    assert parent.data.tags["best.io_mode"] == best.user_attrs["config"]["io_mode"]
    assert parent.data.params["workload"] == experiment.workload.name
    nested = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    search = {int(r.data.tags["trial"]): r for r in nested if r.data.tags["phase"] == "search"}
    assert sorted(search) == list(range(TRIALS))
    bounds = study.user_attrs["constraints"]
    for t in study.get_trials():
        run = search[t.number]
        assert run.data.params["io_mode"] == t.user_attrs["config"]["io_mode"]
        assert {f"search.{name}" for name in t.params} <= run.data.params.keys()
        if t.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED" and run.data.tags["state"] == "COMPLETE"
            history = client.get_metric_history(run.info.run_id, "repeat_decode_tok_s")
            assert sorted(m.step for m in history) == [0, 1]
            assert run.data.metrics["decode_tok_s"] == pytest.approx(t.values[0])
            assert run.data.metrics["feasible"] == figures.feasible(figures.judged(t, bounds))
        else:
            assert run.info.status == "FAILED" and run.data.tags["failure"] == t.user_attrs["failure"]
    confirm = [r for r in nested if r.data.tags["phase"] == "confirm"]
    assert len(confirm) == 2  # the default and the best trial
    for run in [*search.values(), *confirm]:  # one vocabulary: the model's own top-k and the cores as numbers
        if "top_k" in run.data.params:
            assert int(run.data.params["top_k"]) > 0 and int(run.data.params["compute_threads"]) > 0
            cache = int(run.data.params["cache_bytes"])
            assert run.data.params.get("cache_bytes_readable") == (format_bytes(cache) if cache else None)


def test_optuna_and_optuna_dashboard_read_the_same_study(tuned) -> None:
    """optuna-dashboard's own server, on the study's journal: the metric's name, each trial's feasibility and the
    best trial as Optuna and the export have them."""
    from optuna_dashboard import wsgi

    _, _, outcome, study, _ = tuned
    assert study.metric_names == ["decode_tok_s"]
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert {f"engine.{name}" for name in t.params} <= t.user_attrs.keys()
    app = wsgi(study._storage)
    detail = _get(app, f"/api/studies/{study._study_id}")
    assert detail["objective_names"] == ["decode_tok_s"]
    shown = {t["number"]: t for t in detail["trials"]}
    bounds = study.user_attrs["constraints"]
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert all(c <= 0 for c in shown[t.number]["constraints"]) == figures.feasible(figures.judged(t, bounds))
    exported = tomllib.loads(outcome.tuned.read_text())["provenance"]["trial"]
    assert [t["number"] for t in detail["best_trials"]] == [study.best_trial.number] == [exported]


def _get(app, path: str) -> dict:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "test",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
               "wsgi.errors": sys.stderr}  # fmt: skip
    status = []
    body = b"".join(app(environ, lambda code, headers, exc_info=None: status.append(code)))
    assert status[0].startswith("200"), (status, body[:500])
    return json.loads(body)


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
    html = (tmp_path / "r.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == text.count("![") > 0 and "<table>" in html


@contextlib.contextmanager
def _ui(runs: Path) -> Iterator[tuple[str, list[str], int]]:
    """``autoresearch ui`` on a free port: its address, the lines it printed once its server answered (each
    experiment's runs table, then its feasible trials fastest first) and its pid; stopped, and checked gone,
    after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen([AUTORESEARCH, "ui", "--runs", str(runs), "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert ui.stdout is not None
        printed = [ui.stdout.readline() for _ in range(4)]
        yield f"http://127.0.0.1:{port}", printed, ui.pid
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    assert not _listening(port)  # nothing of the server outlives the UI


def test_ui_serves_the_runs_on_loopback(tuned) -> None:
    """``autoresearch ui`` prints the runs table's address once its server answers; MLflow's REST API there names
    the exported trial as the best; the server runs one web worker and no job runners, and goes with the UI."""
    experiment, runs, outcome, _, _ = tuned
    with _ui(runs) as (base, printed, pid):
        table = f"{base}/#/experiments/1/runs?workflowType=machine_learning"
        assert printed[2].split() == [f"{experiment.name}:", table], printed
        assert printed[3].split() == [table + FEASIBLE_FASTEST], printed
        body = json.dumps({"experiment_ids": ["1"], "max_results": 100}).encode()
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request) as r:
            listed = json.load(r)["runs"]
        assert len(listed) == 1 + TRIALS + 2  # parent, trials, confirmation runs
        (parent,) = [r for r in listed if "mlflow.parentRunId" not in {t["key"] for t in r["data"]["tags"]}]
        metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
        assert metrics["best_trial"] == tomllib.loads(outcome.tuned.read_text())["provenance"]["trial"]
        started = _descendants(pid)
        assert not [c for c in started if "huey" in c or "jobs" in c], started  # no job runners
        assert len(started) <= 2, started  # MLflow's server and its one web worker


def test_a_moved_runs_folder_keeps_its_artifacts(tuned, tmp_path) -> None:
    """Artifacts are addressed relative to the runs folder: a copy, with the original gone, still serves every
    run's artifacts to MLflow's client and to the UI's server."""
    _, runs, outcome, study, _ = tuned
    parent, tuned_toml = study.user_attrs["mlflow_run_id"], outcome.tuned.read_text()
    moved = tmp_path / "elsewhere" / "runs"
    shutil.copytree(runs, moved)
    hidden = runs.rename(runs.with_name("hidden"))  # as if moved: nothing is left at the old place
    try:
        client = MlflowClient(default_tracking_uri(moved))
        assert Path(client.download_artifacts(parent, "tuned.toml")).read_text() == tuned_toml
        logged = 0
        for run in client.search_runs([client.get_experiment_by_name("e2e").experiment_id]):
            assert run.info.artifact_uri.startswith("autoresearch-runs:/artifacts/"), run.info.artifact_uri
            logged += bool(client.list_artifacts(run.info.run_id))
        assert logged >= 1 + (TRIALS - 2) + 2  # the parent, the complete trials, the confirmation runs
        with _ui(moved) as (base, _, _):
            with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_uuid={parent}") as r:
                assert {"tuned.toml", "report.html"} <= {f["path"] for f in json.load(r)["files"]}
            with urllib.request.urlopen(f"{base}/get-artifact?path=tuned.toml&run_uuid={parent}") as r:
                assert r.read().decode() == tuned_toml
    finally:
        hidden.rename(runs)


BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(
    BROWSER is None, reason="no Chromium here (Debian: apt-get install chromium, which make test tries)"
)
def test_a_browser_finds_the_trials_in_the_mlflow_ui(tuned) -> None:
    """Headless Chromium renders the UI at the printed address: the feasible trials, the exported one first, and
    on that trial's page its decode_tok_s."""
    _, runs, outcome, study, _ = tuned
    best = tomllib.loads(outcome.tuned.read_text())["provenance"]["trial"]
    bounds = study.user_attrs["constraints"]
    feasible = {t.number for t in study.get_trials(states=(TrialState.COMPLETE,))
                if figures.feasible(figures.judged(t, bounds))}  # fmt: skip
    with _ui(runs) as (base, printed, _):
        listed = [int(n) for n in re.findall(r"(?<!confirm )\btrial (\d+)\b", _rendered(printed[3].split()[0]))]
        assert listed[0] == best and set(listed) == feasible, listed
        run_id = study.trials[best].user_attrs["mlflow_run_id"]
        page = _rendered(f"{base}/#/experiments/1/runs/{run_id}?workflowType=machine_learning")
        assert "decode_tok_s" in page and f"trial {best}" in page


def _rendered(url: str) -> str:
    """The text of ``url`` once headless Chromium has run its scripts."""
    assert BROWSER is not None
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", "--virtual-time-budget=30000"]
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", done.stdout, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())


def _listening(port: int) -> list[str]:
    """The command lines of processes started with ``--port port``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            words = cmdline.read_text().split("\0")
            if any(a == "--port" and b == str(port) for a, b in itertools.pairwise(words)):
                found.append(" ".join(words))
    return found


def _descendants(pid: int) -> list[str]:
    """The command lines of ``pid``'s descendants (Linux's /proc)."""
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = status.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(status.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        with contextlib.suppress(OSError):
            found.append((Path("/proc") / str(child) / "cmdline").read_text().replace("\0", " "))
        todo += children.get(child, [])
    return found


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
