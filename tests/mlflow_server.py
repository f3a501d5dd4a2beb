"""The tests' one way to run a real ``mlflow server`` (SQLite, artifacts served by it).

    with mlflow_server(folder) as server:               # 127.0.0.1, a free port
        MlflowClient(server.uri).search_experiments()
    # stopped: the server and every process it started (uvicorn, its job runner, huey)

``mlflow server`` starts uvicorn and MLflow's job runner as child processes, and SIGTERM to the
``mlflow`` process alone leaves them running. The server runs in a session of its own, and
stopping it signals that whole process group (only processes this test started are in it).
Job execution (MLflow's GenAI jobs, which fowlflow does not use) is off, as in the team server
``fowlflow server`` runs: without it the server is 2 processes instead of 10, each of the 8
others an interpreter that imports MLflow at every start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.conftest import BIN
from tests.net import free_port, wait_http


@dataclass
class MlflowServer:
    uri: str
    log: Path


@contextlib.contextmanager
def mlflow_server(folder: Path, host: str = "127.0.0.1", artifacts: str | None = None,
                  env: dict[str, str] | None = None) -> Iterator[MlflowServer]:
    """``mlflow server`` with its store (``mlflow.db``) and log in ``folder``; its artifacts in
    ``folder/artifacts`` unless ``artifacts`` names another destination."""
    port = free_port(host)
    log = folder / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", host, "--port", str(port),
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", artifacts or str(folder / "artifacts"),
             "--workers", "1"],
            stdout=fh, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})})
    try:
        wait_http(f"http://{host}:{port}/health", timeout=120, proc=proc, log=log)
        yield MlflowServer(f"http://{host}:{port}", log)
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM to the server's process group; SIGKILL to what is left of it after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # the group's id is the server's pid
    deadline = time.monotonic() + timeout
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        proc.poll()  # reaps the server itself once it has exited (a zombie counts as alive)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
