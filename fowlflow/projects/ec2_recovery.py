"""Spot interruptions: replace the instances that went away and resume the same run.

    lost = lost_instances(ec2, instances)          # those no longer pending/running
    sub = resumed_submission(sub, run_id, tracking_uri)   # same run id, -P resume=<checkpoint>

When a run fails and an instance of its cluster has ended (a spot interruption, or any
termination fowlflow did not do), :class:`fowlflow.projects.ec2_launch.Ec2Run` launches a
replacement for each lost node and starts the entry point again *in the same run*; when the
entry point takes a ``resume`` parameter and the run has the checkpoint artifact
(``-P checkpoint_artifact=auto``, on for backend launches), it resumes from
``runs:/<run id>/checkpoints/checkpoint.pt``, so the finished epochs are not trained, nor
logged, again. At most ``max_recoveries`` times; the run's tags ``fowlflow.ec2.recoveries``
and ``fowlflow.ec2.recovery.<n>`` record each.
"""

from __future__ import annotations

import dataclasses
import logging

from fowlflow.projects.run_lifecycle import Submission, client

_logger = logging.getLogger(__name__)
CHECKPOINT = "checkpoints/checkpoint.pt"
GONE = ("shutting-down", "terminated", "stopping", "stopped")


def lost_instances(ec2, instances: list[dict]) -> list[tuple[int, dict]]:
    """``(rank, instance)`` for each instance that has ended, with its current state."""
    ids = [i["InstanceId"] for i in instances]
    now = {i["InstanceId"]: i for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]
           for i in r["Instances"]}
    return [(rank, now[iid]) for rank, iid in enumerate(ids)
            if iid in now and now[iid]["State"]["Name"] in GONE]


def _takes_resume(sub: Submission) -> bool:
    from mlflow.projects.utils import fetch_and_validate_project, load_project

    work_dir = fetch_and_validate_project(sub.project_uri, sub.version, sub.entry_point,
                                          sub.params)
    return "resume" in load_project(work_dir).get_entry_point(sub.entry_point).parameters


def resumed_submission(sub: Submission, run_id: str) -> Submission:
    """``sub`` again, into run ``run_id``, resuming from its checkpoint when there is one."""
    params = dict(sub.params)
    saved = [a.path for a in client(sub.tracking_uri).list_artifacts(run_id, "checkpoints")]
    if CHECKPOINT in saved and _takes_resume(sub):
        params["resume"] = f"runs:/{run_id}/{CHECKPOINT}"
    else:
        _logger.warning("run %s has no %s artifact (or the entry point takes no resume "
                        "parameter): it starts again from the beginning", run_id, CHECKPOINT)
    return dataclasses.replace(sub, params=params, mlflow_keys=dataclasses.replace(
        sub.mlflow_keys, run_id=run_id))


def describe_loss(lost: list[tuple[int, dict]]) -> str:
    return ", ".join(f"node{rank} {inst['InstanceId']} ({inst['State']['Name']}: "
                     f"{inst.get('StateReason', {}).get('Message', 'no reason given')})"
                     for rank, inst in lost)
