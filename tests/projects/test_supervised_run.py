"""``SupervisedRun`` over real supervisors on this machine, without the ``mlflow`` CLI.

A two-"node" run where node 1 fails and node 0 would never notice (a rank that does not reach
the next collective, as with NCCL): the client's watchdog must stop node 0, and the run must
end FAILED, not hang and not KILLED.
"""

from __future__ import annotations

import sys

from fowlflow.projects.nodes import Node, RunState
from fowlflow.projects.run_lifecycle import run_env
from fowlflow.projects.runners import LocalRunner
from fowlflow.projects.submitted import SupervisedRun
from fowlflow.projects.torchrun import SUPERVISOR
from tests.projects.helpers import marked_processes


def _start(node: Node, run_id: str, env: dict, argv: list[str], finalize: bool) -> None:
    node.write_env(env)
    assert node.start(run_id, argv, finalize=finalize) > 0


def test_a_failed_node_stops_the_others_and_the_run_fails(local_store, tmp_path):
    client = local_store.client
    exp = client.create_experiment("watchdog")
    run_id = client.create_run(exp).info.run_id
    env = run_env(run_id, exp, local_store.uri)
    runner = LocalRunner()
    nodes = [Node(runner, str(tmp_path / "runs" / run_id), f"node{k}", sys.executable,
                  SUPERVISOR) for k in range(2)]
    _start(nodes[0], run_id, env, [sys.executable, "-c", "import time; time.sleep(600)"], True)
    _start(nodes[1], run_id, env,
           [sys.executable, "-c", "import time; time.sleep(1); print('node1 dies'); exit(3)"],
           False)
    submitted = SupervisedRun(run_id, nodes, local_store.uri, stream=False, watch_interval=1)
    assert submitted.wait() is False
    assert [n.state() for n in nodes] == [RunState.FAILED, RunState.FAILED]
    assert client.get_run(run_id).info.status == "FAILED"
    assert not marked_processes(run_id)
    artifacts = {a.path for a in client.list_artifacts(run_id, "fowlflow-logs")}
    assert artifacts == {"fowlflow-logs/node0.log", "fowlflow-logs/node1.log"}
