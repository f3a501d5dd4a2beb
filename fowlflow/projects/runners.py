"""Command runners: run an argv on this machine or on a host over OpenSSH.

:class:`Runner` is the one interface the backends, the supervisor client and the ``fowlflow``
commands use; :class:`LocalRunner` and :class:`SshRunner` are its two kinds::

    runner = SshRunner(HostSpec("gpu-box", user="alice"), SshAccess(), shared=shared)
    info = runner.probe("python3")            # {"home": ..., "gpus": [...], "rsync": true}
    runner.run(["mkdir", "-p", ".fowlflow/runs/abc"])
    runner.write_file(".fowlflow/runs/abc/x.json", b"{}")   # 0600, through stdin
    proc = runner.popen(["tail", "-f", "log"], stdout=subprocess.PIPE)

Every command is an argv list. :class:`SshRunner` turns it into the one remote shell string
with ``shlex.join`` (the only quoting step); its ssh options come from
:func:`fowlflow.projects.ssh_connections.ssh_options`.
"""

from __future__ import annotations

import abc
import json
import shlex
import shutil
import subprocess
import sys

from fowlflow.errors import RemoteError
from fowlflow.projects.config import HostSpec, SshAccess
from fowlflow.projects.ssh_connections import SharedConnections, ssh_options

# Runs with the host's python3 (stdlib only): what the backends need to know about a host.
PROBE_SOURCE = r"""
import json, os, shutil, subprocess, sys
info = {"home": os.path.expanduser("~"), "python": sys.executable,
        "python_version": "%d.%d" % sys.version_info[:2], "rsync": bool(shutil.which("rsync")),
        "hostname": os.uname().nodename, "gpus": []}
try:
    from importlib.metadata import version
    info["mlflow"] = version("mlflow")
except Exception:
    info["mlflow"] = None
if shutil.which("nvidia-smi"):
    try:
        q = ["nvidia-smi", "--query-gpu=index,name,memory.used,pci.bus_id",
             "--format=csv,noheader,nounits"]
        busy = subprocess.run(["nvidia-smi", "--query-compute-apps=gpu_bus_id",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20).stdout.split()
        for line in subprocess.run(q, capture_output=True, text=True, timeout=20
                                   ).stdout.strip().splitlines():
            idx, name, mem, bus = [p.strip() for p in line.split(",")]
            info["gpus"].append({"index": int(idx), "name": name, "memory_used_mib": int(mem),
                                 "processes": sum(b == bus for b in busy)})
    except Exception as exc:
        info["gpu_error"] = str(exc)
print(json.dumps(info))
"""
# Writes stdin to the file "$1" (folders created), readable by its owner only.
_WRITE_FILE = 'umask 077 && mkdir -p "$(dirname "$1")" && cat > "$1"'


def tail_text(text: str | bytes, n: int = 2000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-n:].strip()


class Runner(abc.ABC):
    """Runs argv lists somewhere: :meth:`run`, :meth:`popen`, :meth:`write_file`, :meth:`probe`."""

    name: str

    @abc.abstractmethod
    def command(self, argv: list[str]) -> list[str]:
        """The local argv that runs ``argv`` where this runner runs things."""

    @abc.abstractmethod
    def probe(self, python: str) -> dict:
        """What the backends need to know about the machine (see ``PROBE_SOURCE``)."""

    def run(self, argv: list[str], *, input: bytes | None = None, timeout: float | None = 60,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run to the end and capture the output.

        Raises:
            RemoteError: it did not end within ``timeout`` s, or (with ``check``) it failed;
                the message carries the end of its stderr.
        """
        try:
            proc = subprocess.run(self.command(argv), input=input, capture_output=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self._timed_out()
            raise RemoteError(f"{self.name}: {shlex.join(argv)[:200]} did not finish within "
                              f"{timeout} s") from exc
        self._check_connection(proc)
        if check and proc.returncode != 0:
            raise RemoteError(f"{self.name}: {shlex.join(argv)[:300]} failed with exit code "
                              f"{proc.returncode}:\n{tail_text(proc.stderr or proc.stdout)}")
        return proc

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start without waiting (``kwargs`` as for :class:`subprocess.Popen`)."""
        return subprocess.Popen(self.command(argv), **kwargs)

    def write_file(self, path: str, data: bytes, timeout: float = 60) -> None:
        """Write ``data`` to ``path`` (mode 0600, missing folders created 0700).

        The bytes travel through stdin, never on a command line, so secrets in them don't
        show in ``ps`` on either machine.
        """
        self.run(["sh", "-c", _WRITE_FILE, "sh", path], input=data, timeout=timeout)

    def _timed_out(self) -> None:
        """Hook: a command did not finish in time."""

    def _check_connection(self, proc: subprocess.CompletedProcess) -> None:
        """Hook: raise if the command never reached the machine."""


class LocalRunner(Runner):
    """Runs argv lists on this machine."""

    name = "local"

    def command(self, argv: list[str]) -> list[str]:
        return list(argv)

    def probe(self, python: str = sys.executable) -> dict:
        return json.loads(self.run([python, "-c", PROBE_SOURCE], timeout=60).stdout)


class SshRunner(Runner):
    """Runs argv lists on one host through the OpenSSH client (``~/.ssh/config`` applies).

    With ``shared``, every command to the host goes through one SSH connection.
    """

    def __init__(self, host: HostSpec, access: SshAccess = SshAccess(), *,
                 shared: SharedConnections | None = None):
        if shutil.which("ssh") is None:
            raise RemoteError("the ssh backend needs the OpenSSH client; install it "
                              "(apt-get install openssh-client)")
        self.host = host
        self.access = access
        self.name = host.destination
        self.shared = shared
        if shared is not None:
            shared.register(host.destination, ["ssh", *self.options])

    @property
    def options(self) -> list[str]:
        """The ssh options for this host (rsync -e uses them too). ssh takes the first value
        given for an option, so a ControlPath in the config's ssh_options wins over the shared
        one; after the shared connections were closed, commands connect on their own."""
        shared = self.shared.options() if self.shared and not self.shared.closed else []
        return ssh_options(self.host, self.access) + shared

    def command(self, argv: list[str]) -> list[str]:
        # `--` ends ssh's options; the remote side gets exactly one shell string.
        return ["ssh", *self.options, self.host.destination, "--", shlex.join(argv)]

    def _timed_out(self) -> None:
        if self.shared is not None:  # maybe a hung shared connection: don't reuse it
            self.shared.forget_socket(["ssh", *self.options], self.host.destination)

    def _check_connection(self, proc: subprocess.CompletedProcess) -> None:
        if proc.returncode == 255:
            raise RemoteError(self.explain_connect_error(tail_text(proc.stderr)))

    def explain_connect_error(self, stderr: str) -> str:
        hint = "check the host name, that sshd runs there, and your network"
        low = stderr.lower()
        if "permission denied" in low:
            hint = ("the key was rejected: check user/identity_file, that the public key is in "
                    "the host's ~/.ssh/authorized_keys, and ssh-agent")
        elif "has changed" in low or "identification has changed" in low:
            port = f"-p {self.host.port} " if self.host.port else ""
            known = f" -f {self.access.known_hosts_file}" if self.access.known_hosts_file else ""
            hint = (f"the host key of {self.host.host} CHANGED since it was saved in known_hosts "
                    "(the host was reinstalled, or something is in between): check the new key "
                    f"with the host's admin (`ssh-keyscan {port}{self.host.host}` prints it), "
                    f"then remove the old one with `ssh-keygen -R {self._known_name()}{known}` "
                    f"and connect once with `ssh {self.host.destination}` to add the new one")
        elif "host key verification failed" in low or "no matching host key" in low:
            hint = ("the host key is not in known_hosts: connect once with `ssh "
                    f"{self.host.destination}` to verify and add it, or set known_hosts_file; "
                    "\"strict_host_key_checking\": false turns verification off (not advised)")
        elif "timed out" in low:
            hint = ("no answer within connect_timeout: the host is down or unreachable from "
                    "here")
        return f"ssh to {self.name} failed: {stderr or 'exit 255'}\n  fix: {hint}"

    def _known_name(self) -> str:
        """The host as known_hosts names it (``[host]:port`` for a port other than 22)."""
        port = self.host.port
        return self.host.host if port in (None, 22) else f"'[{self.host.host}]:{port}'"

    def probe(self, python: str = "python3") -> dict:
        proc = self.run([python, "-c", PROBE_SOURCE], timeout=60, check=False)
        if proc.returncode != 0:
            raise RemoteError(f"{self.name}: {python!r} could not run on the host "
                              f"(exit {proc.returncode}): {tail_text(proc.stderr)}\n  fix: set "
                              "\"python\" in the backend config to a Python 3 on the host")
        return json.loads(proc.stdout)

    def address(self) -> str:
        """The host's real name or address after ``~/.ssh/config`` (``ssh -G``, no
        connection)."""
        proc = subprocess.run(["ssh", "-G", *self.options, self.host.destination],
                              capture_output=True, text=True, timeout=10)
        for line in proc.stdout.splitlines():
            key, _, value = line.partition(" ")
            if key == "hostname":
                return value
        return self.host.host
