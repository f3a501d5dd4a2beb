"""The tests' one way to pick a port and to wait for a server or a condition.

    port = free_port()                                  # a free TCP port on 127.0.0.1
    wait_until(lambda: path.exists(), what="the log file", timeout=30)
    wait_port("127.0.0.1", port, timeout=60)            # something accepts connections
    wait_http(f"{url}/health", proc=server, log=log_file, timeout=120)   # HTTP 200, or fail with
                                                        # the server's exit code and log tail
    with stack_parts("ff-", "postgres") as stack:       # team-stack parts on fresh free ports

Each wait polls with a short sleep and raises ``AssertionError`` naming what it waited for, how
long, and (when given) the process's exit status and its log's last lines: a test that fails
here says why without re-running it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
PORT_TAKEN = "is taken by another program"  # the stack's error when a port is not free


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def on_free_ports(state: Path, start: Callable[[], T], *, attempts: int = 3, **load) -> T:
    """``start()`` servers of the team stack in ``state`` on ports picked free just before.

    A port that was free at the pick can be taken before the server binds it: every other
    program picking ports (another pytest-xdist worker's stack picks from the same range) may
    choose it in that window. When ``start`` fails with the stack's "port ... is taken" error
    (which names the holder), what it started is stopped and the ports are picked again; any
    other error, or the last attempt's, goes up unchanged. ``load``: more
    ``StackConfig.load`` arguments (workers, log sizes).
    """
    from fowlflow.server import Stack, StackConfig

    for attempt in range(1, attempts + 1):
        StackConfig.load(state, pick_free=True, **load).save()
        try:
            return start()
        except Exception as exc:
            if PORT_TAKEN not in str(exc) or attempt == attempts:
                raise
            print(f"attempt {attempt} of {attempts}: {exc}; picking new ports", file=sys.stderr)
            Stack(StackConfig.load(state, **load)).stop()
            (state / "ports.json").unlink()
    raise AssertionError("unreachable")


@contextlib.contextmanager
def stack_parts(prefix: str, *names: str, **load) -> Iterator:
    """A throwaway team stack in a new state folder ``/tmp/<prefix>...`` (mode 0711: the
    postgres user reaches it) with only the parts ``names`` started (in that order), on free
    ports (:func:`on_free_ports`); stopped and its folder removed on exit. ``load``: more
    ``StackConfig.load`` arguments (workers, log sizes)."""
    from fowlflow.server import Stack, StackConfig

    state = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(state, 0o711)

    def start():
        stack = Stack(StackConfig.load(state, **load))
        for name in names:
            stack.start_component(name)
        return stack

    try:
        yield on_free_ports(state, start, **load)
    finally:
        Stack(StackConfig.load(state, **load)).stop()
        shutil.rmtree(state, ignore_errors=True)


def _context(proc: subprocess.Popen | None, log: Path | None) -> str:
    parts = []
    if proc is not None and proc.poll() is not None:
        parts.append(f"the process exited {proc.returncode}")
    if log is not None and Path(log).exists():
        parts.append(f"log tail:\n{Path(log).read_text(errors='replace')[-3000:]}")
    return ("; " + "\n".join(parts)) if parts else ""


def wait_until(check: Callable[[], object], *, what: str, timeout: float = 60,
               interval: float = 0.2, proc: subprocess.Popen | None = None,
               log: Path | None = None):
    """Poll ``check`` until it returns something truthy (returned); fail after ``timeout`` s or
    as soon as ``proc`` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"gave up waiting for {what}{_context(proc, log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s{_context(proc, log)}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, *, timeout: float = 60, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    wait_until(lambda: port_open(host, port), what=f"a listener on {host}:{port}",
               timeout=timeout, proc=proc, log=log)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_http(url: str, *, timeout: float = 120, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    """Wait until ``url`` answers HTTP 200 (e.g. an mlflow server's ``/health``)."""
    wait_until(lambda: http_ok(url), what=f"HTTP 200 from {url}", timeout=timeout,
               interval=0.5, proc=proc, log=log)
