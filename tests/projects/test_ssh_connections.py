"""Shared SSH connections (ControlMaster) against a real sshd: one connection for many
commands, a private short socket folder, recovery from a dead or hung master, cleanup, and
host keys verified as strictly as without sharing."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess

import psutil
import pytest

from fowlflow.errors import RemoteError
from fowlflow.projects.config import HostSpec, SshAccess
from fowlflow.projects.runners import SshRunner
from fowlflow.projects.ssh_connections import SharedConnections
from tests.net import wait_until


def _runner(keys, sshd, shared, **access) -> SshRunner:
    access = {"known_hosts_file": str(keys.known_hosts), "connect_timeout": 5, **access}
    return SshRunner(HostSpec(sshd.address, "root", sshd.port, str(keys.identity)),
                     SshAccess(**access), shared=shared)


def _accepted(sshd) -> int:
    """Connections the sshd accepted so far (its log has one line per login)."""
    return sshd.log.read_text().count("Accepted publickey")


def _master_pid(runner: SshRunner) -> int:
    """The master's pid; a master that replaced a dead one may take a moment to listen."""
    def check() -> int | None:
        proc = subprocess.run(["ssh", *runner.options, "-O", "check", runner.host.destination],
                              capture_output=True, text=True, timeout=10)
        found = re.search(r"pid=(\d+)", proc.stderr)
        return int(found.group(1)) if found else None

    return wait_until(check, what="the ControlMaster to answer -O check", timeout=20)


def test_commands_share_one_connection_closed_at_the_end(loopback_sshd, keys):
    shared = SharedConnections()
    assert stat.S_IMODE(os.stat(shared.dir).st_mode) == 0o700
    runner = _runner(keys, loopback_sshd, shared)
    before = _accepted(loopback_sshd)
    for k in range(5):
        assert runner.run(["echo", str(k)]).stdout == f"{k}\n".encode()
    wait_until(lambda: _accepted(loopback_sshd) > before, what="the login in sshd's log")
    assert _accepted(loopback_sshd) == before + 1  # five commands, one SSH connection
    master = _master_pid(runner)
    assert master and psutil.pid_exists(master)
    sockets = os.listdir(shared.dir)
    assert len(sockets) == 1 and len(f"{shared.dir}/{sockets[0]}") < 100
    shared.close()
    wait_until(lambda: not psutil.pid_exists(master) or
               psutil.Process(master).status() == psutil.STATUS_ZOMBIE,
               what="the master to exit after close()", timeout=15)
    assert not os.path.exists(shared.dir)
    assert runner.run(["echo", "after"]).stdout == b"after\n"  # connects on its own now


def test_a_dead_or_hung_master_never_hangs_the_next_command(loopback_sshd, keys):
    with SharedConnections() as shared:
        runner = _runner(keys, loopback_sshd, shared)
        runner.run(["true"])
        os.kill(_master_pid(runner), signal.SIGKILL)  # its socket file stays behind
        assert runner.run(["echo", "again"], timeout=30).stdout == b"again\n"
        hung = _master_pid(runner)
        os.kill(hung, signal.SIGSTOP)  # accepts on the socket, never answers
        try:
            with pytest.raises(RemoteError, match="did not finish within 3 s"):
                runner.run(["true"], timeout=3)
            assert runner.run(["echo", "fresh"], timeout=30).stdout == b"fresh\n"
            assert _master_pid(runner) != hung
        finally:
            os.kill(hung, signal.SIGKILL)


def test_host_keys_are_still_verified(loopback_sshd, keys, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with SharedConnections() as shared:
        with pytest.raises(RemoteError, match="host key"):
            _runner(keys, loopback_sshd, shared, known_hosts_file=str(empty)).run(["true"])
        assert not os.listdir(shared.dir)  # no connection was kept
