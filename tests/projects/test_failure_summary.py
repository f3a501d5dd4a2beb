"""The message of a run that did not finish, from real node logs (a LocalRunner node's files)
and a real SQLite store: the cause first, a hint for gloo on loopback, whole lines after.

The end-to-end form (``-P data=/nonexistent`` under torchrun) is
tests/projects/test_torchrun.py::test_failure_summary_shows_the_cause_first_then_whole_lines.
"""

from __future__ import annotations

import sys

from fowlflow.projects.failure_summary import NETWORK_HINT, TAIL_BYTES, failure_summary
from fowlflow.projects.nodes import Node
from fowlflow.projects.runners import LocalRunner
from fowlflow.projects.torchrun import SUPERVISOR


def _node(tmp_path, name: str, log: str) -> Node:
    node = Node(LocalRunner(), str(tmp_path), name, sys.executable, SUPERVISOR)
    (tmp_path / f"{name}.log").write_text(log)
    return node


def test_cause_then_first_error_line_then_whole_lines(local_store, tmp_path):
    client = local_store.client
    run_id = client.create_run("0").info.run_id
    client.set_tag(run_id, "error", "DataError: /nonexistent does not exist")
    noise = "".join(f"torchrun noise line {i} " + "x" * 40 + "\n" for i in range(200))
    node0 = _node(tmp_path, "node0", "fowlflow: error: /nonexistent does not exist\n" + noise)
    node1 = _node(tmp_path, "node1", "[rank1]: Gloo connectFullMesh failed with ... "
                                     "remote=[127.0.0.1]:41231\n")
    message = failure_summary(client, run_id, [node0, node1], "FAILED")
    lines = message.splitlines()
    assert lines[0] == f"run {run_id} ended FAILED"
    assert lines[1] == "cause: DataError: /nonexistent does not exist"
    assert lines[2] == "(node0) fowlflow: error: /nonexistent does not exist"
    assert lines[3] == f"hint: {NETWORK_HINT}"
    tail = message.split("fowlflow-logs/):\n", 1)[1]
    assert tail.startswith("torchrun noise line ") and len(tail) < TAIL_BYTES
    assert tail.rstrip().endswith("torchrun noise line 199 " + "x" * 40)


def test_without_a_recorded_cause_the_tail_still_comes(local_store, tmp_path):
    client = local_store.client
    run_id = client.create_run("0").info.run_id
    node0 = _node(tmp_path, "node0", "rank 0 step 1 sum 1\n")
    message = failure_summary(client, run_id, [node0], "KILLED")
    assert "cause:" not in message and "hint:" not in message
    assert message.endswith("fowlflow-logs/):\nrank 0 step 1 sum 1")
