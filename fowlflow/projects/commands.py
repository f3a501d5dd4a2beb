"""``fowlflow ls`` and ``fowlflow logs|attach|status|cancel RUN_ID``: launched runs.

Everything comes from the run's launch record (:mod:`fowlflow.projects.launch_record`: hosts,
run dirs, supervisor), so any terminal with the same tracking URI and SSH access can do it::

    fowlflow status 6a51...          # node0: RUNNING on root@gpu-box (log /root/.fowlflow/...)
    fowlflow logs 6a51... [--tail 50]   # the output so far
    fowlflow attach 6a51...          # stream until the run ends; exit 0 iff FINISHED
    fowlflow cancel 6a51...          # kill every process on every node; run ends KILLED
    fowlflow ls [--experiment NAME] [--state RUNNING]   # launched runs (:mod:`.job_list`)
    fowlflow gc [--older-than DAYS] [--keep-last N] [--yes]   # ended runs' folders on hosts

Each command shares one SSH connection per host and closes it when it is done.
"""

from __future__ import annotations

import sys

from fowlflow.errors import RemoteError
from fowlflow.projects import job_list, run_folders
from fowlflow.projects.failure_summary import failure_summary
from fowlflow.projects.launch_record import LaunchRecord
from fowlflow.projects.nodes import RunState
from fowlflow.projects.run_lifecycle import client
from fowlflow.projects.ssh_connections import SharedConnections
from fowlflow.projects.submitted import SupervisedRun, combine


def run_from_tags(run_id: str, shared: SharedConnections) -> SupervisedRun:
    """Rebuild the ``SubmittedRun`` of a launched run from its launch record.

    Raises:
        ConfigError: the run does not exist or was not launched by a fowlflow backend.
    """
    record = LaunchRecord.load(client(None), run_id)
    return SupervisedRun(run_id, record.nodes_for(shared))


def _status(args, shared: SharedConnections) -> int:
    submitted = run_from_tags(args.run_id, shared)
    states = submitted.states()
    overall = combine(states)
    if overall.is_terminal():
        submitted.reconcile(overall)  # its processes are gone: the run must not stay RUNNING
    mlflow_status = client(None).get_run(args.run_id).info.status
    for node, state in zip(submitted.nodes, states):
        print(f"{node.name}: {state.value} on {node.runner.name} (log {node.log_path})")
    print(f"run {args.run_id}: {overall.value}; MLflow status {mlflow_status}")
    return 0


def _logs(args, shared: SharedConnections) -> int:
    node = run_from_tags(args.run_id, shared).nodes[args.node]
    sys.stdout.buffer.write(node.read_log(args.tail))
    sys.stdout.flush()
    return 0


def _attach(args, shared: SharedConnections) -> int:
    """Stream to the end; a run that did not finish says why first, as ``mlflow run`` does."""
    submitted = run_from_tags(args.run_id, shared)
    if submitted.wait():  # Ctrl-C cancels the run, as during `mlflow run`
        print(f"run {args.run_id}: {submitted.get_status()}", file=sys.stderr)
        return 0
    print(failure_summary(client(None), args.run_id, submitted.nodes, submitted.get_status()),
          file=sys.stderr)
    return 1


def _cancel(args, shared: SharedConnections) -> int:
    submitted = run_from_tags(args.run_id, shared)
    submitted.cancel()
    state = combine(submitted.states())
    print(f"run {args.run_id}: {state.value}")
    if state is RunState.RUNNING:
        raise RemoteError(f"run {args.run_id} is still running after cancel")
    return 0


def _ls(args) -> int:
    rows = job_list.launched_runs(client(None), args.experiment, args.state, args.limit)
    print(job_list.table(rows) if rows else "no runs launched by fowlflow's backends"
          + (f" in {args.experiment!r}" if args.experiment else "")
          + (f" with state {args.state}" if args.state else ""))
    return 0


def _gc(args) -> int:
    ids = list(job_list.experiments(client(None), args.experiment))
    errors = run_folders.collect(client(None), ids, args.older_than, args.keep_last,
                                 args.yes, sys.stdout) if ids else 0
    if not args.yes:
        print("(dry run: add --yes to remove these folders)")
    if errors:
        raise RemoteError(f"{errors} folder(s) could not be removed (see above)")
    return 0


def _with_connections(func):
    def handler(args) -> int:
        with SharedConnections() as shared:
            return func(args, shared)
    return handler


def register(subparsers) -> None:
    """Add ``ls``, ``status``, ``logs``, ``attach`` and ``cancel`` to the ``fowlflow`` CLI."""
    text = "list the runs fowlflow's backends launched (from the tracking store), newest first"
    sp = subparsers.add_parser("ls", help=text, description=text)
    sp.add_argument("--experiment", metavar="NAME", help="only this experiment's runs")
    sp.add_argument("--state", choices=job_list.STATES, help="only runs in this MLflow state")
    sp.add_argument("--limit", type=int, default=50, metavar="N", help="at most N runs")
    sp.set_defaults(func=_ls)
    text = ("remove the run folders that ended runs left on their hosts (a dry run unless "
            "--yes); environments stay")
    sp = subparsers.add_parser("gc", help=text, description=text)
    sp.add_argument("--experiment", metavar="NAME", help="only this experiment's runs")
    sp.add_argument("--older-than", type=float, default=7, metavar="DAYS",
                    help="only runs that ended more than DAYS days ago (default 7)")
    sp.add_argument("--keep-last", type=int, default=0, metavar="N",
                    help="keep the folders of the newest N ended runs")
    sp.add_argument("--yes", action="store_true", help="remove (default: only list)")
    sp.set_defaults(func=_gc)
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
        sp.set_defaults(func=_with_connections(funcs[name]))
