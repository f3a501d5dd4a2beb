"""The stack as a user runs it: one command up, clients work, stop/start keeps everything."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

from pathlib import Path

import psutil
import pytest

from fowlflow.server.procs import Owner, ProcessRecord, stop
from tests.conftest import BIN
from tests.server.conftest import fowlflow


def _our_processes(stack) -> dict[str, psutil.Process]:
    procs = {}
    for name in ("postgres", "s3", "mlflow"):
        rec = stack.record(name)
        assert rec is not None, f"{name} is not running"
        procs[name] = rec.process()
    return procs


def test_status_reports_three_running_servers(stack):
    out = fowlflow("server", "status", "--state-dir", str(stack.cfg.state_dir)).stdout
    for name, proc in _our_processes(stack).items():
        assert f"running (pid {proc.pid})" in out.split(name, 1)[1].splitlines()[0]


def test_servers_listen_on_loopback_only(stack):
    """Every socket any of the three servers (and their children) listens on is 127.0.0.1."""
    listening = []
    for proc in _our_processes(stack).values():
        for p in [proc, *proc.children(recursive=True)]:
            for conn in p.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.append((p.pid, conn.laddr.ip, conn.laddr.port))
    ports = {port for _, _, port in listening}
    assert {stack.cfg.ports["mlflow"], stack.cfg.ports["s3"], stack.cfg.ports["postgres"]} <= ports
    assert {ip for _, ip, _ in listening} == {"127.0.0.1"}, listening


def test_secret_files_are_private(stack):
    secrets_dir = stack.cfg.secrets_dir
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    files = sorted(p.name for p in secrets_dir.iterdir())
    assert {"secrets.json", "admin_password", "pgpass", "auth.ini"} <= set(files)
    for p in secrets_dir.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p


def test_env_command_points_a_shell_client_at_the_server(stack):
    exports = fowlflow("server", "env", "--state-dir", str(stack.cfg.state_dir)).stdout
    assert stack.secrets.admin_password not in exports  # read from the 0600 file at eval time
    script = exports + ('\n"$PYBIN" -c "import mlflow; print(len(mlflow.search_experiments()))"')
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYBIN": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip().splitlines()[-1]) >= 1


def test_stop_then_start_keeps_runs_artifacts_and_ports(stack, admin_client, tmp_path):
    client = admin_client
    run = client.create_run(client.create_experiment("persistence"))
    client.log_param(run.info.run_id, "p", "kept")
    client.log_metric(run.info.run_id, "m", 1.5, step=3)
    (tmp_path / "note.txt").write_text("still here")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)
    old = [stack.record(name) for name in ("postgres", "s3", "mlflow")]
    ports_before = json.loads((stack.cfg.state_dir / "ports.json").read_text())

    fowlflow("server", "stop", "--state-dir", str(stack.cfg.state_dir))
    assert not any(rec.alive() for rec in old)
    status = fowlflow("server", "status", "--state-dir", str(stack.cfg.state_dir), check=False)
    assert status.returncode == 3 and "running" not in status.stdout

    fowlflow("server", "start", "--state-dir", str(stack.cfg.state_dir))
    assert json.loads((stack.cfg.state_dir / "ports.json").read_text()) == ports_before
    got = client.get_run(run.info.run_id)
    assert got.data.params["p"] == "kept" and got.data.metrics["m"] == 1.5
    path = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "dl"))
    assert open(path).read() == "still here"


def test_start_is_idempotent(stack):
    before = {n: p.pid for n, p in _our_processes(stack).items()}
    fowlflow("server", "start", "--state-dir", str(stack.cfg.state_dir))
    assert {n: p.pid for n, p in _our_processes(stack).items()} == before


def test_stop_never_signals_a_process_it_did_not_start(tmp_path):
    """Stopped: the recorded process (same pid and start time) and marked ones; not a process
    that got a recorded pid later (pid reuse), nor an unmarked one."""
    owner = Owner(str(tmp_path), "s3")
    other = subprocess.Popen(["sleep", "30"])  # unmarked; holds a "recorded" pid, reused
    marked = subprocess.Popen(["sleep", "30"], env={**os.environ, **owner.env()})
    try:
        assert [p.pid for p in owner.processes()] == [marked.pid]
        real = ProcessRecord.of(other.pid)
        stale = ProcessRecord(pid=other.pid, create_time=real.create_time - 100)
        assert stop(owner, stale, signal.SIGKILL, timeout=5) is True
        assert marked.wait(5) is not None
        time.sleep(0.2)  # nothing to wait for: a wrong SIGKILL would have landed by now
        assert other.poll() is None
        assert stop(owner, None) is False  # nothing of ours is left
        # A recorded main process without the mark (started by an older fowlflow) is stopped.
        assert stop(owner, real, signal.SIGTERM, timeout=5) is True
        assert other.wait(5) is not None
    finally:
        for p in (other, marked):
            p.kill()
            p.wait()


def test_any_shell_finds_the_server_through_its_home(stack, tmp_path):
    """`status` from another directory, no --state-dir: FOWLFLOW_SERVER_HOME names the stack."""
    env = {**os.environ, "FOWLFLOW_SERVER_HOME": str(stack.cfg.state_dir)}
    proc = subprocess.run([str(BIN / "fowlflow"), "server", "status"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"running (pid {stack.record('mlflow').pid})" in proc.stdout


def test_default_home_is_fixed_not_relative(monkeypatch, tmp_path):
    from fowlflow.server.config import default_state_dir

    monkeypatch.delenv("FOWLFLOW_SERVER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    expected = (Path("/var/lib/fowlflow/server") if os.geteuid() == 0
                else Path.home() / ".fowlflow" / "server")
    assert default_state_dir() == expected


def test_taken_port_is_reported_with_the_fix(tmp_path):
    import socket

    from fowlflow.errors import ServerError
    from fowlflow.server import Stack, StackConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        state = tmp_path / "st"
        cfg = StackConfig.load(state, pick_free=True, postgres_port=taken)
        with pytest.raises(ServerError, match=f"port {taken} for postgres.*--postgres-port") as err:
            Stack(cfg).start_component("postgres")
        assert f"(pid {os.getpid()} " in str(err.value)  # the holder: this test's process


def test_failed_start_stops_what_it_started():
    """mlflow's port is taken: start fails, naming it, after stopping PostgreSQL and S3 again."""
    import shutil
    import socket
    import tempfile
    from pathlib import Path

    from fowlflow.errors import ServerError
    from fowlflow.server import Stack, StackConfig

    state = Path(tempfile.mkdtemp(prefix="ffstack-fail-", dir="/tmp"))
    os.chmod(state, 0o711)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            stack = Stack(StackConfig.load(state, pick_free=True, mlflow_port=s.getsockname()[1]))
            started = []
            real_start = stack.start_component

            def recording_start(name):
                rec = real_start(name)
                started.append(rec)
                return rec

            stack.start_component = recording_start
            with pytest.raises(ServerError, match="port .* for mlflow .* --port"):
                stack.start()
        assert len(started) == 2  # postgres and s3 did start ...
        assert not any(rec.alive() for rec in started)  # ... and were stopped again
        assert all(v is None for v in json.loads((state / "state.json").read_text()).values())
    finally:
        Stack(StackConfig.load(state)).stop()
        shutil.rmtree(state, ignore_errors=True)


def test_the_tests_pick_new_ports_when_a_picked_one_is_taken(tmp_path):
    """``tests.net.on_free_ports`` (the stack fixtures' start) re-picks after the stack's
    "port ... is taken" error, and lets any other error through on the first attempt."""
    from fowlflow.errors import ServerError
    from fowlflow.server import StackConfig
    from tests.net import PORT_TAKEN, on_free_ports

    seen = []

    def start():
        seen.append(StackConfig.load(tmp_path).ports)
        if len(seen) == 1:
            raise ServerError(f"port 1 for postgres on 127.0.0.1 {PORT_TAKEN} (pid 2 (x))")
        return "up"

    assert on_free_ports(tmp_path, start) == "up"
    assert len(seen) == 2 and seen[0]["postgres"] != seen[1]["postgres"]
    assert StackConfig.load(tmp_path).ports == seen[1]  # the second pick is the recorded one

    def broken():
        seen.append("broken")
        raise ServerError("initdb failed")

    with pytest.raises(ServerError, match="initdb failed"):
        on_free_ports(tmp_path / "other", broken)
    assert seen.count("broken") == 1
