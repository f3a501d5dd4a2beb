"""``SubmittedRun`` for runs owned by a supervisor (``supervise.py``) on one or more nodes.

Both backends return a :class:`SupervisedRun`; the ``fowlflow`` CLI rebuilds one from a run's
tags (:func:`fowlflow.projects.commands.run_from_tags`) to attach or cancel from any terminal::

    run = SupervisedRun(run_id, [Node(SshRunner(host), "/home/a/.fowlflow/runs/ID", "node0",
                                      "python3")])
    run.get_status()   # "RUNNING"
    run.wait()         # streams node0's log (re-attaching after a dropped connection)
    run.cancel()       # every process of the run is gone; MLflow status KILLED

The MLflow run always ends FINISHED, FAILED or KILLED: node 0's supervisor sets it, and
:meth:`SupervisedRun.reconcile` sets it from the client when the supervisor could not (it died,
or the tracking server was unreachable from the host).
"""

from __future__ import annotations

import enum
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.projects.submitted_run import SubmittedRun

from fowlflow.errors import RemoteError
from fowlflow.projects.runners import LocalRunner

_logger = logging.getLogger(__name__)


class RunState(str, enum.Enum):
    """Where a launched node (or the whole run) stands."""

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"
    LOST = "LOST"  # the supervisor died without recording an end (host reboot, kill -9)
    UNKNOWN = "UNKNOWN"  # nothing recorded, or the host can't be reached

    def is_terminal(self) -> bool:
        return self in (RunState.FINISHED, RunState.FAILED, RunState.KILLED, RunState.LOST)

    @property
    def mlflow_status(self) -> str:
        """The MLflow run status this state ends the run with."""
        return "FAILED" if self is RunState.LOST else self.value


@dataclass(frozen=True)
class Node:
    """One supervised command: where it runs and how to talk to its supervisor there."""

    runner: LocalRunner
    run_dir: str
    name: str
    python: str
    supervisor: str

    @property
    def log_path(self) -> str:
        return f"{self.run_dir}/{self.name}.log"

    def sup(self, command: str, *args: str) -> list[str]:
        return [self.python, self.supervisor, command, "--run-dir", self.run_dir,
                "--name", self.name, *args]


class SupervisedRun(SubmittedRun):
    """A run whose node 0 streams output and whose status comes from the supervisors."""

    def __init__(self, run_id: str, nodes: list[Node], *, stream: bool = True,
                 reconnect_timeout: float = 300, out=None, on_end=None,
                 watch_interval: float = 10):
        super().__init__()
        self._run_id = run_id
        self.nodes = nodes
        self.stream = stream
        self.reconnect_timeout = reconnect_timeout
        self.out = out or sys.stdout.buffer
        self._offset = 0
        self._on_end = on_end  # e.g. closes an SSH tunnel
        self.watch_interval = watch_interval  # how often other nodes are checked

    @property
    def run_id(self) -> str:
        return self._run_id

    # -- status ----------------------------------------------------------------------------
    def node_state(self, node: Node) -> RunState:
        """One node's state; raises RemoteError when its host can't be reached."""
        proc = node.runner.run(node.sup("status"), timeout=60)
        return RunState(json.loads(proc.stdout)["state"])

    def states(self) -> list[RunState]:
        out = []
        for node in self.nodes:
            try:
                out.append(self.node_state(node))
            except RemoteError as exc:
                _logger.warning("%s", exc)
                out.append(RunState.UNKNOWN)
        return out

    @staticmethod
    def combine(states: list[RunState]) -> RunState:
        """Whole-run state: node 0 decides unless another node failed or is still running."""
        if any(s in (RunState.RUNNING, RunState.STARTING) for s in states):
            return RunState.RUNNING
        if RunState.UNKNOWN in states:
            return RunState.UNKNOWN
        if RunState.KILLED in states:
            return RunState.KILLED
        if any(s in (RunState.FAILED, RunState.LOST) for s in states):
            return RunState.FAILED
        return RunState.FINISHED

    def get_status(self) -> str:
        return self.combine(self.states()).value

    # -- output ----------------------------------------------------------------------------
    def _follow_once(self, node: Node) -> int:
        proc = node.runner.popen(node.sup("follow", "--offset", str(self._offset)),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL)
        try:
            while chunk := proc.stdout.read1(65536):
                self._offset += len(chunk)
                self.out.write(chunk)
                self.out.flush()
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()

    def _until_ended(self, node: Node) -> RunState:
        """Stream (or poll) ``node`` until it ends, re-attaching after lost connections."""
        lost_since = None
        while True:
            try:
                if self.stream:
                    code = self._follow_once(node)
                    if code == 255:
                        raise RemoteError(f"connection to {node.runner.name} dropped")
                state = self.node_state(node)
                lost_since = None
                if state.is_terminal():
                    return state
                if state is RunState.UNKNOWN:
                    raise RemoteError(f"{node.name} on {node.runner.name} has no record of "
                                      f"run {self.run_id} in {node.run_dir}")
                if not self.stream:
                    time.sleep(2)
            except RemoteError as exc:
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > self.reconnect_timeout:
                    raise RemoteError(
                        f"lost contact with {node.runner.name} for over "
                        f"{self.reconnect_timeout} s: {exc}\n  the run may still be running "
                        f"there; re-attach with `fowlflow attach {self.run_id}` or stop it with "
                        f"`fowlflow cancel {self.run_id}`") from exc
                _logger.warning("%s; re-attaching in 2 s", str(exc).splitlines()[0])
                time.sleep(2)

    def wait(self) -> bool:
        """Block until every node ended; True when the run FINISHED. Ctrl-C cancels it."""
        stop = threading.Event()
        watchdog = threading.Thread(target=self._watch_peers, args=(stop,), daemon=True)
        if len(self.nodes) > 1:
            watchdog.start()
        try:
            first = self._until_ended(self.nodes[0])
            stop.set()
            rest = [self._settle(n, first) for n in self.nodes[1:]]
            final = self.combine([first, *rest])
            self.reconcile(final)
            return final is RunState.FINISHED
        except KeyboardInterrupt:
            _logger.error("interrupted: cancelling run %s", self.run_id)
            self.cancel()
            raise
        finally:
            stop.set()
            self._end()

    def _watch_peers(self, stop: threading.Event) -> None:
        """A failed node leaves the others blocked in collectives: stop them, run FAILED."""
        while not stop.wait(self.watch_interval):
            for node in self.nodes[1:]:
                try:
                    state = self.node_state(node)
                except RemoteError:
                    continue  # unreachable for now; node 0's stream decides
                if state in (RunState.FAILED, RunState.LOST):
                    _logger.error("%s on %s ended %s: stopping the other nodes", node.name,
                                  node.runner.name, state.value)
                    for other in self.nodes:
                        if other is not node:
                            try:
                                self.cancel_node(other, RunState.FAILED)
                            except RemoteError as exc:
                                _logger.warning("%s", exc)
                    return

    def _settle(self, node: Node, first: RunState, patience: float = 120) -> RunState:
        """Other nodes end with node 0 (torchrun's exit barrier); stop stragglers."""
        deadline = time.monotonic() + (patience if first is RunState.FINISHED else 20)
        while time.monotonic() < deadline:
            try:
                state = self.node_state(node)
            except RemoteError:
                state = RunState.UNKNOWN
            if state.is_terminal():
                return state
            time.sleep(1)
        _logger.warning("%s on %s still running after node0 ended; cancelling it",
                        node.name, node.runner.name)
        self.cancel_node(node)
        return RunState.KILLED if first is RunState.KILLED else RunState.FAILED

    def _end(self) -> None:
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end()

    # -- ending ----------------------------------------------------------------------------
    def reconcile(self, final: RunState) -> None:
        """End the MLflow run with ``final`` if nobody did, keeping what output we can get."""
        if not final.is_terminal():
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        status = client.get_run(self.run_id).info.status
        if status in ("FINISHED", "FAILED", "KILLED"):
            return
        self._upload_logs(client)
        client.set_terminated(self.run_id, final.mlflow_status)

    def _upload_logs(self, client) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for node in self.nodes:
                try:
                    data = node.runner.run(["cat", node.log_path], timeout=120).stdout
                except RemoteError as exc:
                    _logger.warning("could not fetch %s's log: %s", node.name, exc)
                    continue
                path = Path(tmp) / f"{node.name}.log"
                path.write_bytes(data)
                client.log_artifact(self.run_id, str(path), "fowlflow-logs")

    def cancel_node(self, node: Node, state: RunState = RunState.KILLED) -> None:
        """Stop one node; its supervisor records ``state`` (KILLED, or FAILED for a peer)."""
        node.runner.run(node.sup("cancel", "--run-id", self.run_id, "--state", state.value),
                        timeout=90)

    def cancel(self) -> None:
        """Stop every process of the run on every node; the MLflow run ends KILLED."""
        errors = []
        for node in self.nodes:
            try:
                self.cancel_node(node)
            except RemoteError as exc:
                errors.append(str(exc))
        try:
            self.reconcile(RunState.KILLED)
        finally:
            self._end()
        if errors:
            raise RemoteError("cancel did not reach every node:\n" + "\n".join(errors))

    def log_tail(self, n_bytes: int = 3000) -> str:
        """The end of node 0's output (for error messages)."""
        try:
            out = self.nodes[0].runner.run(["tail", "-c", str(n_bytes),
                                            self.nodes[0].log_path], timeout=60).stdout
            return out.decode(errors="replace")
        except RemoteError as exc:
            return f"(log unavailable: {exc})"
