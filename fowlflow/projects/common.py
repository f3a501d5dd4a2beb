"""Steps both backends share: render the entry point, create and tag the run, hand back.

The order is MLflow's own (``mlflow/projects/backend/local.py``): fetch and validate the
project, create the run on the client, launch, return a ``SubmittedRun``. What differs is
blocking (DESIGN convention 4), done by :func:`finish_submit`::

    project, work_dir, command = fetch_command(uri, "main", params, None, None)
    run = create_run(None, uri, experiment_id, work_dir, None, "main", params)
    ...launch...
    return finish_submit(SupervisedRun(run.info.run_id, nodes), wait=True, synchronous=False)
"""

from __future__ import annotations

import json
import logging
import os
import time

from fowlflow.errors import RemoteError
from fowlflow.projects.submitted import Node, RunState, SupervisedRun

_logger = logging.getLogger(__name__)
TAG_PREFIX = "fowlflow."
LAUNCH_TAG = "fowlflow.launch"  # JSON: everything `fowlflow attach|cancel` needs


def console_logging() -> None:
    """Show fowlflow's INFO messages under ``mlflow run`` (MLflow only configures its own)."""
    logger = logging.getLogger("fowlflow")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%Y/%m/%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def fetch_command(project_uri, entry_point, params, version, storage_dir):
    """Fetch and validate the project; render the entry point command (MLflow's quoting)."""
    from mlflow.projects.utils import (fetch_and_validate_project, get_entry_point_command,
                                       load_project)

    work_dir = fetch_and_validate_project(project_uri, version, entry_point, params)
    project = load_project(work_dir)
    command = get_entry_point_command(project, entry_point, params or {}, storage_dir)[0]
    return project, work_dir, command


def create_run(run_id, project_uri, experiment_id, work_dir, version, entry_point, params):
    """Create the run client-side (tags: source, git commit, entry point; params logged)."""
    from mlflow.projects.utils import get_or_create_run

    return get_or_create_run(run_id, project_uri, experiment_id, work_dir, version,
                             entry_point, params or {})


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


def set_tags(run_id: str, tags: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, TAG_PREFIX + key, value)


def write_env_file(runner, node: Node, env: dict) -> None:
    """Write the node's environment (credentials included) to a 0600 file via stdin.

    The values travel over the SSH channel's stdin, never on a command line, so they don't
    show in ``ps`` on either machine. The supervisor reads and deletes the file.
    """
    path = f"{node.run_dir}/{node.name}.env.json"
    runner.run(["sh", "-c", 'umask 077 && mkdir -p "$1" && cat > "$2"', "sh", node.run_dir,
                path], input=json.dumps(env).encode(), timeout=60)


def wait_started(runner, node: Node, timeout: float = 60) -> None:
    """Wait until the supervisor has recorded its pid (or already ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = runner.run(node.sup("status"), timeout=60).stdout
        if RunState(json.loads(out)["state"]) not in (RunState.STARTING, RunState.UNKNOWN):
            return
        time.sleep(0.2)
    raise RemoteError(f"the supervisor on {runner.name} did not start within {timeout} s; "
                      f"see {node.log_path}")


def fail_run(run_id: str, exc: BaseException) -> None:
    """A launch step failed after the run was created: the run must not stay RUNNING."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient()
        client.set_tag(run_id, TAG_PREFIX + "error", f"{type(exc).__name__}: {exc}"[:4000])
        if client.get_run(run_id).info.status not in ("FINISHED", "FAILED", "KILLED"):
            client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt)
                                  else "FAILED")
    except Exception:  # report the original error, not the tracking server's
        _logger.exception("could not mark run %s as failed", run_id)


def finish_submit(submitted: SupervisedRun, wait: bool, synchronous: bool) -> SupervisedRun:
    """Block and stream unless told not to (``"wait": false``) or MLflow will wait itself.

    Raises:
        RemoteError: the run did not finish; carries the tail of its output. ``mlflow run``
            shows the message and exits with status 1.
    """
    run_id = submitted.run_id
    if synchronous:  # mlflow.projects.run(..., synchronous=True) calls wait() itself
        return submitted
    if not wait:
        _logger.info("=== run %s launched; follow it with `fowlflow attach %s`, stop it with "
                     "`fowlflow cancel %s` ===", run_id, run_id, run_id)
        return submitted
    if submitted.wait():
        _logger.info("=== run %s finished ===", run_id)
        return submitted
    state = submitted.get_status()
    raise RemoteError(f"run {run_id} ended {state}; the end of its output (all of it is in "
                      f"the artifact fowlflow-logs/):\n{submitted.log_tail(1500)}")
