"""The team tracking stack: PostgreSQL + SeaweedFS S3 + ``mlflow server`` with basic-auth.

One object starts, inspects and stops the three servers of one state directory. Every process
of a part carries the stack's mark in its environment (:class:`~.procs.Owner`), and its main
process is recorded in ``state.json``, so that a later ``fowlflow server stop`` (another
process) stops exactly what was started, all of it (workers, backends, the log pipes) even
when a main process was killed, and nothing else. A part is running when its health check
answers (``/health``, S3 ``/healthz``, a PostgreSQL login)::

    stack = Stack(StackConfig.load(default_state_dir()))
    stack.start()                           # idempotent: starts what is not running
    env = stack.client_env()                # MLFLOW_TRACKING_URI/USERNAME/PASSWORD
    stack.stop_component("mlflow"); stack.start_component("mlflow")   # fault tests
    stack.stop()                            # reverse order; data stays for the next start

``start`` restarts a part whose main process is gone or which does not answer, after stopping
its leftovers. A failed start stops whatever it had started before raising. Starting and
stopping hold an exclusive lock on ``<state>/.lock``, so two commands on one state directory
never interleave.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import time
from pathlib import Path

from fowlflow.errors import ServerError
from fowlflow.server.config import Secrets, StackConfig
from fowlflow.server.mlflow_server import MlflowServer
from fowlflow.server.postgres import PostgresServer
from fowlflow.server.procs import ProcessRecord, port_free, port_holder
from fowlflow.server.seaweedfs import SeaweedFS

log = logging.getLogger(__name__)
COMPONENTS = ("postgres", "s3", "mlflow")  # start order; stop is the reverse
_PORT_FLAGS = {"postgres": "--postgres-port", "s3": "--s3-port", "mlflow": "--port"}


@dataclasses.dataclass(frozen=True)
class ComponentStatus:
    """One part: its recorded main process (if alive), health, and marked processes left
    without a main process."""

    name: str
    pid: int | None
    healthy: bool
    leftovers: tuple[int, ...]
    address: str

    @property
    def running(self) -> bool:
        return self.healthy and self.pid is not None

    @property
    def state(self) -> str:
        """A one-line description, with the fix when the part needs one."""
        if self.running:
            return f"running (pid {self.pid})"
        if self.pid is not None:
            return f"not answering (pid {self.pid}); restart it: fowlflow server start"
        if self.leftovers:
            return (f"main process gone, {len(self.leftovers)} of its processes left "
                    f"({'answering' if self.healthy else 'not answering'}); "
                    "clean up and restart: fowlflow server start")
        return "stopped"


class Stack:
    """The three servers of one state directory."""

    def __init__(self, cfg: StackConfig):
        self.cfg = cfg
        self.secrets = Secrets.load_or_create(cfg.secrets_dir)
        self.postgres = PostgresServer(cfg, self.secrets)
        self.s3 = SeaweedFS(cfg, self.secrets)
        self.mlflow = MlflowServer(cfg, self.secrets, pg_env=self.postgres.client_env(),
                                   s3_env=self.s3.s3_env())
        self._state_path = cfg.state_dir / "state.json"
        self._lock_fd: int | None = None

    @contextlib.contextmanager
    def _locked(self):
        """Hold ``<state>/.lock`` (re-entrant within this object)."""
        if self._lock_fd is not None:
            yield
            return
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.cfg.state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd = fd
            yield
        finally:
            self._lock_fd = None
            os.close(fd)  # releases the lock

    # -- recorded pids ---------------------------------------------------------------------
    def _records(self) -> dict[str, ProcessRecord | None]:
        raw = json.loads(self._state_path.read_text()) if self._state_path.exists() else {}
        return {name: ProcessRecord.from_json(raw.get(name)) for name in COMPONENTS}

    def _save_record(self, name: str, record: ProcessRecord | None) -> None:
        records = self._records()
        records[name] = record
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._state_path.write_text(json.dumps(
            {k: (v.to_json() if v else None) for k, v in records.items()}, indent=1) + "\n")

    def record(self, name: str) -> ProcessRecord | None:
        """The recorded process of component ``name`` if it is still running."""
        rec = self._records().get(name)
        return rec if rec and rec.alive() else None

    # -- one component ---------------------------------------------------------------------
    def _server(self, name: str):
        return {"postgres": self.postgres, "s3": self.s3, "mlflow": self.mlflow}[name]

    def _port(self, name: str) -> int:
        return self.cfg.ports[name]

    def start_component(self, name: str) -> ProcessRecord:
        """Start one part of the stack unless its recorded process is running.

        Args:
            name: ``"postgres"``, ``"s3"`` or ``"mlflow"``.

        Returns:
            The record (pid + start time) of the running process, as saved in state.json.

        Raises:
            ServerError: its port is taken by another program, or it did not come up (with
                the tail of its log).
        """
        with self._locked():
            server = self._server(name)
            running = self.record(name)
            if running and server.healthy():
                return running
            if running or server.owner.processes():
                log.warning("%s: main process %s, not healthy or its leftovers remain; "
                            "stopping what is left before starting it again", name,
                            "alive" if running else "gone")
                self.stop_component(name)
            if not port_free(self._port(name), self.cfg.host):
                holder = port_holder(self._port(name))
                raise ServerError(
                    f"port {self._port(name)} for {name} on {self.cfg.host} is taken by another "
                    f"program{f' ({holder})' if holder else ''}; stop it, or start with another "
                    f"port (fowlflow server start {_PORT_FLAGS[name]} N), which "
                    f"{self.cfg.state_dir / 'ports.json'} then keeps")
            record = server.start()
            self._save_record(name, record)
            return record

    def stop_component(self, name: str) -> bool:
        """Stop every process of one part of the stack (those with its mark), if any.

        Args:
            name: ``"postgres"``, ``"s3"`` or ``"mlflow"``.

        Returns:
            True if a process was stopped, False if none of ours was running.
        """
        with self._locked():
            rec = self._records().get(name)
            t0 = time.monotonic()
            stopped = self._server(name).stop(rec)
            self._save_record(name, None)
            if stopped:
                log.info("stopped %s in %.1fs", name, time.monotonic() - t0)
            return stopped

    # -- the whole stack ---------------------------------------------------------------------
    def start(self) -> None:
        """Start every part not already running: PostgreSQL, then S3, then mlflow server.

        Raises:
            ServerError: a part could not start; the parts this call had started are stopped
                again before it is raised.
        """
        with self._locked():
            self.cfg.save()
            started = []
            t0 = time.monotonic()
            try:
                for name in COMPONENTS:
                    was_running = self.record(name) is not None
                    self.start_component(name)
                    if not was_running:
                        started.append(name)
            except BaseException:
                for name in reversed(started):
                    self.stop_component(name)
                raise
        log.info("stack up in %.1fs: %s (user %s; password in %s)", time.monotonic() - t0,
                 self.cfg.tracking_uri, self.secrets.admin_username,
                 self.cfg.secrets_dir / "admin_password")

    def stop(self) -> list[str]:
        """Stop, in reverse order, the parts this state directory started.

        Returns:
            The names of the parts that were running and are now stopped.
        """
        with self._locked():
            return [name for name in reversed(COMPONENTS) if self.stop_component(name)]

    def status(self) -> list[ComponentStatus]:
        """Each part's main pid (if alive), health, leftovers and address, in start order."""
        addresses = {"postgres": f"{self.cfg.host}:{self.cfg.ports['postgres']}",
                     "s3": self.cfg.s3_endpoint, "mlflow": self.cfg.tracking_uri}
        out = []
        for name in COMPONENTS:
            server = self._server(name)
            rec = self.record(name)
            leftovers = () if rec else tuple(p.pid for p in server.owner.processes())
            out.append(ComponentStatus(name, rec.pid if rec else None, server.healthy(),
                                       leftovers, addresses[name]))
        return out

    def client_env(self, username: str | None = None, password: str | None = None
                   ) -> dict[str, str]:
        """The variables an MLflow client sets to use this server.

        Args:
            username: the login to use; default the admin.
            password: its password; default the admin's.

        Returns:
            ``MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_USERNAME``, ``MLFLOW_TRACKING_PASSWORD``.
        """
        return {"MLFLOW_TRACKING_URI": self.cfg.tracking_uri,
                "MLFLOW_TRACKING_USERNAME": username or self.secrets.admin_username,
                "MLFLOW_TRACKING_PASSWORD": password or self.secrets.admin_password}

    def log_paths(self) -> list[Path]:
        return [self.postgres.log_path, self.s3.log_path, self.mlflow.log_path]
