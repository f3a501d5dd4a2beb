"""The MLflow run of a launch, on the client: create it, tag it, end it if the launch failed.

The order is MLflow's own (``mlflow/projects/backend/local.py``): fetch and validate the
project, create the run on the client, launch, return a ``SubmittedRun``::

    sub = Submission(project_uri, "main", params, None, experiment_id, tracking_uri, keys)
    work_dir, command = fetch_command(sub)
    run_id = create_run(sub, work_dir)
    try:
        ...launch, set_tags(sub.tracking_uri, run_id, {...})...
    except BaseException as exc:
        fail_run(sub.tracking_uri, run_id, exc)     # never leaves the run RUNNING
        raise
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from fowlflow.errors import RemoteError
from fowlflow.projects.config import MlflowKeys
from fowlflow.projects.supervise import end_run_if_running

_logger = logging.getLogger(__name__)
TAG_PREFIX = "fowlflow."
PROBE_TIMEOUT_S = 5.0  # how long a tracking server may take to accept a connection


@dataclass(frozen=True)
class Submission:
    """What MLflow hands a backend's ``run()``: the project, the entry point, where to log."""

    project_uri: str
    entry_point: str
    params: dict
    version: str | None
    experiment_id: str
    tracking_uri: str
    mlflow_keys: MlflowKeys


def console_logging() -> None:
    """Show fowlflow's INFO messages under ``mlflow run`` (MLflow only configures its own)."""
    logger = logging.getLogger("fowlflow")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%Y/%m/%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def fetch_command(sub: Submission) -> tuple[str, str]:
    """Fetch and validate the project; ``(work_dir, entry point command)`` (MLflow's quoting)."""
    from mlflow.projects.utils import (fetch_and_validate_project, get_entry_point_command,
                                       load_project)

    work_dir = fetch_and_validate_project(sub.project_uri, sub.version, sub.entry_point,
                                          sub.params)
    project = load_project(work_dir)
    command = get_entry_point_command(project, sub.entry_point, sub.params or {},
                                      sub.mlflow_keys.storage_dir)[0]
    return work_dir, command


def check_tracking_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail at once when an http(s) tracking server does not accept connections (MLflow's own
    client would retry for minutes before saying anything).

    Raises:
        RemoteError: nothing answers at the URI's host and port within ``timeout`` s.
    """
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise RemoteError(f"the tracking server {uri} does not answer ({exc}); fix: start it "
                          f"(e.g. `mlflow server --port {port}`), or point MLFLOW_TRACKING_URI "
                          "at the running one") from exc


def create_run(sub: Submission, work_dir: str) -> str:
    """Create the run client-side (tags: source, git commit, entry point; params logged)."""
    from mlflow.projects.utils import get_or_create_run

    return get_or_create_run(sub.mlflow_keys.run_id, sub.project_uri, sub.experiment_id,
                             work_dir, sub.version, sub.entry_point,
                             sub.params or {}).info.run_id


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` or ``./mlruns`` made absolute: the entry point runs in the
    project folder, which need not be the folder ``mlflow run`` was started from."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if "://" not in uri and ":" not in uri and not uri.startswith(("databricks", "uc")):
        # a plain path: MLflow's file store
        return os.path.abspath(uri)
    return uri


def run_env(run_id: str, experiment_id, tracking_uri: str) -> dict:
    """What every launched process needs to log to the run (MLflow's own variable names)."""
    return {"MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": absolute_tracking_uri(tracking_uri),
            "MLFLOW_EXPERIMENT_ID": str(experiment_id)}


def set_tags(tracking_uri: str, run_id: str, tags: dict) -> None:
    """Set ``fowlflow.<key>`` tags."""
    mlflow_client = client(tracking_uri)
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, TAG_PREFIX + key, value)


def fail_run(tracking_uri: str, run_id: str, exc: BaseException) -> None:
    """A launch step failed after the run was created: record why; the run must not stay
    RUNNING (KILLED for Ctrl-C, else FAILED)."""
    try:
        mlflow_client = client(tracking_uri)
        mlflow_client.set_tag(run_id, TAG_PREFIX + "error",
                              f"{type(exc).__name__}: {exc}"[:4000])
        end_run_if_running(mlflow_client, run_id,
                           "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
    except Exception:  # report the original error, not the tracking server's
        _logger.exception("could not mark run %s as failed", run_id)
