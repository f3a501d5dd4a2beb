"""``SubmittedRun`` for runs owned by supervisors (``supervise.py``) on one or more nodes.

Both backends return a :class:`SupervisedRun`; the ``fowlflow`` commands rebuild one from the
run's launch record (:mod:`fowlflow.projects.launch_record`) to attach or cancel from any
terminal::

    run = SupervisedRun(run_id, nodes, tracking_uri)
    run.get_status()   # "RUNNING"
    run.wait()         # streams node0's log (re-attaching after a dropped connection)
    run.cancel()       # every process of the run is gone; MLflow status KILLED

The MLflow run always ends FINISHED, FAILED or KILLED: node 0's supervisor sets it, and
:meth:`SupervisedRun.reconcile` sets it from the client when the supervisor could not (it died,
or the tracking server was unreachable from the host).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlflow.projects.submitted_run import SubmittedRun

from fowlflow.errors import RemoteError
from fowlflow.projects.failure_summary import failure_summary
from fowlflow.projects.log_stream import LogStream
from fowlflow.projects.nodes import Node, RunState
from fowlflow.projects.run_lifecycle import client
from fowlflow.projects.supervise import TERMINAL, end_run_if_running

_logger = logging.getLogger(__name__)
SETTLE_S = 120  # how long other nodes may take to end after node 0 FINISHED
SETTLE_AFTER_FAILURE_S = 20


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


class SupervisedRun(SubmittedRun):
    """A run whose node 0 streams output and whose status comes from the supervisors.

    ``on_end`` is called once, when waiting or cancelling is over (closes tunnels and shared
    SSH connections).
    """

    def __init__(self, run_id: str, nodes: list[Node], tracking_uri: str | None = None, *,
                 stream: bool = True, reconnect_timeout: float = 300, out=None, on_end=None,
                 watch_interval: float = 10):
        super().__init__()
        self._run_id = run_id
        self.nodes = nodes
        self.tracking_uri = tracking_uri
        self.stream = stream
        self.reconnect_timeout = reconnect_timeout
        self.out = out or sys.stdout.buffer
        self._on_end = on_end
        self.watch_interval = watch_interval  # how often other nodes are checked

    @property
    def run_id(self) -> str:
        return self._run_id

    def states(self) -> list[RunState]:
        """Every node's state; UNKNOWN (with a warning) for a node that can't be reached."""
        out = []
        for node in self.nodes:
            try:
                out.append(node.state())
            except RemoteError as exc:
                _logger.warning("%s", exc)
                out.append(RunState.UNKNOWN)
        return out

    def get_status(self) -> str:
        return combine(self.states()).value

    def wait(self) -> bool:
        """Block until every node ended; True when the run FINISHED. Ctrl-C cancels it."""
        stop = threading.Event()
        watchdog = threading.Thread(target=self._watch_peers, args=(stop,), daemon=True)
        if len(self.nodes) > 1:
            watchdog.start()
        try:
            first = LogStream(self.nodes[0], self.run_id, self.out, stream=self.stream,
                              reconnect_timeout=self.reconnect_timeout).until_ended()
            stop.set()
            final = combine([first, *(self._settle(n, first) for n in self.nodes[1:])])
            self.reconcile(final)
            return final is RunState.FINISHED
        except KeyboardInterrupt:
            _logger.error("interrupted: cancelling run %s", self.run_id)
            self.cancel()
            raise
        finally:
            stop.set()
            self.end()

    def _watch_peers(self, stop: threading.Event) -> None:
        """A failed node leaves the others blocked in collectives: stop them, run FAILED."""
        while not stop.wait(self.watch_interval):
            for node in self.nodes[1:]:
                try:
                    state = node.state()
                except RemoteError:
                    continue  # unreachable for now; node 0's stream decides
                if state in (RunState.FAILED, RunState.LOST):
                    _logger.error("%s on %s ended %s: stopping the other nodes", node.name,
                                  node.runner.name, state.value)
                    self.cancel_nodes([n for n in self.nodes if n is not node], RunState.FAILED)
                    return

    def _settle(self, node: Node, first: RunState) -> RunState:
        """Other nodes end with node 0 (torchrun's exit barrier); stop stragglers."""
        patience = SETTLE_S if first is RunState.FINISHED else SETTLE_AFTER_FAILURE_S
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            try:
                state = node.state()
            except RemoteError:
                state = RunState.UNKNOWN
            if state.is_terminal():
                return state
            time.sleep(1)
        _logger.warning("%s on %s still running after node0 ended; cancelling it",
                        node.name, node.runner.name)
        node.cancel(self.run_id)
        return RunState.KILLED if first is RunState.KILLED else RunState.FAILED

    def end(self) -> None:
        """Run ``on_end`` (once)."""
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end()

    def reconcile(self, final: RunState) -> None:
        """End the MLflow run with ``final`` if nobody did, keeping what output we can get."""
        if not final.is_terminal():
            return
        self._stop_lost_nodes()
        mlflow_client = client(self.tracking_uri)
        if mlflow_client.get_run(self.run_id).info.status in TERMINAL:
            return
        self._upload_logs(mlflow_client)
        end_run_if_running(mlflow_client, self.run_id, final.mlflow_status)

    def _stop_lost_nodes(self) -> None:
        """A node whose supervisor died unrecorded may still have processes (a trainer that
        would end the run FINISHED later): kill them before the run is declared FAILED."""
        for node in self.nodes:
            try:
                if node.state() is RunState.LOST:
                    _logger.warning("%s on %s: its supervisor is gone; killing what is left of "
                                    "it", node.name, node.runner.name)
                    node.cancel(self.run_id, RunState.FAILED)
            except RemoteError as exc:
                _logger.warning("%s", exc)

    def _upload_logs(self, mlflow_client) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for node in self.nodes:
                try:
                    data = node.read_log()
                except RemoteError as exc:
                    _logger.warning("could not fetch %s's log: %s", node.name, exc)
                    continue
                path = Path(tmp) / f"{node.name}.log"
                path.write_bytes(data)
                mlflow_client.log_artifact(self.run_id, str(path), "fowlflow-logs")

    def cancel_nodes(self, nodes: list[Node], state: RunState = RunState.KILLED) -> list[str]:
        """Stop ``nodes``; the errors of those that could not be reached (also logged)."""
        errors = []
        for node in nodes:  # first tell every node, then stop them
            try:
                node.mark_cancel(self.run_id, state)
            except RemoteError as exc:
                _logger.warning("%s", exc)
        for node in nodes:
            try:
                node.cancel(self.run_id, state)
            except RemoteError as exc:
                _logger.warning("%s", exc)
                errors.append(str(exc))
        return errors

    def cancel(self) -> None:
        """Stop every process of the run on every node; the MLflow run ends KILLED."""
        errors = self.cancel_nodes(self.nodes)
        try:
            self.reconcile(RunState.KILLED)
        finally:
            self.end()
        if errors:
            raise RemoteError("cancel did not reach every node:\n" + "\n".join(errors))


def finish_submit(submitted: SupervisedRun, wait: bool, synchronous: bool) -> SupervisedRun:
    """Block and stream unless told not to (``"wait": false``) or MLflow will wait itself.

    ``mlflow run -b PLUGIN`` never calls ``SubmittedRun.wait()``, so a backend waits inside
    ``run()``; ``mlflow.projects.run(..., synchronous=True)`` calls ``wait()`` itself.

    Raises:
        RemoteError: the run did not finish; carries the tail of its output. ``mlflow run``
            shows the message and exits with status 1.
    """
    run_id = submitted.run_id
    if synchronous:
        return submitted
    if not wait:
        submitted.end()
        _logger.info("=== run %s launched; follow it with `fowlflow attach %s`, stop it with "
                     "`fowlflow cancel %s` ===", run_id, run_id, run_id)
        return submitted
    if submitted.wait():
        _logger.info("=== run %s finished ===", run_id)
        return submitted
    raise RemoteError(failure_summary(client(submitted.tracking_uri), run_id, submitted.nodes,
                                      submitted.get_status()))
