"""What a run that did not finish says first: its cause, then the end of its output.

A failed torchrun ends with a page of launcher noise (``ChildFailedError``, the worker table)
that hides the trainer's own message further up. :func:`failure_summary` puts first what the
run recorded about its failure::

    failure_summary(client, run_id, nodes, "FAILED")
    # cause: DataError: /nonexistent does not exist ...     (the run's `error` tag)
    # (node0) fowlflow: error: /nonexistent does not exist   (first failing node's last error)
    # end of node0's output: <whole lines only>

and a hint for known network failures (gloo/NCCL connecting to loopback).
"""

from __future__ import annotations

import logging
import re

from fowlflow.projects.nodes import Node

_logger = logging.getLogger(__name__)
ERROR_TAG = "error"  # set by the trainer (fowlflow.trainer.train) when it fails
ERROR_LINE = re.compile(r"^.*\bfowlflow: error: .*$", re.MULTILINE)
SEARCH_BYTES = 256 * 1024  # how much of each log's end is searched for an error line
TAIL_BYTES = 1500
_LOOPBACK_MESH = re.compile(r"(connectFullMesh|Gloo connect).*\b127\.\d+\.\d+\.\d+")
NETWORK_HINT = ("the nodes tried to reach each other on a loopback address (the host name "
                "resolves to 127.0.x.1 in /etc/hosts); fix: set \"env\": "
                "{\"GLOO_SOCKET_IFNAME\": \"<interface>\", \"NCCL_SOCKET_IFNAME\": "
                "\"<interface>\"} to the interface that reaches the other hosts (`ip -o route "
                "get <other host>` on a host shows it), or correct /etc/hosts")


def whole_lines(text: str) -> str:
    """``text`` from its first line boundary on (a tail cut by bytes starts mid-line)."""
    _, newline, rest = text.partition("\n")
    return rest if newline and rest.strip() else text


def failure_summary(client, run_id: str, nodes: list[Node], state: str) -> str:
    """The message for a run that ended ``state``: cause first, then whole lines of output."""
    parts = []
    try:
        cause = client.get_run(run_id).data.tags.get(ERROR_TAG)
    except Exception as exc:  # the summary must not hide the failure behind another one
        _logger.warning("could not read run %s's tags: %s", run_id, exc)
        cause = None
    if cause:
        parts.append(f"cause: {cause}")
    logs = [(node, node.log_tail(SEARCH_BYTES)) for node in nodes]
    for node, text in logs:
        lines = ERROR_LINE.findall(text)
        if lines:
            parts.append(f"({node.name}) {lines[-1].strip()}")
            break
    if any(_LOOPBACK_MESH.search(text) for _, text in logs):
        parts.append(f"hint: {NETWORK_HINT}")
    tail = whole_lines(logs[0][1][-TAIL_BYTES:]).rstrip()
    parts.append(f"end of {nodes[0].name}'s output (all of it is in the artifact "
                 f"fowlflow-logs/):\n{tail}")
    return f"run {run_id} ended {state}\n" + "\n".join(parts)
