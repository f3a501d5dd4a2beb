"""``fowlflow gc``: remove the run folders that ended runs left on their hosts.

Each launched run keeps ``<remote_dir>/runs/<run id>/`` on every host (the shipped project,
its outputs, the logs; the torchrun backend: ``~/.fowlflow/runs/<run id>/``). Its logs are
already artifacts of the run. Environments (``<remote_dir>/envs/``) are shared by runs and
are never touched::

    fowlflow gc                          # dry run: what would go (ended > 7 days ago)
    fowlflow gc --older-than 0 --keep-last 5 --yes

Runs of the ``ec2`` backend are left out: their folders are on the instances' disks and go
with them. Only runs whose MLflow status is FINISHED, FAILED or KILLED are considered, only
folders the launch record names and whose last part is the run id are removed, and the run
gets the tag ``fowlflow.run_folders_removed`` so the next ``gc`` skips it.
"""

from __future__ import annotations

import time

from fowlflow.errors import RemoteError
from fowlflow.projects.job_list import LAUNCHED
from fowlflow.projects.launch_record import LaunchRecord
from fowlflow.projects.ssh_connections import SharedConnections

REMOVED_TAG = "fowlflow.run_folders_removed"
ENDED = ("FINISHED", "FAILED", "KILLED")
# backends whose run folders live on the instances' own disks: they go with the instances
# (``fowlflow ec2 down``; a cluster that is not kept is removed when its run ends); asking a
# terminated instance over ssh would only time out
ON_INSTANCES = ("ec2",)


def ended_runs(client, experiment_ids: list[str], older_than_days: float,
               keep_last: int) -> list:
    """Ended launched runs, newest first, minus the newest ``keep_last``, ended more than
    ``older_than_days`` ago, whose folders were not removed yet."""
    runs = [r for r in client.search_runs(experiment_ids, LAUNCHED, max_results=5000,
                                          order_by=["attributes.start_time DESC"])
            if r.info.status in ENDED]
    cutoff_ms = (time.time() - older_than_days * 86400) * 1000
    return [r for r in runs[keep_last:]
            if REMOVED_TAG not in r.data.tags and (r.info.end_time or 0) <= cutoff_ms
            and r.data.tags.get("fowlflow.backend") not in ON_INSTANCES]


def folders(client, run_id: str, shared: SharedConnections) -> list:
    """``(node, run_dir)`` of the run's nodes; only folders named for the run."""
    nodes = LaunchRecord.load(client, run_id).nodes_for(shared)
    return [(n, n.run_dir) for n in nodes if n.run_dir.rstrip("/").endswith(f"/{run_id}")]


def collect(client, experiment_ids: list[str], older_than_days: float, keep_last: int,
            remove: bool, out) -> int:
    """Print (and with ``remove``, delete) each folder; the number of errors."""
    errors = 0
    with SharedConnections() as shared:
        for run in ended_runs(client, experiment_ids, older_than_days, keep_last):
            run_id = run.info.run_id
            removed_all = True
            for node, run_dir in folders(client, run_id, shared):
                where = f"{node.runner.name}:{run_dir}"
                if not remove:
                    print(f"would remove {where} (run {run_id}, {run.info.status})", file=out)
                    continue
                try:
                    node.runner.run(["rm", "-rf", "--", run_dir], timeout=300)
                    print(f"removed {where} (run {run_id})", file=out)
                except RemoteError as exc:
                    errors += 1
                    removed_all = False
                    print(f"could not remove {where}: {exc}", file=out)
            if remove and removed_all:
                client.set_tag(run_id, REMOVED_TAG, time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                   time.gmtime()))
    return errors
