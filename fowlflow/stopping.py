"""How a fowlflow process stops when told to: one exception, one exit code, one place.

    stopping.install()            # first thing in ``python -m fowlflow.train``
    stopping.raise_if_stopping()  # once per batch in the training and evaluation loops
    with stopping.sigterm_unwinds():   # a download in a process that installed nothing
        ...                            # its ``finally`` clauses remove the partial files

A stop request is :class:`Terminated` (or ``KeyboardInterrupt`` for SIGINT), raised in the main
thread; the process then exits with 128 + the signal number (:attr:`Terminated.exit_code`).

:func:`install` (the training entry point): SIGTERM and SIGHUP (``timeout``, ``kill``, a
cancelled CI job, a closed terminal) raise :class:`Terminated`, so ``train.run`` ends the MLflow
run as KILLED with an ``error`` tag. ``mlflow run`` dies of SIGTERM without passing it on, and a
SIGKILL can't be passed on, so when ``mlflow run`` started the process (directly, or through
the ``bash -c`` of a conda/virtualenv activation; :func:`find_mlflow_run`) a watcher thread
stops it the same way once that process is gone: no orphan trains on. A process started any
other way (by hand, ``nohup``, ``torchrun``) is left to outlive its parent.

A signal that lands inside MLflow (or the database, HTTP, logging and threading code below it)
is held back until that call returns (re-delivered every ``RETRY_S``, at most ``DEFER_S``): an
exception raised halfway through a store write can leave a lock held that the cleanup would
then wait on forever. Signals that arrive while the run is being ended (a signal sent to the
whole process group, then the launcher's death) are ignored; the cleanup gets ``GRACE_S``
seconds, then the process exits, printing where each thread was.

:func:`sigterm_unwinds` (any other process that writes temporary files, e.g. a data download
from ``register`` or a plain script): where SIGTERM still has its default action, it raises
:class:`Terminated` inside the block, and once the block has unwound the process ends by
SIGTERM as it would have anyway.

This module sits at the bottom of fowlflow (it imports no other fowlflow module), so the data
sources, the trainer and :mod:`fowlflow.local_paths` can all use it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time

import psutil

GRACE_S = 30.0
DEFER_S = 10.0
RETRY_S = 0.1
POLL_S = 0.5
SHELLS = ("bash", "sh", "dash", "zsh")
# Top-level packages a stop must not interrupt halfway (their locks, transactions, connections).
DEFER_IN = frozenset({"mlflow", "sqlalchemy", "alembic", "sqlite3", "requests", "urllib3", "http",
                      "socket", "ssl", "logging", "threading", "queue", "concurrent"})

_stopping = threading.Event()
_first_signal: list[float] = []
_launcher_gone: list[str] = []  # why the watcher stopped the trainer, when it did
_requested: list[BaseException] = []  # the exception the first stop signal raised


class Terminated(BaseException):
    """The process was told to stop (a BaseException, like KeyboardInterrupt: nothing swallows it)."""

    def __init__(self, signum: int, reason: str):
        super().__init__(reason)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def run_until_stopped(main, *args, what: str = "stopped") -> int:
    """A command line's ``main`` with the stop handling installed first: the exit code by
    :func:`fowlflow.errors.exit_code`'s rules, and a stop request gives
    ``fowlflow: <what> (<reason>)`` on stderr and 128 + the signal number."""
    from fowlflow.errors import exit_code

    install()
    try:
        return exit_code(main, *args)
    except Terminated as exc:
        print(f"fowlflow: {what} ({exc})", file=sys.stderr)
        return exc.exit_code


def install() -> psutil.Process | None:
    """Handle SIGTERM/SIGHUP/SIGINT and watch the ``mlflow run`` that started us (returned)."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    launcher = find_mlflow_run()
    if launcher is not None:
        threading.Thread(target=_watch, args=(launcher,), name="fowlflow-launcher-watch",
                         daemon=True).start()
    return launcher


def _on_signal(signum: int, frame) -> None:
    if _stopping.is_set():
        return  # the run is already being ended
    if not _first_signal:
        _first_signal.append(time.monotonic())
    if _inside(frame, DEFER_IN) and time.monotonic() - _first_signal[0] < DEFER_S:
        retry = threading.Timer(RETRY_S, os.kill, (os.getpid(), signum))
        retry.daemon = True
        retry.start()
        return
    _stopping.set()
    timer = threading.Timer(GRACE_S, _give_up, (signum,))
    timer.daemon = True
    timer.start()
    if signum == signal.SIGINT:
        stop: BaseException = KeyboardInterrupt()
    else:
        name = signal.Signals(signum).name
        stop = Terminated(signum, _launcher_gone[0] if _launcher_gone else f"received {name}")
    _requested.append(stop)
    raise stop


def raise_if_stopping() -> None:
    """Raise the stop a signal asked for again, in case its exception was lost on the way.

    A handler's exception that lands while C code is calling back into Python can be cleared
    there (torch's C++ does this in places): the trainer would then train on until ``GRACE_S``.
    The training and evaluation loops call this once per batch; it costs a list check.
    """
    if _requested:
        raise _requested[0].with_traceback(None)


@contextlib.contextmanager
def sigterm_unwinds():
    """Make SIGTERM raise :class:`Terminated` in the block (``finally`` clauses remove temporary
    files), then end the process by SIGTERM as it would have anyway.

    Only where SIGTERM has its default action and in the main thread: a handler someone
    installed (:func:`install`'s, which raises the same :class:`Terminated`) keeps its meaning.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def unwind(signum, frame):
        raise Terminated(signum, "received SIGTERM")

    signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    except Terminated as exc:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit(exc.exit_code) from None  # only if the signal was not delivered at once
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _inside(frame, packages: frozenset[str]) -> bool:
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).partition(".")[0] in packages:
            return True
        frame = frame.f_back
    return False


def _give_up(signum: int) -> None:
    print(f"fowlflow: the run was not ended within {GRACE_S:.0f}s of the stop signal; exiting. "
          "Where each thread was:", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(sys.stderr, all_threads=True)
    os._exit(128 + signum)


def find_mlflow_run() -> psutil.Process | None:
    """The ``mlflow run`` process that started this one: the parent, or the parent of a
    ``bash -c`` parent. None when started any other way."""
    try:
        proc = psutil.Process().parent()
        for _ in range(2):
            if proc is None:
                return None
            cmd = proc.cmdline()
            if any(os.path.basename(a) == "mlflow" and b == "run" for a, b in zip(cmd, cmd[1:])):
                return proc
            if not (len(cmd) > 1 and os.path.basename(cmd[0]) in SHELLS and cmd[1] == "-c"):
                return None
            proc = proc.parent()
    except psutil.Error:
        return None
    return None


def _alive(proc: psutil.Process) -> bool:
    try:  # is_running() also checks the start time, so a reused pid is not mistaken for it
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _watch(launcher: psutil.Process) -> None:
    while _alive(launcher):
        time.sleep(POLL_S)
    _launcher_gone.append(f"the `mlflow run` that started it (pid {launcher.pid}) exited")
    os.kill(os.getpid(), signal.SIGTERM)
