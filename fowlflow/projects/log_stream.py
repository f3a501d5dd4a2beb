"""Follow one node's log until the node ends, re-attaching after a dropped connection.

The supervisor's ``follow`` command copies the log from a byte offset; the offset is kept
here, so a re-attach neither loses nor repeats output::

    stream = LogStream(node, run_id, out=sys.stdout.buffer, reconnect_timeout=300)
    final = stream.until_ended()        # RunState.FINISHED / FAILED / KILLED / LOST
"""

from __future__ import annotations

import logging
import subprocess
import time

from fowlflow.errors import RemoteError
from fowlflow.projects.nodes import Node, RunState

_logger = logging.getLogger(__name__)
RETRY_S = 2.0  # between re-attach attempts, and between polls when not streaming


class LogStream:
    """Streams (``stream=True``) or polls one node until it ends."""

    def __init__(self, node: Node, run_id: str, out, *, stream: bool = True,
                 reconnect_timeout: float = 300):
        self.node = node
        self.run_id = run_id
        self.out = out
        self.stream = stream
        self.reconnect_timeout = reconnect_timeout
        self.offset = 0

    def _follow_once(self) -> int:
        proc = self.node.runner.popen(self.node.sup("follow", "--offset", str(self.offset)),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL)
        try:
            while chunk := proc.stdout.read1(65536):
                self.offset += len(chunk)
                self.out.write(chunk)
                self.out.flush()
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()

    def _step(self) -> RunState | None:
        """Stream (or wait) once; the node's final state, or None while it runs."""
        if self.stream and self._follow_once() == 255:
            raise RemoteError(f"connection to {self.node.runner.name} dropped")
        state = self.node.state()
        if state.is_terminal():
            return state
        if state is RunState.UNKNOWN:
            raise RemoteError(f"{self.node.name} on {self.node.runner.name} has no record of "
                              f"run {self.run_id} in {self.node.run_dir}")
        if not self.stream:
            time.sleep(RETRY_S)
        return None

    def until_ended(self) -> RunState:
        """Block until the node ended; raises RemoteError after ``reconnect_timeout`` s
        without contact."""
        lost_since = None
        while True:
            try:
                state = self._step()
                lost_since = None
                if state is not None:
                    return state
            except RemoteError as exc:
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > self.reconnect_timeout:
                    raise RemoteError(
                        f"lost contact with {self.node.runner.name} for over "
                        f"{self.reconnect_timeout} s: {exc}\n  the run may still be running "
                        f"there; re-attach with `fowlflow attach {self.run_id}` or stop it with "
                        f"`fowlflow cancel {self.run_id}`") from exc
                _logger.warning("%s; re-attaching in %.0f s", str(exc).splitlines()[0], RETRY_S)
                time.sleep(RETRY_S)
