"""Helpers for the backend tests: the real CLIs, run lookups, process checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
STANDIN = Path(__file__).with_name("standin")


def mlflow_cli(project: Path, backend: str, config: dict, params: dict | None = None,
               env: dict | None = None, env_manager: str = "local",
               **popen) -> subprocess.Popen:
    """Start the real ``mlflow run -b BACKEND`` (its own process group, output captured)."""
    import mlflow

    # create a fresh SQLite store's tables here first: two processes migrating one new
    # database at once (the CLI, and this test polling it) race in alembic
    mlflow.search_experiments()
    cmd = [str(BIN / "mlflow"), "run", str(project), "-b", backend, "--env-manager",
           env_manager, "-c", json.dumps(config)]
    for k, v in (params or {}).items():
        cmd += ["-P", f"{k}={v}"]
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def fowlflow(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fowlflow"), *args], capture_output=True, text=True,
                          timeout=timeout)


def only_run():
    """The single run in the tracking store (tests start from an empty store)."""
    import mlflow

    runs = mlflow.search_runs(output_format="list")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def wait_for_run(proc: subprocess.Popen | None = None, timeout: float = 240,
                 tag: str = "fowlflow.pid"):
    """Wait until this test's run exists and carries ``tag``; fail with ``proc``'s output."""
    import mlflow

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = mlflow.search_runs(output_format="list")
        if runs and tag in runs[0].data.tags:
            return runs[0]
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    output = ""
    if proc is not None:
        if proc.poll() is None:
            proc.terminate()
        out, err = proc.communicate(timeout=60)
        output = f"\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-5000:]}"
    raise AssertionError(f"no run with tag {tag} after {timeout} s{output}")


def wait_for_metric(run_id: str, key: str, min_steps: int, timeout: float = 180) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(client.get_metric_history(run_id, key)) >= min_steps:
            return
        time.sleep(0.5)
    raise AssertionError(f"run {run_id}: fewer than {min_steps} {key!r} values after "
                         f"{timeout} s")


def marked_processes(run_id: str) -> list:
    """Processes on this machine that belong to the run (the supervisor's env marker)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("FOWLFLOW_LAUNCH", "").startswith(f"{run_id}/"):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def artifact_text(run_id: str, path: str) -> str:
    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
    return Path(local).read_text()
