"""Spot interruptions: replace the instances that went away and resume the same run.

    lost = lost_instances(ec2, instances)          # those no longer pending/running
    sub = resumed_submission(sub, run_id)          # same run id, -P resume=<checkpoint>
    watch = InterruptionWatch(ec2, instances, 10, on_notice)   # while the run is on
    watch.start(); ...; watch.stop()

When a run fails and an instance of its cluster has ended (a spot interruption, or any
termination fowlflow did not do), :class:`fowlflow.projects.ec2_launch.Ec2Run` launches a
replacement for each lost node and starts the entry point again *in the same run*; when the
entry point takes a ``resume`` parameter and the run has the checkpoint artifact
(``-P checkpoint_artifact=auto``, on for backend launches), it resumes from
``runs:/<run id>/checkpoints/checkpoint.pt``, so the finished epochs are not trained, nor
logged, again. At most ``max_recoveries`` times; the run's tags ``fowlflow.ec2.recoveries``
and ``fowlflow.ec2.recovery.<n>`` record each.

What is watched, from the launching side, while a run is on (:class:`InterruptionWatch`, every
``watch_seconds``): each instance's state in EC2 (``stopping``, ``shutting-down``,
``terminated``, ``stopped``) and, for a spot instance, its spot request's status code
(``marked-for-termination``, ``instance-terminated-by-price``, ...: the two-minute notice as EC2
reports it). The first report is logged, tagged on the run (``fowlflow.ec2.interrupted``) and
the replacement launched right then, while the trainer may still be finishing its epoch; with
several nodes, the other nodes are stopped (FAILED) at once, since they would wait in their
collectives for the lost one, and the whole job restarts on every node. Not watched: the
instance metadata's ``spot/instance-action`` (only visible on the instance) and rebalance
recommendations. The run itself is given up, and resumed, when the SSH stream to node 0 ends
or gives up (``reconnect_timeout``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

from fowlflow.projects.run_lifecycle import Submission, client

_logger = logging.getLogger(__name__)
CHECKPOINT = "checkpoints/checkpoint.pt"
GONE = ("shutting-down", "terminated", "stopping", "stopped")
# Spot request status codes that mean the instance is about to go, or went (AWS's list).
NOTICE_CODES = ("marked-for-termination", "marked-for-stop", "marked-for-hibernation",
                "instance-terminated-by-price", "instance-terminated-by-service",
                "instance-terminated-no-capacity", "instance-terminated-capacity-oversubscribed",
                "instance-terminated-launch-group-constraint")


def lost_instances(ec2, instances: list[dict]) -> list[tuple[int, dict]]:
    """``(rank, instance)`` for each instance that has ended, with its current state."""
    ids = [i["InstanceId"] for i in instances]
    now = {i["InstanceId"]: i for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]
           for i in r["Instances"]}
    return [(rank, now[iid]) for rank, iid in enumerate(ids)
            if iid in now and now[iid]["State"]["Name"] in GONE]


def interruptions(ec2, instances: list[dict]) -> list[tuple[int, dict, str]]:
    """``(rank, instance, what EC2 says)`` for each instance that has ended or whose spot
    request says it is about to."""
    ids = [i["InstanceId"] for i in instances]
    now = {i["InstanceId"]: i for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]
           for i in r["Instances"]}
    requests = {i["SpotInstanceRequestId"]: iid for iid, i in now.items()
                if i.get("SpotInstanceRequestId")}
    codes = {}
    if requests:
        try:
            replies = ec2.describe_spot_instance_requests(
                SpotInstanceRequestIds=list(requests))["SpotInstanceRequests"]
        except Exception as exc:  # e.g. no ec2:DescribeSpotInstanceRequests: states only
            _logger.debug("describe_spot_instance_requests: %s", exc)
            replies = []
        for req in replies:
            codes[requests[req["SpotInstanceRequestId"]]] = req.get("Status", {}).get("Code")
    found = []
    for rank, iid in enumerate(ids):
        inst = now.get(iid)
        if inst is None:
            continue
        state = inst["State"]["Name"]
        if state in GONE:
            reason = inst.get("StateReason", {}).get("Message", "no reason given")
            found.append((rank, inst, f"state {state} ({reason})"))
        elif codes.get(iid) in NOTICE_CODES:
            found.append((rank, inst, f"spot request {codes[iid]}"))
    return found


class InterruptionWatch:
    """Polls :func:`interruptions` every ``interval`` s on a thread until :meth:`stop`; calls
    ``on_notice(rank, instance, what)`` once per instance (``interval`` 0: does nothing)."""

    def __init__(self, ec2, instances: list[dict], interval: float,
                 on_notice: Callable[[int, dict, str], None]):
        self.ec2, self.instances, self.interval = ec2, list(instances), interval
        self.on_notice = on_notice
        self.noticed: dict[int, str] = {}  # rank -> what EC2 said, and when
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ec2-interruptions",
                                        daemon=True)

    def start(self) -> "InterruptionWatch":
        if self.interval > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                found = interruptions(self.ec2, self.instances)
            except Exception as exc:  # EC2 unreachable for a moment: the SSH stream decides
                _logger.warning("could not ask EC2 about the instances: %s", exc)
                continue
            for rank, inst, what in found:
                if rank in self.noticed or self._stop.is_set():
                    continue
                self.noticed[rank] = f"{what} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
                try:
                    self.on_notice(rank, inst, what)
                except Exception as exc:  # the recovery after the run fails tries again
                    _logger.warning("acting on node%d's interruption failed: %s", rank, exc)


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
