"""Command runners: run an argv here or on a host over OpenSSH, and ship a project there.

Every command is an argv list. :class:`SshRunner` turns it into the one remote shell string
with ``shlex.join`` (the only quoting step), and every ``ssh``/``rsync -e`` invocation takes its
options from :func:`ssh_options`::

    runner = SshRunner(HostSpec("gpu-box", user="alice"), strict_host_key_checking=True)
    info = runner.probe("python3")            # {"home": ..., "gpus": [...], "rsync": true}
    runner.run(["mkdir", "-p", ".fowlflow/runs/abc"])
    ship_project(work_dir, runner, ".fowlflow/runs/abc/project", method="auto")  # or "tar"
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

from fowlflow.errors import RemoteError
from fowlflow.projects.config import HostSpec

_logger = logging.getLogger(__name__)

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


def ssh_options(host: HostSpec, *, strict_host_key_checking: bool = True,
                known_hosts_file: str | None = None, connect_timeout: int = 10,
                extra: tuple[str, ...] = ()) -> list[str]:
    """The one place SSH options are decided (ssh, rsync -e and tunnels all use it).

    BatchMode makes a missing or rejected key fail at once instead of prompting;
    ConnectTimeout and ServerAlive* bound how long an unreachable or dead host can hang us.
    """
    opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    if strict_host_key_checking:
        opts += ["-o", "StrictHostKeyChecking=yes"]
    else:  # explicit opt-out only; never the default
        opts += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "LogLevel=ERROR"]
    if known_hosts_file and strict_host_key_checking:
        opts += ["-o", f"UserKnownHostsFile={known_hosts_file}"]
    if host.port:
        opts += ["-p", str(host.port)]
    if host.identity_file:
        opts += ["-i", host.identity_file, "-o", "IdentitiesOnly=yes"]
    return opts + list(extra)


def _tail(text: str | bytes, n: int = 2000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-n:].strip()


class LocalRunner:
    """Runs argv lists on this machine."""

    name = "local"

    def wrap(self, argv: list[str]) -> list[str]:
        return list(argv)

    def run(self, argv: list[str], *, input: bytes | None = None, timeout: float | None = 60,
            check: bool = True) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(self.wrap(argv), input=input, capture_output=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RemoteError(f"{self.name}: {shlex.join(argv)[:200]} did not finish within "
                              f"{timeout} s") from exc
        if check and proc.returncode != 0:
            raise RemoteError(f"{self.name}: {shlex.join(argv)[:300]} failed with exit code "
                              f"{proc.returncode}:\n{_tail(proc.stderr or proc.stdout)}")
        return proc

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.wrap(argv), **kwargs)

    def probe(self, python: str = sys.executable) -> dict:
        out = self.run([python, "-c", PROBE_SOURCE], timeout=60).stdout
        return json.loads(out)


class SshRunner(LocalRunner):
    """Runs argv lists on one host through the OpenSSH client (``~/.ssh/config`` applies)."""

    def __init__(self, host: HostSpec, *, strict_host_key_checking: bool = True,
                 known_hosts_file: str | None = None, connect_timeout: int = 10,
                 extra_options: tuple[str, ...] = ()):
        if shutil.which("ssh") is None:
            raise RemoteError("the ssh backend needs the OpenSSH client; install it "
                              "(apt-get install openssh-client)")
        self.host = host
        self.name = host.destination
        self.options = ssh_options(host, strict_host_key_checking=strict_host_key_checking,
                                   known_hosts_file=known_hosts_file,
                                   connect_timeout=connect_timeout, extra=extra_options)

    def ssh_base(self) -> list[str]:
        return ["ssh", *self.options, self.host.destination]

    def wrap(self, argv: list[str]) -> list[str]:
        # `--` ends ssh's options; the remote side gets exactly one shell string.
        return [*self.ssh_base(), "--", shlex.join(argv)]

    def run(self, argv, *, input=None, timeout=60, check=True):
        proc = super().run(argv, input=input, timeout=timeout, check=False)
        if proc.returncode == 255:
            raise RemoteError(self.explain_connect_error(_tail(proc.stderr)))
        if check and proc.returncode != 0:
            raise RemoteError(f"{self.name}: {shlex.join(argv)[:300]} failed with exit code "
                              f"{proc.returncode}:\n{_tail(proc.stderr or proc.stdout)}")
        return proc

    def explain_connect_error(self, stderr: str) -> str:
        hint = "check the host name, that sshd runs there, and your network"
        low = stderr.lower()
        if "permission denied" in low:
            hint = ("the key was rejected: check user/identity_file, that the public key is in "
                    "the host's ~/.ssh/authorized_keys, and ssh-agent")
        elif "host key verification failed" in low or "no matching host key" in low:
            hint = ("the host key is not in known_hosts: connect once with `ssh "
                    f"{self.host.destination}` to verify and add it, or set known_hosts_file; "
                    "\"strict_host_key_checking\": false turns verification off (not advised)")
        elif "timed out" in low:
            hint = ("no answer within connect_timeout: the host is down or unreachable from "
                    "here")
        return f"ssh to {self.name} failed: {stderr or 'exit 255'}\n  fix: {hint}"

    def probe(self, python: str = "python3") -> dict:
        proc = self.run([python, "-c", PROBE_SOURCE], timeout=60, check=False)
        if proc.returncode != 0:
            raise RemoteError(f"{self.name}: {python!r} could not run on the host "
                              f"(exit {proc.returncode}): {_tail(proc.stderr)}\n  fix: set "
                              "\"python\" in the backend config to a Python 3 on the host")
        return json.loads(proc.stdout)

    def resolved(self) -> dict:
        """``ssh -G``: the real hostname/user/port after ``~/.ssh/config`` (no connection)."""
        proc = subprocess.run(["ssh", "-G", *self.options, self.host.destination],
                              capture_output=True, text=True, timeout=10)
        out = {}
        for line in proc.stdout.splitlines():
            key, _, value = line.partition(" ")
            if key in ("hostname", "user", "port"):
                out[key] = value
        return out


def project_files(work_dir: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files of a git project, else every file but .git."""
    work_dir = Path(work_dir)
    if shutil.which("git"):
        proc = subprocess.run(["git", "-C", str(work_dir), "ls-files", "-z", "--cached",
                               "--others", "--exclude-standard"], capture_output=True)
        if proc.returncode == 0:
            names = [n for n in proc.stdout.decode().split("\0") if n]
            return sorted(n for n in names if (work_dir / n).is_file())
    return sorted(str(p.relative_to(work_dir)) for p in work_dir.rglob("*")
                  if p.is_file() and ".git" not in p.relative_to(work_dir).parts)


def ship_project(work_dir: Path, runner: SshRunner, dest: str, method: str = "auto",
                 remote_rsync: bool = True) -> str:
    """Copy the project's files (see :func:`project_files`) into ``dest`` on the host.

    rsync is used when both ends have it (``method="auto"``), else a tar stream over ssh.

    Returns:
        the method used, "rsync" or "tar".
    """
    files = project_files(work_dir)
    use_rsync = method == "rsync" or (method == "auto" and remote_rsync
                                      and shutil.which("rsync") is not None)
    runner.run(["mkdir", "-p", "-m", "700", dest])
    if use_rsync:
        rsh = shlex.join(["ssh", *runner.options])
        listing = "\0".join(files).encode()
        cmd = ["rsync", "-a", "--from0", "--files-from=-", "-e", rsh, f"{work_dir}/",
               f"{runner.host.destination}:{dest}/"]
        proc = subprocess.run(cmd, input=listing, capture_output=True, timeout=600)
        if proc.returncode != 0:
            raise RemoteError(f"rsync of {work_dir} to {runner.name}:{dest} failed "
                              f"({proc.returncode}): {_tail(proc.stderr)}")
        return "rsync"
    proc = runner.popen(["tar", "-x", "-f", "-", "-C", dest], stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    try:
        with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
            for name in files:
                tar.add(Path(work_dir) / name, arcname=name, recursive=False)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    code = proc.wait(timeout=600)
    reader.join(10)
    if code != 0:
        raise RemoteError(f"copying {work_dir} to {runner.name}:{dest} with tar failed "
                          f"({code}): {_tail(b''.join(err))}")
    return "tar"
