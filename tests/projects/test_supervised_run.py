"""``SupervisedRun`` over real supervisors on this machine, without the ``mlflow`` CLI.

A two-"node" run where node 1 fails and node 0 would never notice (a rank that does not reach
the next collective, as with NCCL): the client's watchdog must stop node 0, and the run must
end FAILED, not hang and not KILLED.
"""

from __future__ import annotations

import json
import sys

import mlflow

from fowlflow.projects.common import run_env, write_env_file
from fowlflow.projects.runners import LocalRunner
from fowlflow.projects.submitted import Node, RunState, SupervisedRun
from fowlflow.projects.torchrun import SUPERVISOR
from tests.projects.helpers import marked_processes


def _start(node: Node, run_id: str, env: dict, argv: list[str], finalize: bool) -> None:
    write_env_file(node.runner, node, env)
    out = node.runner.run(node.sup("start", "--run-id", run_id,
                                   "--finalize" if finalize else "--upload-log", "--", *argv))
    assert json.loads(out.stdout)["pid"] > 0


def test_a_failed_node_stops_the_others_and_the_run_fails(tracking_uri, tmp_path):
    exp = mlflow.create_experiment("watchdog")
    run_id = mlflow.MlflowClient().create_run(exp).info.run_id
    env = run_env(run_id, exp, tracking_uri)
    runner = LocalRunner()
    nodes = [Node(runner, str(tmp_path / "runs" / run_id), f"node{k}", sys.executable,
                  SUPERVISOR) for k in range(2)]
    _start(nodes[0], run_id, env, [sys.executable, "-c", "import time; time.sleep(600)"], True)
    _start(nodes[1], run_id, env,
           [sys.executable, "-c", "import time; time.sleep(1); print('node1 dies'); exit(3)"],
           False)
    submitted = SupervisedRun(run_id, nodes, stream=False, watch_interval=1)
    assert submitted.wait() is False
    assert [submitted.node_state(n) for n in nodes] == [RunState.FAILED, RunState.FAILED]
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FAILED"
    assert not marked_processes(run_id)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "fowlflow-logs")}
    assert artifacts == {"fowlflow-logs/node0.log", "fowlflow-logs/node1.log"}
