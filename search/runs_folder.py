"""Artifacts addressed relative to the runs folder, so a copied or moved runs/ keeps them.

MLflow's SQLite store records absolute artifact locations (``file:///.../runs/artifacts/...``), which a copy of
the folder does not follow. Runs in the default store have ``autoresearch-runs:/artifacts/<run>/artifacts``
instead: a location relative to the folder that holds the store. MLflow finds this repository through its
``mlflow.artifact_repository`` entry point (pyproject.toml), in the tune, in a user's ``MlflowClient`` and in
``autoresearch ui``'s (or ``mlflow ui``'s) server alike. Only MLflow imports it: imported before MLflow, it would
make MLflow load it again while it is half-imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from mlflow.exceptions import MlflowException
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

SQLITE = "sqlite:///"


class RunsFolderArtifactRepository(LocalArtifactRepository):
    """The local files under the store's folder that an ``autoresearch-runs:/<path>`` location names."""

    def __init__(self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> None:
        store = tracking_uri or _server_store()
        if not store.startswith(SQLITE):
            raise MlflowException(
                f"artifact location {artifact_uri!r} is relative to the folder of the SQLite store that holds "
                f"its run, and the tracking URI {store!r} is not such a store: open the runs folder's mlflow.db"
            )
        folder = Path(store.removeprefix(SQLITE).split("?")[0]).parent
        path = folder / urlparse(artifact_uri).path.lstrip("/")
        super().__init__(path.resolve().as_uri(), tracking_uri, registry_uri)


def _server_store() -> str:
    """The store of the MLflow server this runs in ("" elsewhere): the server does not pass its tracking URI to
    the repositories it makes. Imported here: MLflow loads this module while ``import mlflow`` runs, and the
    package ``mlflow.server`` imports MLflow's client (circular, and slow)."""
    from mlflow.server.constants import BACKEND_STORE_URI_ENV_VAR

    return os.environ.get(BACKEND_STORE_URI_ENV_VAR, "")
