"""``SupervisedRun`` over real supervisors on this machine, without the ``mlflow`` CLI.

A two-"node" run where node 1 fails and node 0 would never notice (a rank that does not reach
the next collective, as with NCCL): the client's watchdog must stop node 0, and the run must
end FAILED, not hang and not KILLED. And the reverse: a cancel must not show a node FAILED
because its peer was stopped first.
"""

from __future__ import annotations

import sys

from fowlflow.projects.nodes import Node, RunState
from fowlflow.projects.run_lifecycle import run_env
from fowlflow.projects.runners import LocalRunner
from fowlflow.projects.submitted import SupervisedRun
from fowlflow.projects.torchrun import SUPERVISOR
from tests.net import wait_until
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


def test_a_cancelled_run_does_not_report_a_node_failed_by_the_cancel(local_store, tmp_path):
    """Node 1's command dies as soon as node 0's does (as torchrun does when its peer goes):
    cancelling the run must end every node KILLED, not node1 FAILED. Every node is told
    before any is stopped."""
    client = local_store.client
    run_id = client.create_run("0").info.run_id
    env = run_env(run_id, "0", local_store.uri)
    runner = LocalRunner()
    nodes = [Node(runner, str(tmp_path / "runs" / run_id), f"node{k}", sys.executable,
                  SUPERVISOR) for k in range(2)]
    pid_file = tmp_path / "node0.pid"
    _start(nodes[0], run_id, env, [sys.executable, "-c",
                                   f"import os, time; open({str(pid_file)!r}, 'w')"
                                   ".write(str(os.getpid())); time.sleep(600)"], True)
    _start(nodes[1], run_id, env, [sys.executable, "-c", f"""
import os, time
while not os.path.exists({str(pid_file)!r}) or not open({str(pid_file)!r}).read():
    time.sleep(0.05)
pid = int(open({str(pid_file)!r}).read())
while os.path.exists(f"/proc/{{pid}}") and open(f"/proc/{{pid}}/stat").read().split()[2] != "Z":
    time.sleep(0.05)
print("node1: my peer is gone", flush=True)
raise SystemExit(1)
"""], False)
    for node in nodes:
        node.wait_started()
    wait_until(lambda: pid_file.exists() and pid_file.read_text(), what="node0's command",
               timeout=60)
    SupervisedRun(run_id, nodes, local_store.uri, stream=False).cancel()
    assert [n.state() for n in nodes] == [RunState.KILLED, RunState.KILLED]
    assert client.get_run(run_id).info.status == "KILLED"
    assert not marked_processes(run_id)
