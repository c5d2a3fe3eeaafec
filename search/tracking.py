"""Every trial in MLflow: one experiment per experiment file, one parent run per study, one nested run per trial.

The store is a local SQLite file by default (``runs/mlflow.db``, artifacts beside it in ``runs/artifacts``,
addressed relative to the folder: ``search.runs_folder``); any tracking URI works. A nested run holds the trial's
config as parameters (``trials.run_params``: engine values, byte counts also readable, the search's encoding as
``search.<param>``), each repeat's figures as metric steps (``repeat_decode_tok_s`` at step 0, 1, ...), the trial's
summary figures (``decode_tok_s``, the median), its state and failure reason as tags, and its BenchResults as an
artifact. A complete trial has the metric ``feasible`` (1 or 0), so the runs table sorts and filters on it; a trial
stopped before its last repeat (pruned, or screened out by the simulator) ends KILLED, not FINISHED. The parent run
carries the study's best feasible trial: its figures as metrics, its config as ``best.<param>`` tags (tags, as a
resumed study may find another best and a run's parameters cannot change), the tuned config and the report. Runs a
killed driver left open are closed as KILLED when the study resumes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_registered_artifact_repositories

from search.errors import SearchError

# Per-repeat figures logged as steps; the same names without the prefix are the trial's summary.
REPEAT_METRICS = (
    "decode_tok_s",
    "prefill_tok_s",
    "ttft_s",
    "hit_rate",
    "bytes_read_per_token",
    "disk_bytes_per_token",
    "io_stall_frac",
    "prefetch_precision",
    "prefetch_recall",
    "memory_peak_bytes",
    "peak_rss_bytes",
    "efficiency",
)


RUNS_FOLDER_ARTIFACTS = "autoresearch-runs:/artifacts"  # a new experiment's location in the default store
STOPPED_EARLY = "KILLED"  # a trial's run status when it stopped before its last repeat: pruned, or screened out


class Tracker:
    """The MLflow side of one study."""

    def __init__(self, tracking_uri: str, experiment_name: str, location: str | None) -> None:
        """``location``: where a new experiment keeps its artifacts (None: the tracking server's default)."""
        scheme = location.split(":")[0] if location else None
        if location == RUNS_FOLDER_ARTIFACTS and scheme not in get_registered_artifact_repositories():
            raise SearchError(
                f"MLflow has not registered the {scheme} artifact repository (the entry point in pyproject.toml): "
                "reinstall the project (make .venv/.runtime)"
            )
        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment_name)
        self.experiment_id = (
            found.experiment_id if found is not None else self.client.create_experiment(experiment_name, location)
        )
        self.parent_id: str | None = None

    def start_study(self, run_id: str | None, name: str, tags: dict[str, Any], params: dict[str, Any]) -> str:
        """The study's parent run: ``run_id`` reopened if the store still has it, else a new run with ``params``
        (what identifies the study, so the same on every resume)."""
        if run_id is not None and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=_strings(tags)).info.run_id
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])
        self.parent_id = run_id
        for run in self.client.search_runs(
            [self.experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'"
        ):
            self.client.set_tag(run.info.run_id, "failure", "driver stopped: the trial had not finished")
            self.client.set_terminated(run.info.run_id, "KILLED")
        return run_id

    def start_trial(self, name: str, config: dict[str, Any], tags: dict[str, Any]) -> str:
        tags = {"mlflow.parentRunId": self.parent_id, **tags}
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=_strings(tags)).info.run_id
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(config.items())])
        return run_id

    def log_repeat(self, run_id: str, step: int, figures: dict[str, Any]) -> None:
        now = _now_ms()
        metrics = [Metric(f"repeat_{k}", float(figures[k]), now, step) for k in REPEAT_METRICS if _num(figures.get(k))]
        self.client.log_batch(run_id, metrics=metrics)

    def end_trial(
        self, run_id: str, status: str, summary: dict[str, Any], tags: dict[str, Any], artifacts: dict[str, Any]
    ) -> None:
        now = _now_ms()
        metrics = [Metric(k, float(v), now, 0) for k, v in summary.items() if _num(v)]
        self.client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in _strings(tags).items()])
        for name, data in artifacts.items():
            self.client.log_dict(run_id, data, name)
        self.client.set_terminated(run_id, status)

    def log_metrics(self, run_id: str, metrics: dict[str, Any]) -> None:
        now = _now_ms()
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if _num(v)])

    def log_study_artifacts(self, files: list[Path]) -> None:
        for path in files:
            self.client.log_artifact(self.parent_id, str(path))

    def log_best(self, trial: int | None, params: dict[str, Any], metrics: dict[str, Any]) -> None:
        """The study's best feasible trial on the parent run: ``best_trial`` and its figures as metrics, its config
        as ``best.<param>`` tags; those a previous best left and this one lacks are deleted (all of them when no
        trial is feasible now: ``trial`` None)."""
        stale = [k for k in self.client.get_run(self.parent_id).data.tags if k.startswith("best.")]
        tags = {f"best.{k}": v for k, v in params.items()}
        for key in stale:
            if key not in tags:
                self.client.delete_tag(self.parent_id, key)
        if trial is None:
            return
        self.log_metrics(self.parent_id, {"best_trial": trial, **metrics})
        self.client.log_batch(self.parent_id, tags=[RunTag(k, v) for k, v in _strings(tags).items()])

    def end_study(self, status: str, tags: dict[str, Any]) -> None:
        for key, value in _strings(tags).items():
            self.client.set_tag(self.parent_id, key, value)
        self.client.set_terminated(self.parent_id, status)

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.experiment_id == self.experiment_id
        except MlflowException:  # no such run in this store
            return False


def _strings(tags: dict[str, Any]) -> dict[str, str]:
    return {k: str(v)[:5000] for k, v in tags.items() if v is not None}


def _num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _now_ms() -> int:
    return int(time.time() * 1000)
