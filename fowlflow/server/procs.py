"""Process plumbing for the server stack: start, find and stop every process of one part.

Every process a part of the stack starts carries two variables in its environment,
``FOWLFLOW_SERVER_STATE`` (the stack's state directory) and ``FOWLFLOW_SERVER_PART``
(``postgres``, ``s3`` or ``mlflow``), and children inherit them (uvicorn's workers,
PostgreSQL's backends). That :class:`Owner` mark is how ``stop`` and ``start`` find all of a
part's processes, including the ones left behind when its main process died (kill -9), and
never anyone else's. The main process is also recorded as a :class:`ProcessRecord` (pid + the
kernel's start time of that pid)::

    owner = Owner(str(state_dir), "s3")
    proc = spawn(["weed", "mini", ...], owner=owner, log_path=logs / "seaweedfs.log", env=env)
    record = ProcessRecord.of(proc.pid)
    ...
    stop(owner, record, signal.SIGTERM, timeout=30)

Each server's stdout and stderr go through a pipe to a ``logpipe`` process (same mark) that
writes a rotated, size-capped log. Also: free-port picking and readiness polling (HTTP).
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
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from fowlflow.errors import ServerError

log = logging.getLogger(__name__)
MARK_STATE = "FOWLFLOW_SERVER_STATE"
MARK_PART = "FOWLFLOW_SERVER_PART"


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
            return proc if _running(proc) else None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def alive(self) -> bool:
        return self.process() is not None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping | None) -> ProcessRecord | None:
        return cls(int(data["pid"]), float(data["create_time"])) if data else None


@dataclasses.dataclass(frozen=True)
class Owner:
    """The mark that every process of one part of one stack carries in its environment.

    ``workdir`` also claims every process working in that directory: PostgreSQL's backends
    overwrite their environment with their process title, but all work in the data directory.
    """

    state: str
    part: str
    workdir: str | None = None

    def env(self) -> dict[str, str]:
        return {MARK_STATE: self.state, MARK_PART: self.part}

    def processes(self) -> list[psutil.Process]:
        """Every running process with this mark (its environment must be readable: same
        user, or root)."""
        found = []
        for p in psutil.process_iter():
            if p.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error, OSError):
                env = p.environ()
                marked = env.get(MARK_STATE) == self.state and env.get(MARK_PART) == self.part
                if (marked or (self.workdir and p.cwd() == self.workdir)) and _running(p):
                    found.append(p)
        return found


def spawn(argv: Sequence[str], *, owner: Owner, log_path: Path, env: Mapping[str, str],
          max_bytes: int, backups: int, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``argv`` detached in its own session, marked as ``owner``'s, output logged.

    Its own session means Ctrl-C in the terminal that ran ``fowlflow server start`` does not
    reach the servers. stdout and stderr go through a pipe to a ``logpipe`` process that
    rotates ``log_path`` at ``max_bytes``, keeping ``backups`` old files. Files the server
    creates are private to its user (umask 077).

    Args:
        argv: the command (no secrets: other users see it in ``ps``).
        owner: the mark put into its environment (and so into its children's).
        log_path: the log file.
        env: the environment of the process (secrets go here); the mark is added.
        max_bytes: size at which the log is rotated.
        backups: rotated files kept.
        cwd: working directory.

    Returns:
        The started process (its pid is the server's pid, not a shell's).

    Raises:
        ServerError: the executable could not be started.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    try:
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=write_end,
                                    stderr=write_end, env={**env, **owner.env()}, cwd=cwd,
                                    start_new_session=True, umask=0o077)
        except OSError as exc:
            raise ServerError(f"could not start {argv[0]}: {exc}; check that it is installed "
                              "(pip install 'fowlflow[server]', apt-get install postgresql)"
                              ) from exc
        pump_env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "LANG")}
        subprocess.Popen([sys.executable, "-m", "fowlflow.server.logpipe",
                          str(log_path), str(max_bytes), str(backups)],
                         stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**pump_env, **owner.env()}, cwd="/", start_new_session=True,
                         umask=0o077)
    finally:
        os.close(read_end)
        os.close(write_end)
    return proc


def stop(owner: Owner, record: ProcessRecord | None, sig: int = signal.SIGTERM, *,
         timeout: float = 30.0) -> bool:
    """Stop every process of ``owner``: its recorded main process first, then leftovers.

    The main process (if it is still the one recorded: same pid and start time, so a reused pid
    is left alone) gets ``sig`` and ``timeout`` seconds to shut down with its children. What is
    left with the mark (children of a main process that was killed, a stuck worker, the log
    pipe) gets SIGTERM, then SIGKILL 10 s later. No other process is ever signalled.

    Args:
        owner: whose processes.
        record: the main process; None or dead is fine.
        sig: the polite signal for the main process (SIGINT: PostgreSQL's fast shutdown).
        timeout: seconds the main process gets.

    Returns:
        True if any process of ``owner`` was running.
    """
    main = record.process() if record else None
    ours = owner.processes()
    if main is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            main.send_signal(sig)
        if not _wait_gone([main], timeout):
            log.warning("pid %d did not exit %.0fs after signal %d; killing it", main.pid,
                        timeout, sig)
    # The log pipe exits by itself once the last writer is gone; give it a moment.
    _wait_gone(ours, 2)
    for sig_now in (signal.SIGTERM, signal.SIGKILL):
        left = owner.processes()
        if not left:
            break
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig_now)
        _wait_gone(left, 10)
    return main is not None or bool(ours)


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


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers do: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str:
    """Who holds a local TCP ``port``: "pid 1234 (postgres: ...)" for each process found.

    Empty when no process can be named (another user's sockets need root to be seen).
    """
    pids = set()
    with contextlib.suppress(psutil.Error, OSError):
        pids = {c.pid for c in psutil.net_connections(kind="tcp")
                if c.laddr and c.laddr.port == port and c.pid}
    names = []
    for pid in sorted(pids):
        with contextlib.suppress(psutil.Error):
            names.append(f"pid {pid} ({' '.join(psutil.Process(pid).cmdline())[:120]})")
    return ", ".join(names)


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
