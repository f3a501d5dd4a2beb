"""Process plumbing for the server stack: start detached, record, check and stop by pid.

Every server the stack starts is recorded as a :class:`ProcessRecord` (pid + the kernel's start
time of that pid), so ``stop`` only ever signals a process it started itself, even after the
pid has been reused by something else::

    proc = spawn(["weed", "mini", ...], log_path=logs / "seaweedfs.log", env=env)
    record = ProcessRecord.of(proc.pid)
    ...
    terminate(record, signal.SIGTERM, timeout=20)

Also: free-port picking and readiness polling (TCP, HTTP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from fowlflow.errors import ServerError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProcessRecord:
    """A process this stack started: its pid and the kernel's create time of that pid."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> ProcessRecord:
        return cls(pid=pid, create_time=psutil.Process(pid).create_time())

    def process(self) -> psutil.Process | None:
        """The live process, or None when it exited or the pid now belongs to another one."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.5:
                return None  # pid reused: not ours
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def alive(self) -> bool:
        return self.process() is not None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping | None) -> ProcessRecord | None:
        return cls(int(data["pid"]), float(data["create_time"])) if data else None


def spawn(argv: Sequence[str], *, log_path: Path, env: Mapping[str, str],
          cwd: Path | None = None) -> subprocess.Popen:
    """Start ``argv`` detached in its own session, output appended to ``log_path``.

    Its own session means Ctrl-C in the terminal that ran ``fowlflow server start`` does not
    reach the servers, and the whole group can be cleaned up if the leader leaves children.

    Args:
        argv: the command (no secrets: other users see it in ``ps``).
        log_path: file that receives stdout and stderr (appended).
        env: the complete environment of the process (secrets go here).
        cwd: working directory.

    Returns:
        The started process (its pid is the server's pid, not a shell's).

    Raises:
        ServerError: the executable could not be started.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        try:
            return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=dict(env), cwd=cwd,
                                    start_new_session=True)
        except OSError as exc:
            raise ServerError(f"could not start {argv[0]}: {exc}; check that it is installed "
                              "(pip install 'fowlflow[server]', apt-get install postgresql)"
                              ) from exc


def terminate(record: ProcessRecord | None, sig: int = signal.SIGTERM, *,
              timeout: float = 30.0, group: bool = True) -> bool:
    """Stop a recorded process (and, with ``group``, what is left of its process group).

    Sends ``sig``, waits up to ``timeout`` seconds, then SIGKILLs. Only signals the process if
    it is still the one recorded (same pid and start time), and a group only if the process
    leads it (we created it with ``start_new_session``).

    Args:
        record: the process to stop; None is a no-op.
        sig: the polite signal (SIGTERM; SIGINT is PostgreSQL's fast shutdown).
        timeout: seconds to wait before SIGKILL.
        group: also stop the rest of its process group (e.g. uvicorn workers).

    Returns:
        True if the recorded process was running and is now stopped.
    """
    proc = record.process() if record else None
    if proc is None:
        return False
    # Children started by the server (uvicorn workers) live in the group we created at spawn.
    try:
        pgid = os.getpgid(proc.pid) if group else None
    except ProcessLookupError:
        return False
    if pgid is not None and pgid != proc.pid:
        pgid = None  # not a group leader we created: never signal a foreign group
    members = _group_members(pgid) if pgid else []
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.send_signal(sig)
    if not _wait_gone([proc], timeout):
        log.warning("pid %d did not exit %.0fs after signal %d; killing it", proc.pid, timeout,
                    sig)
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
        _wait_gone([proc], 10)
    # Stragglers of our own group (e.g. a worker that outlived its supervisor).
    leftovers = [m for m in members if _running(m)]
    if leftovers and not _wait_gone(leftovers, 5):
        for p in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _wait_gone(leftovers, 5)
    return True


def _running(proc: psutil.Process) -> bool:
    """Running and not a zombie (reaping it if it is our own child)."""
    try:
        if proc.status() != psutil.STATUS_ZOMBIE:
            return True
    except psutil.NoSuchProcess:
        return False
    # A server started from this process (e.g. a test restarting one) and stopped from
    # another stays a zombie until we reap it; to everyone else it has exited.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(proc.pid, os.WNOHANG)
    return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_running(p) for p in procs):
            return True
        time.sleep(0.1)
    return not any(_running(p) for p in procs)


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            if p.pid != pgid and os.getpgid(p.pid) == pgid:
                members.append(p)
    return members


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers do: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int, *, low: int = 20000, high: int = 30000, host: str = "127.0.0.1",
               exclude: Sequence[int] = ()) -> list[int]:
    """``n`` distinct ports that are free now, below the kernel's ephemeral range.

    Ports from the ephemeral range (what ``bind(0)`` returns) can be taken by any outgoing
    connection before the server binds them; a random pick in 20000-30000 rarely is.
    """
    rng = random.Random()
    ports: list[int] = []
    for _ in range(2000):
        p = rng.randrange(low, high)
        if p not in ports and p not in exclude and port_free(p, host):
            ports.append(p)
            if len(ports) == n:
                return ports
    raise ServerError(f"could not find {n} free TCP ports in {low}-{high} on {host}")


def tcp_open(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_status(url: str, timeout: float = 3.0) -> int | None:
    """The HTTP status of a GET on ``url`` (None when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def wait_until(check: Callable[[], bool], *, what: str, timeout: float,
               record: ProcessRecord | None = None, log_path: Path | None = None,
               interval: float = 0.25) -> None:
    """Poll ``check`` until it returns true.

    Args:
        check: the readiness probe.
        what: name of the thing waited for, for the error message.
        timeout: seconds before giving up.
        record: the process being waited for; if it exits, fail at once.
        log_path: its log, whose tail goes into the error.
        interval: seconds between probes.

    Raises:
        ServerError: the process exited, or ``check`` stayed false for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if record is not None and not record.alive():
            raise ServerError(f"{what} exited during start-up; log tail:\n{log_tail(log_path)}")
        time.sleep(interval)
    raise ServerError(f"{what} not ready after {timeout:.0f}s; log tail:\n{log_tail(log_path)}")


def log_tail(path: Path | None, n: int = 30) -> str:
    if path is None or not path.exists():
        return "(no log)"
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])
