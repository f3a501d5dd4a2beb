"""How fowlflow reaches a host over OpenSSH: the options, and one shared connection per host.

Every ``ssh`` (commands, ``rsync -e``, tunnels) takes its options from :func:`ssh_options`.
A :class:`SharedConnections` makes the commands to one host share a single SSH connection
(OpenSSH's ControlMaster, as SkyPilot does), so a status poll costs a round trip, not a new
handshake::

    with SharedConnections() as shared:
        runner = SshRunner(HostSpec("gpu-box"), SshAccess(), shared=shared)
        runner.run(["true"])          # opens the connection (a background "master")
        runner.run(["true"])          # reuses it
    # closed here: `ssh -O exit` for every host, the socket folder removed

The control sockets live in a private (0700) folder under ``/tmp`` with a short path (a unix
socket path may have at most ~104 characters). A socket whose master died is replaced by the
next command (``ControlMaster=auto``); one whose master hangs is removed when a command through
it times out, so the next command opens a fresh connection. Host keys are checked exactly as
without sharing: the master connects with the same options.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import threading

from fowlflow.projects.config import HostSpec, SshAccess

# Seconds an idle shared connection stays open after its last command: covers the gaps
# between status polls, and bounds how long a connection outlives a client killed with -9.
CONTROL_PERSIST_S = 120


def ssh_options(host: HostSpec, access: SshAccess = SshAccess()) -> list[str]:
    """The one place SSH options are decided (ssh, rsync -e and tunnels all use it).

    BatchMode makes a missing or rejected key fail at once instead of prompting;
    ConnectTimeout and ServerAlive* bound how long an unreachable or dead host can hang us.
    """
    opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={access.connect_timeout}",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    if access.strict_host_key_checking:
        opts += ["-o", "StrictHostKeyChecking=yes"]
        if access.known_hosts_file:
            opts += ["-o", f"UserKnownHostsFile={access.known_hosts_file}"]
    else:  # explicit opt-out only; never the default
        opts += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "LogLevel=ERROR"]
    if host.port:
        opts += ["-p", str(host.port)]
    if host.identity_file:
        opts += ["-i", host.identity_file, "-o", "IdentitiesOnly=yes"]
    return opts + list(access.ssh_options)


class SharedConnections:
    """A private folder of control sockets; :meth:`close` ends every shared connection.

    Also closed at interpreter exit, so a client that returns early (``"wait": false``) or
    fails leaves no connection behind for longer than it runs.
    """

    def __init__(self, persist_s: int = CONTROL_PERSIST_S):
        base = "/tmp" if os.path.isdir("/tmp") else None  # short: $TMPDIR can be long
        self.dir = tempfile.mkdtemp(prefix="fowlflow-ssh-", dir=base)  # mode 0700
        self.persist_s = persist_s
        self._masters: dict[str, list[str]] = {}  # destination -> the ssh argv prefix
        self._lock = threading.Lock()
        self.closed = False
        atexit.register(self.close)

    @property
    def control_path(self) -> str:
        # %C: a hash of (local host, host, port, user), 40 characters whatever the names
        return f"{self.dir}/%C"

    def options(self) -> list[str]:
        return ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_path}",
                "-o", f"ControlPersist={self.persist_s}"]

    def register(self, destination: str, ssh_prefix: list[str]) -> None:
        """Remember how to reach ``destination``'s master, to close it later."""
        with self._lock:
            self._masters[destination] = list(ssh_prefix)

    def forget_socket(self, ssh_prefix: list[str], destination: str) -> None:
        """Remove the socket of a master that did not answer, so the next command opens a
        new connection instead of waiting on it."""
        proc = subprocess.run([*ssh_prefix, "-G", destination], capture_output=True, text=True,
                              timeout=10)
        for line in proc.stdout.splitlines():
            key, _, value = line.partition(" ")
            if key == "controlpath" and value.startswith(self.dir + "/"):
                try:
                    os.unlink(value)
                except OSError:
                    pass

    def close(self) -> None:
        """``ssh -O exit`` every master (bounded wait), then remove the folder."""
        with self._lock:
            masters, self._masters = self._masters, {}
            self.closed = True
        for destination, prefix in masters.items():
            try:
                subprocess.run([*prefix, "-O", "exit", destination], capture_output=True,
                               timeout=10)
            except subprocess.TimeoutExpired:  # a hung master: its socket goes with the folder
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.close)

    def __enter__(self) -> SharedConnections:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
