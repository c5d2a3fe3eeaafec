"""MLflow's local store and the UI over it (``autoresearch ui``). Imports no MLflow: the server starts sooner
without this process importing it too (3 s here).

The server runs with what a local UI needs: one web worker and no job runners (MLflow 3 starts four workers and
a pool of job runners by default: about 2.3 GiB against 0.65). Once it answers, the address of each experiment's
runs table is printed, asked of its REST API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Appended to a runs table's address: the feasible trials only, fastest first (the table then lists nested runs flat).
FEASIBLE_FASTEST = "&searchFilter=metrics.feasible%20%3D%201&orderByKey=metrics.%60decode_tok_s%60&orderByAsc=false"


def default_tracking_uri(runs: Path) -> str:
    return f"sqlite:///{(runs / 'mlflow.db').resolve()}"


def serve(tracking_uri: str, port: int) -> int:
    """MLflow's server over ``tracking_uri`` on 127.0.0.1:``port`` until Ctrl-C or SIGTERM; its exit status."""
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, env=env, stdout=sys.stderr)  # its log apart from the addresses printed
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.terminate())
    print(f"MLflow UI starting on {base} over {tracking_uri} (Ctrl-C stops it)", flush=True)
    while server.poll() is None:
        try:
            urls = runs_table_urls(base)
        except OSError:  # not answering yet
            time.sleep(0.2)
            continue
        print("each experiment's runs, then its feasible trials fastest first:" if urls else "no experiment yet",
              flush=True)  # fmt: skip
        for name, url in urls.items():
            print(f"  {name}: {url}\n  {' ' * len(name)}  {url}{FEASIBLE_FASTEST}", flush=True)
        break
    return server.wait()


def runs_table_urls(base: str) -> dict[str, str]:
    """Each experiment's runs table in the MLflow UI served at ``base``, asked of its REST API. MLflow 3's UI opens
    an experiment on its GenAI traces unless the address asks for the machine-learning view (``workflowType``;
    the experiment's ``mlflow.experimentKind`` tag does not decide it in 3.17)."""
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/search?max_results=1000", timeout=10) as r:
        experiments = json.load(r).get("experiments", [])
    return {
        e["name"]: f"{base}/#/experiments/{e['experiment_id']}/runs?workflowType=machine_learning"
        for e in experiments
        if e["name"] != "Default"
    }
