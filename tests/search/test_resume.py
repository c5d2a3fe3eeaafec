"""A driver killed with SIGKILL mid-trial: every process of its local Ray instance ends with it, and running the
same command again continues the study, keeps every finished trial as it was, records the interrupted one as
failed and measures its config again."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import optuna
import psutil
from mlflow import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from search.ui import default_tracking_uri
from tests.search.conftest import bench_children, tune_command, write_experiment

TRIALS = 4


def _load(runs):
    storage = JournalStorage(JournalFileBackend(str(runs / "resume" / "study.journal")))
    return optuna.load_study(study_name="resume", storage=storage)


def _in_session(session: int) -> list[str]:
    """The names of the live processes in the session ``session``."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.name())
    return found


def test_killed_driver_resumes_without_losing_finished_trials(tiny_model, tmp_path) -> None:
    extra = f"[budget]\ntrials = {TRIALS}\n[measure]\nrepeats = 1\nwarmup = 0\nconfirm = 0\n[search]\nseed = 1\n"
    experiment = write_experiment(tmp_path, tiny_model, "resume", extra)
    runs = tmp_path / "runs"
    driver = subprocess.Popen(tune_command(experiment, runs), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:  # kill it while a trial after the first finished one is being measured
            assert driver.poll() is None and time.monotonic() < deadline, "no trial to interrupt"
            journal = runs / "resume" / "study.journal"
            finished = journal.exists() and [
                t for t in _load(runs).get_trials(deepcopy=False) if t.state == TrialState.COMPLETE
            ]
            if finished and any(r["mode"] == "bench" for _, r in bench_children()):
                break
            time.sleep(0.1)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        before = _load(runs).get_trials()
        deadline = time.monotonic() + 60  # its local Ray instance goes with it, agents and measurement included
        while left := _in_session(driver.pid):
            assert time.monotonic() < deadline, f"outlived their driver: {left}"
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):  # if the test failed: what the driver left
            os.killpg(driver.pid, signal.SIGKILL)
    kept = {t.number: t.values for t in before if t.state == TrialState.COMPLETE}
    (interrupted,) = [t for t in before if t.state == TrialState.RUNNING]

    done = subprocess.run(tune_command(experiment, runs), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    study = _load(runs)
    after = study.get_trials()
    for number, values in kept.items():
        assert after[number].state == TrialState.COMPLETE and after[number].values == values
    stopped = after[interrupted.number]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["failure"].startswith("driver stopped")
    rerun = [t for t in after if t.user_attrs.get("rerun_of") == interrupted.number]
    assert len(rerun) == 1 and rerun[0].params == interrupted.params and rerun[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in after) == TRIALS

    client = MlflowClient(default_tracking_uri(runs))
    runs_by_trial = {
        int(r.data.tags["trial"]): r
        for r in client.search_runs([client.get_experiment_by_name("resume").experiment_id])
        if r.data.tags.get("phase") == "search"
    }
    assert runs_by_trial[interrupted.number].info.status == "KILLED"
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs_by_trial.values()}) == 1  # the same parent run
