"""The client side of the supervisor (``supervise.py``): one :class:`Node` per supervised command.

A node is where one command runs (a :class:`~fowlflow.projects.runners.Runner`, a run folder,
a name) and how to talk to its supervisor there. Everything the backends and the ``fowlflow``
commands ask a supervisor goes through these methods::

    node = Node(runner, "/home/a/.fowlflow/runs/ID", "node0", "python3",
                "/home/a/.fowlflow/runs/ID/fowlflow-supervise.py")
    node.write_env({"MLFLOW_RUN_ID": "ID", ...})      # 0600, through stdin
    pid = node.start("ID", ["python", "train.py"], cwd=".../project", finalize=True)
    node.wait_started()
    node.state()                                       # RunState.RUNNING
    node.cancel("ID")                                  # the supervisor records KILLED
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass

from fowlflow.errors import RemoteError
from fowlflow.projects.runners import Runner


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

    runner: Runner
    run_dir: str
    name: str
    python: str
    supervisor: str

    @property
    def log_path(self) -> str:
        return f"{self.run_dir}/{self.name}.log"

    def sup(self, command: str, *args: str) -> list[str]:
        """The argv of one supervisor command for this node."""
        return [self.python, self.supervisor, command, "--run-dir", self.run_dir,
                "--name", self.name, *args]

    def write_env(self, env: dict) -> None:
        """The node's environment (credentials included) in a 0600 file the supervisor reads
        and deletes once its command has started."""
        self.runner.write_file(f"{self.run_dir}/{self.name}.env.json", json.dumps(env).encode())

    def start(self, run_id: str, argv: list[str], *, cwd: str = "", path_prepend: str = "",
              finalize: bool = False) -> int:
        """Start ``argv`` under a detached supervisor; returns the supervisor's pid.

        ``finalize``: the supervisor ends the MLflow run when the command ends (node 0);
        otherwise it only uploads this node's log.
        """
        out = self.runner.run(self.sup("start", "--run-id", run_id, "--cwd", cwd,
                                       "--path-prepend", path_prepend,
                                       "--finalize" if finalize else "--upload-log",
                                       "--", *argv), timeout=60).stdout
        return int(json.loads(out)["pid"])

    def state(self) -> RunState:
        """This node's state; raises RemoteError when its host can't be reached."""
        return RunState(json.loads(self.runner.run(self.sup("status"), timeout=60).stdout)
                        ["state"])

    def wait_started(self, timeout: float = 60) -> None:
        """Wait until the supervisor has recorded its pid (or already ended)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state() not in (RunState.STARTING, RunState.UNKNOWN):
                return
            time.sleep(0.2)
        raise RemoteError(f"the supervisor on {self.runner.name} did not start within "
                          f"{timeout} s; see {self.log_path}")

    def mark_cancel(self, run_id: str, state: RunState = RunState.KILLED) -> None:
        """Tell the supervisor a cancel with ``state`` is coming (before any node is stopped,
        so a node whose command dies because a peer was stopped records ``state``)."""
        self.runner.run(self.sup("cancel", "--run-id", run_id, "--state", state.value,
                                 "--mark-only"), timeout=60)

    def cancel(self, run_id: str, state: RunState = RunState.KILLED) -> None:
        """Stop this node; its supervisor records ``state`` (KILLED, or FAILED for a peer)."""
        self.runner.run(self.sup("cancel", "--run-id", run_id, "--state", state.value),
                        timeout=90)

    def read_log(self, tail_lines: int = 0) -> bytes:
        """The node's output so far (only the last ``tail_lines`` lines when given)."""
        argv = ["tail", "-n", str(tail_lines), self.log_path] if tail_lines else \
            ["cat", self.log_path]
        return self.runner.run(argv, timeout=120).stdout

    def log_tail(self, n_bytes: int) -> str:
        """The end of the output, for error messages; says why when it can't be read."""
        try:
            out = self.runner.run(["tail", "-c", str(n_bytes), self.log_path], timeout=60)
            return out.stdout.decode(errors="replace")
        except RemoteError as exc:
            return f"(log unavailable: {exc})"
