"""``fowlflow logs|attach|status|cancel RUN_ID``: runs launched by a fowlflow backend.

Everything comes from the run's ``fowlflow.launch`` tag (hosts, run dirs, supervisor), so any
terminal with the same tracking URI and SSH access can do it::

    fowlflow status 6a51...          # node0: RUNNING on root@gpu-box (log /root/.fowlflow/...)
    fowlflow logs 6a51... [--tail 50]   # the output so far
    fowlflow attach 6a51...          # stream until the run ends; exit 0 iff FINISHED
    fowlflow cancel 6a51...          # kill every process on every node; run ends KILLED
"""

from __future__ import annotations

import json
import sys

from fowlflow.errors import ConfigError, RemoteError
from fowlflow.projects.common import LAUNCH_TAG
from fowlflow.projects.config import HostSpec
from fowlflow.projects.runners import LocalRunner, SshRunner
from fowlflow.projects.submitted import Node, RunState, SupervisedRun


def run_from_tags(run_id: str, stream: bool = True) -> SupervisedRun:
    """Rebuild the ``SubmittedRun`` of a launched run from its tags.

    Raises:
        ConfigError: the run does not exist or was not launched by a fowlflow backend.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(f"run {run_id!r} not found in the tracking store "
                          f"({exc.message.splitlines()[0]}); check MLFLOW_TRACKING_URI") from exc
    record = run.data.tags.get(LAUNCH_TAG)
    if record is None:
        raise ConfigError(f"run {run_id} has no {LAUNCH_TAG} tag: it was not launched with "
                          "`mlflow run -b torchrun|ssh`, so there is nothing to attach to")
    record = json.loads(record)
    ssh = record.get("ssh", {})
    nodes = []
    for n in record["nodes"]:
        if n["host"] is None:
            runner = LocalRunner()
        else:
            runner = SshRunner(HostSpec(**n["host"]),
                               strict_host_key_checking=ssh.get("strict_host_key_checking",
                                                                True),
                               known_hosts_file=ssh.get("known_hosts_file"),
                               connect_timeout=ssh.get("connect_timeout", 10),
                               extra_options=tuple(ssh.get("ssh_options", ())))
        nodes.append(Node(runner, n["run_dir"], n["name"], n["python"], n["supervisor"]))
    return SupervisedRun(run_id, nodes, stream=stream)


def _status(args) -> int:
    from mlflow.tracking import MlflowClient

    submitted = run_from_tags(args.run_id)
    states = submitted.states()
    mlflow_status = MlflowClient().get_run(args.run_id).info.status
    overall = submitted.combine(states)
    if overall.is_terminal() and mlflow_status == "RUNNING":
        submitted.reconcile(overall)  # its process is gone: the run must not stay RUNNING
        mlflow_status = MlflowClient().get_run(args.run_id).info.status
    for node, state in zip(submitted.nodes, states):
        print(f"{node.name}: {state.value} on {node.runner.name} (log {node.log_path})")
    print(f"run {args.run_id}: {overall.value}; MLflow status {mlflow_status}")
    return 0


def _logs(args) -> int:
    submitted = run_from_tags(args.run_id)
    node = submitted.nodes[args.node]
    argv = ["tail", "-n", str(args.tail), node.log_path] if args.tail else ["cat", node.log_path]
    sys.stdout.buffer.write(node.runner.run(argv, timeout=120).stdout)
    sys.stdout.flush()
    return 0


def _attach(args) -> int:
    submitted = run_from_tags(args.run_id)
    ok = submitted.wait()  # Ctrl-C cancels the run, as during `mlflow run`
    print(f"run {args.run_id}: {submitted.get_status()}", file=sys.stderr)
    return 0 if ok else 1


def _cancel(args) -> int:
    submitted = run_from_tags(args.run_id)
    submitted.cancel()
    state = submitted.combine(submitted.states())
    print(f"run {args.run_id}: {state.value}")
    if state is RunState.RUNNING:
        raise RemoteError(f"run {args.run_id} is still running after cancel")
    return 0


def register(subparsers) -> None:
    """Add ``status``, ``logs``, ``attach`` and ``cancel`` to the ``fowlflow`` CLI."""
    helps = {"status": "where a launched run stands, per node (ends a run whose processes died)",
             "logs": "print a launched run's output so far",
             "attach": "stream a launched run's output until it ends (Ctrl-C cancels it)",
             "cancel": "stop every process of a launched run; the run ends KILLED"}
    funcs = {"status": _status, "logs": _logs, "attach": _attach, "cancel": _cancel}
    for name, text in helps.items():
        sp = subparsers.add_parser(name, help=text, description=text)
        sp.add_argument("run_id", help="the MLflow run id")
        if name == "logs":
            sp.add_argument("--tail", type=int, default=0, metavar="N",
                            help="only the last N lines")
            sp.add_argument("--node", type=int, default=0, help="which node (default 0)")
        sp.set_defaults(func=funcs[name])
