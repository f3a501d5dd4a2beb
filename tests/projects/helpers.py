"""Helpers for the backend tests: the real CLIs, one test's runs in a store, process checks.

Every lookup goes through an explicit ``MlflowClient(uri)`` (:class:`Store`), never MLflow's
module-level tracking URI, so nothing leaks from one test to the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.net import wait_until

BIN = Path(sys.executable).parent
STANDIN = Path(__file__).with_name("standin")


@dataclass(frozen=True)
class Store:
    """One test's experiment in a tracking store."""

    uri: str
    experiment_id: str

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri)

    def runs(self) -> list:
        """This test's runs, newest first."""
        return self.client.search_runs([self.experiment_id],
                                       order_by=["attributes.start_time DESC"])

    def only_run(self):
        """The single run of this test."""
        runs = self.runs()
        assert len(runs) == 1, [r.info.run_id for r in runs]
        return runs[0]

    def wait_for_run(self, proc: subprocess.Popen | None = None, timeout: float = 240,
                     tag: str = "fowlflow.pid"):
        """Wait until this test's run exists and carries ``tag``; fail with ``proc``'s
        output."""
        def tagged():
            runs = self.runs()
            return runs[0] if runs and tag in runs[0].data.tags else None
        try:
            return wait_until(tagged, what=f"a run with tag {tag}", timeout=timeout,
                              interval=0.5, proc=proc)
        except AssertionError as exc:
            output = ""
            if proc is not None:
                if proc.poll() is None:
                    proc.terminate()
                out, err = proc.communicate(timeout=60)
                output = f"\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-5000:]}"
            raise AssertionError(f"{exc}{output}") from None

    def wait_for_metric(self, run_id: str, key: str, min_steps: int,
                        timeout: float = 180) -> None:
        wait_until(lambda: len(self.client.get_metric_history(run_id, key)) >= min_steps,
                   what=f"{min_steps} {key!r} values in run {run_id}", timeout=timeout,
                   interval=0.5)

    def artifact_text(self, run_id: str, path: str) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            return Path(self.client.download_artifacts(run_id, path, tmp)).read_text()


def mlflow_cli(project: Path, backend: str, config: dict, params: dict | None = None,
               env: dict | None = None, env_manager: str = "local",
               **popen) -> subprocess.Popen:
    """Start the real ``mlflow run -b BACKEND`` (its own process group, output captured).

    It logs where MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID in the environment point (the
    store fixtures set them).
    """
    cmd = [str(BIN / "mlflow"), "run", str(project), "-b", backend, "--env-manager",
           env_manager, "-c", json.dumps(config)]
    for k, v in (params or {}).items():
        cmd += ["-P", f"{k}={v}"]
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    """Wait for ``proc``; one still running after ``timeout`` s is killed and the test fails
    with what it printed (the last lines say where it hung)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s: {proc.args}\n"
                             f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-6000:]}") from None
    return proc.returncode, out, err


def fowlflow(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fowlflow"), *args], capture_output=True, text=True,
                          timeout=timeout)


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
