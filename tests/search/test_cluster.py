"""A real two-node Ray cluster on this machine (``ray start --head`` and a second raylet, each node offering one
measurement slot), tuned through ``--ray-address``: the trials spread over both nodes, each trial's repeats and the
confirmation stay on the node that measured them, and the result is one study and one MLflow experiment. A driver
killed with SIGKILL leaves no measurement running, and every Ray process the test started ends with it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from search.executor import BENCH_RESOURCE, OBJECT_STORE_BYTES
from search.reaper import holding, kill_holding
from search.ui import default_tracking_uri
from tests.search.conftest import bench_children, tune_command, write_experiment

RAY = str(Path(sys.executable).parent / "ray")
EXPERIMENT = """
[budget]
trials = {trials}

[measure]
repeats = 2
warmup = 0
confirm = 1
confirm_repeats = 2

[search]
sampler = "random"
seed = 5
"""
# Ray 2.60 turns token authentication on for a head node wherever ~/.ray/auth_token exists (any local Ray instance
# writes one), but not for the nodes and drivers that join: each must be told, as the README says.
AUTH = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
NODE_IDS = "import json, ray; ray.init(address='{address}'); print(json.dumps([n['NodeID'] for n in ray.nodes()]))"


@pytest.fixture
def cluster() -> Iterator[tuple[str, list[str]]]:
    """The cluster's address and its two nodes' ids; every process it started is killed after, and checked gone."""
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay short
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = ["--num-cpus", "1", "--resources", json.dumps({BENCH_RESOURCE: 1}),
            "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats"]  # fmt: skip
    started: dict[psutil.Process, str] = {}
    try:
        _run([RAY, "start", "--head", "--port", str(port), "--temp-dir", str(folder), "--include-dashboard=false",
              *node])  # fmt: skip
        _run([RAY, "start", "--address", f"127.0.0.1:{port}", *node])
        for process in holding(folder):
            with contextlib.suppress(psutil.Error):  # a short-lived one, gone meanwhile
                started[process] = process.name()
        nodes = _run([sys.executable, "-c", NODE_IDS.format(address=f"127.0.0.1:{port}")])
        yield f"127.0.0.1:{port}", json.loads(nodes.splitlines()[-1])
    finally:
        kill_holding(folder)
    assert {"raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= set(started.values()), started
    assert not [name for p, name in started.items() if _alive(p)]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _run(command: list[str]) -> str:
    """Its output; in its own session, as ``ray start``'s processes outlive the command."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, start_new_session=True, env=AUTH)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _study(runs: Path) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(runs / "cluster" / "study.journal")))
    return optuna.load_study(study_name="cluster", storage=storage)


def test_a_two_node_cluster_measures_each_trial_on_one_node(cluster, tiny_model, tmp_path) -> None:
    address, node_ids = cluster
    assert len(node_ids) == 2
    experiment = write_experiment(tmp_path, tiny_model, "cluster", EXPERIMENT.format(trials=4))
    runs = tmp_path / "runs"
    done = subprocess.run([*tune_command(experiment, runs), "--ray-address", address],
                          capture_output=True, text=True, timeout=900, env=AUTH)  # fmt: skip
    assert done.returncode == 0, done.stderr

    study = _study(runs)
    trials = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(trials) == 4
    node_of = {t.number: t.user_attrs["node"]["id"] for t in trials}
    assert set(node_of.values()) == set(node_ids)  # spread over both nodes

    client = MlflowClient(default_tracking_uri(runs))
    assert [e.name for e in client.search_experiments()] == ["cluster", "Default"]
    (experiment_id,) = [e.experiment_id for e in client.search_experiments() if e.name == "cluster"]
    nested = [r for r in client.search_runs([experiment_id]) if "phase" in r.data.tags]
    for run in nested:
        where = {r["node"]["id"] for r in _artifact(client, run.info.run_id, "bench_results.json")}
        if run.data.tags["phase"] == "search":  # every repeat where the trial's first ran
            assert where == {node_of[int(run.data.tags["trial"])]} == {run.data.tags["node_id"]}
    confirmation = study.user_attrs["confirmation"]
    best = int(next(name for name in confirmation["entries"] if name != "default").split()[1])
    assert confirmation["node"]["id"] == node_of[best]
    confirm_runs = [r for r in nested if r.data.tags["phase"] == "confirm"]
    assert len(confirm_runs) == 2
    for run in confirm_runs:  # the default's rounds and the best trial's, all on the node that measured the best
        where = {r["node"]["id"] for r in _artifact(client, run.info.run_id, "bench_results.json")}
        assert where == {node_of[best]} == {run.data.tags["node_id"]}

    # A driver killed mid-measurement: Ray ends its tasks, and their measurement children end with them.
    experiment.write_text(experiment.read_text().replace("trials = 4", "trials = 6"))
    driver = subprocess.Popen([*tune_command(experiment, runs), "--ray-address", address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=AUTH)  # fmt: skip
    deadline = time.monotonic() + 300
    while not any(r["mode"] == "bench" for _, r in bench_children()):
        assert driver.poll() is None and time.monotonic() < deadline, "no measurement to interrupt"
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 60
    while bench_children():
        assert time.monotonic() < deadline, f"measurements outlived their driver: {bench_children()}"
        time.sleep(0.5)


def _artifact(client: MlflowClient, run_id: str, name: str) -> list[dict]:
    return json.loads(Path(client.download_artifacts(run_id, name)).read_text())
