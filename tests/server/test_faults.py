"""Faults while a run is logging: restart mlflow server, restart PostgreSQL, lose S3; and a
main process killed with kill -9, whose leftovers `start` and `stop` must clean.

The client is a separate process (``metric_logger.py``) with the retry settings documented in
docs/deployment.md: up to 10 retries with backoff factor 1 (waits of 0, 2, 4, ... 120 s; about
8 minutes in all), which covers a server or database restart. Each test checks the metrics in
PostgreSQL itself, not only through the API.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.net import wait_until
from tests.server.conftest import admin_login, client_env, fowlflow

LOGGER = Path(__file__).with_name("metric_logger.py")
RESILIENT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


class Client:
    """A metric_logger.py process whose output lines can be awaited."""

    def __init__(self, stack, *args: str, extra_env: dict | None = None):
        env = {**os.environ, **client_env(stack), **(extra_env or {})}
        self.proc = subprocess.Popen([sys.executable, str(LOGGER), *args], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._pumps = [threading.Thread(target=self._pump_out, daemon=True),
                       threading.Thread(target=self._pump_err, daemon=True)]
        for t in self._pumps:
            t.start()
        self.run_id = self.wait_for("RUN ").split()[1]

    def _pump_out(self):
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line.strip())
        self.lines.put("<EOF>")

    def _pump_err(self):
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line
            if line == "<EOF>":
                break
        raise AssertionError(f"client never printed {prefix!r}; stderr:\n{self.finish(10)[1]}")

    def send(self, line: str = "go") -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        """Wait for the exit; return (exit code, stderr)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for t in self._pumps:
            t.join(timeout=10)
        return self.proc.returncode, "".join(self.stderr)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _metric_counts(stack, run_id: str) -> dict[str, int]:
    with stack.postgres.connect() as conn:
        rows = conn.execute("SELECT key, count(*) FROM metrics WHERE run_uuid = %s GROUP BY key",
                            (run_id,)).fetchall()
    return dict(rows)


def _run_status(stack, run_id: str) -> str:
    with stack.postgres.connect() as conn:
        return conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()[0]


@pytest.mark.parametrize("component,downtime", [("mlflow", 0.0), ("postgres", 3.0)])
def test_restart_while_logging_loses_no_metric(stack, component, downtime):
    steps = 80
    client = Client(stack, f"fault-{component}", str(steps), "--interval", "0.05",
                    extra_env=RESILIENT)
    try:
        client.wait_for("STEP 15")
        t0 = time.monotonic()
        stack.stop_component(component)
        time.sleep(downtime)  # the outage itself: this long with the component down
        stack.start_component(component)
        outage = time.monotonic() - t0
        code, err = client.finish()
    finally:
        client.kill()
    assert code == 0, err[-3000:]
    steps_seen = [line for line in client.stdout if line.startswith("STEP ")]
    assert len(steps_seen) == steps
    assert _metric_counts(stack, client.run_id) == {"loss": steps, "acc": steps}
    assert _run_status(stack, client.run_id) == "FINISHED"
    print(f"{component} outage {outage:.1f}s survived")


def test_s3_down_during_upload_fails_the_run_then_retry_succeeds(stack, tmp_path):
    files = tmp_path / "out"
    files.mkdir()
    for i in range(3):
        (files / f"part{i}.bin").write_bytes(os.urandom(256 * 1024))
    # Few retries: the client must fail within a minute, not wait out a long outage.
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    client = Client(stack, "fault-s3", "5", "--artifacts", str(files), "--wait-before-upload",
                    extra_env=quick)
    try:
        client.wait_for("UPLOADED part0.bin")
        client.wait_for("READY")
        stack.stop_component("s3")
        client.send()
        code, err = client.finish(timeout=240)
    finally:
        client.kill()
        stack.start_component("s3")
    assert code == 1
    # A clear error: the client names the upload that failed and the server's HTTP 500 ...
    error = [line for line in err.splitlines() if line.startswith("ERROR ")]
    assert error and "artifacts/outputs/part1.bin" in error[0] and "500" in error[0], err[-2000:]
    # ... and the server's log names the cause: its S3 endpoint was unreachable.
    server_log = stack.mlflow.log_path.read_text(errors="replace")
    assert re.search(r'EndpointConnectionError: Could not connect to the endpoint URL: '
                     rf'"{re.escape(stack.cfg.s3_endpoint)}/\S+/{client.run_id}/'
                     r'artifacts/outputs/part1.bin"', server_log)
    assert _run_status(stack, client.run_id) == "FAILED"
    assert _metric_counts(stack, client.run_id) == {"loss": 5, "acc": 5}

    # S3 is back: the same job again succeeds and its artifacts read back intact.
    retry = Client(stack, "fault-s3", "5", "--artifacts", str(files))
    code, err = retry.finish()
    assert code == 0, err[-3000:]
    assert _run_status(stack, retry.run_id) == "FINISHED"
    with admin_login(stack) as client:
        got = Path(client.download_artifacts(retry.run_id, "outputs", str(tmp_path / "dl")))
    for f in files.iterdir():
        assert (got / f.name).read_bytes() == f.read_bytes()


# -- a main process killed (kill -9): its leftovers are found and cleaned ------------------
def _state(stack) -> list[str]:
    return ["--state-dir", str(stack.cfg.state_dir)]


def _status_line(stack, component: str) -> tuple[int, str]:
    proc = fowlflow("server", "status", *_state(stack), check=False)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(component))
    return proc.returncode, line


def _kill_9(stack, component: str) -> set[int]:
    """kill -9 the recorded main process; return the pids of the part's processes before."""
    rec = stack.record(component)
    assert rec is not None, f"{component} is not running"
    before = {p.pid for p in stack._server(component).owner.processes()}
    assert rec.pid in before and len(before) >= 2, before  # main + children/log pipe
    os.kill(rec.pid, signal.SIGKILL)
    wait_until(lambda: not rec.alive(), what=f"{component}'s main process gone after kill -9",
               timeout=10, interval=0.1)
    return before


@pytest.mark.parametrize("component", ["mlflow", "s3", "postgres"])
def test_kill_9_of_a_main_process_is_recovered_by_start(stack, component):
    server = stack._server(component)
    before = _kill_9(stack, component)
    code, line = _status_line(stack, component)
    assert code == 3 and "running (pid" not in line, line
    if component == "mlflow":  # uvicorn and its workers outlive `mlflow server` ...
        assert server.healthy() and "main process gone" in line and "answering" in line, line

    fowlflow("server", "start", *_state(stack))   # ... and `start` replaces them
    rec = stack.record(component)
    now = {p.pid for p in server.owner.processes()}
    assert rec is not None and rec.pid not in before and server.healthy()
    assert not before & now, f"left over from before the kill: {before & now}"
    code, line = _status_line(stack, component)
    assert code == 0 and f"running (pid {rec.pid})" in line, line
    client = Client(stack, f"after-kill-{component}", "3", extra_env=RESILIENT)
    assert client.finish()[0] == 0


def test_stop_after_kill_9_of_every_main_process_leaves_nothing(stack):
    from fowlflow.server.procs import port_free

    for component in ("mlflow", "s3", "postgres"):
        _kill_9(stack, component)
    try:
        fowlflow("server", "stop", *_state(stack))
        left = {c: [p.pid for p in stack._server(c).owner.processes()]
                for c in ("postgres", "s3", "mlflow")}
        assert left == {"postgres": [], "s3": [], "mlflow": []}, left
        ports = [stack.cfg.ports[c] for c in ("mlflow", "postgres", "s3", "filer", "master")]
        assert all(port_free(p) for p in ports), ports
    finally:
        fowlflow("server", "start", *_state(stack))
    assert all(s.running for s in stack.status())
