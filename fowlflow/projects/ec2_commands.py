"""``fowlflow ec2 ls | down NAME | gc``: the clusters the ec2 backend made, by their tags.

    fowlflow ec2 ls                    # clusters: instances, state, age, idle, price, keep, run
    fowlflow ec2 down gpu-cluster      # terminate it, delete its security group and key pair
    fowlflow ec2 gc [--yes]            # what belongs to no live run or kept cluster (dry run)

Each takes ``--region`` (else boto3's default region). A cluster is garbage when it is not kept
and its run has ended (the run id tag, looked up in the tracking store); when it has no run
id and was created more than ``--grace-minutes`` ago (a client that died while provisioning);
or when only its security group and key pair are left (its instances stopped themselves).
A run this tracking store does not know counts as live.

``ls``'s IDLE is what the launching side knows: the time since the cluster's last run
(its ``fowlflow:run-id`` tag) ended in the tracking store, ``run on`` while that run is not
ended, the time since the newest instance's launch when the cluster never ran one, ``?`` when
the store does not know the run. AUTOSTOP is the watchdog's limit (``fowlflow:idle-minutes``
tag); the watchdog on the instance counts from the last fowlflow process it saw there.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field

from fowlflow.errors import ConfigError
from fowlflow.projects.ec2_cloud import aws_session
from fowlflow.projects.ec2_cluster import CLUSTER_TAG, LIVE_STATES, Cluster, tags_of
from fowlflow.projects.ec2_config import TAG_PREFIX, state_dir
from fowlflow.projects.ec2_prices import hourly_price


@dataclass
class ClusterInfo:
    """What the tags say about one cluster."""

    name: str
    instances: list[dict] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # security groups, key pairs
    created: list[float] = field(default_factory=list)  # each resource's creation time

    def add(self, resource: dict, kind: str) -> None:
        if kind == "instance":
            self.instances.append(resource)
        else:
            self.other.append(resource.get("GroupId") or resource["KeyName"])
        self.created.append(float(tags_of(resource).get(TAG_PREFIX + "created", time.time())))

    @property
    def tags(self) -> dict:
        return tags_of(self.instances[0]) if self.instances else {}

    @property
    def kept(self) -> bool:
        return self.tags.get(TAG_PREFIX + "keep") == "true"

    @property
    def run_id(self) -> str | None:
        return self.tags.get(TAG_PREFIX + "run-id")

    @property
    def autostop(self) -> str:
        minutes = self.tags.get(TAG_PREFIX + "idle-minutes")
        return "-" if minutes is None else "off" if minutes == "0" else f"{minutes}m"

    @property
    def age_s(self) -> float:
        return time.time() - min(self.created) if self.created else 0.0


def clusters(ec2) -> dict[str, ClusterInfo]:
    """Every cluster with a live instance, security group or key pair, by name."""
    tagged = [{"Name": "tag-key", "Values": [CLUSTER_TAG]}]
    found: dict[str, ClusterInfo] = {}
    pages = ec2.get_paginator("describe_instances").paginate(Filters=[
        *tagged, {"Name": "instance-state-name", "Values": list(LIVE_STATES)}])
    resources = [*((i, "instance") for page in pages for r in page["Reservations"]
                   for i in r["Instances"]),
                 *((g, "group") for g in ec2.describe_security_groups(
                     Filters=tagged)["SecurityGroups"]),
                 *((k, "key") for k in ec2.describe_key_pairs(Filters=tagged)["KeyPairs"])]
    for resource, kind in resources:
        name = tags_of(resource)[CLUSTER_TAG]
        found.setdefault(name, ClusterInfo(name)).add(resource, kind)
    return dict(sorted(found.items()))


def _run_info(run_id: str | None):
    """The run's RunInfo, None without a run id, "UNKNOWN" when the store does not know it."""
    if run_id is None:
        return None
    from mlflow.exceptions import MlflowException

    from fowlflow.projects.run_lifecycle import client
    try:
        return client(None).get_run(run_id).info
    except MlflowException:
        return "UNKNOWN"


def _run_status(run_id: str | None) -> str | None:
    info = _run_info(run_id)
    return info if info is None or info == "UNKNOWN" else info.status


def idle_time(info: ClusterInfo, now: float | None = None) -> str:
    """``ls``'s IDLE (see the module docstring): e.g. ``12m``, ``run on``, ``?``, ``-``."""
    if not info.instances:
        return "-"
    now = time.time() if now is None else now
    run = _run_info(info.run_id)
    if run is None:
        since = max(i["LaunchTime"].timestamp() for i in info.instances)
    elif run == "UNKNOWN":
        return "?"
    elif run.status not in ("FINISHED", "FAILED", "KILLED") or not run.end_time:
        return "run on"
    else:
        since = run.end_time / 1000
    return f"{max(now - since, 0) / 60:.0f}m"


def garbage_reason(info: ClusterInfo, grace_s: float) -> str | None:
    """Why ``info`` is garbage, or None when it must stay."""
    if not info.instances:  # its instances stopped themselves, or a launch died early
        return "only its security group / key pair are left" if info.age_s > grace_s else None
    if info.kept:
        return None
    status = _run_status(info.run_id)
    if status in ("FINISHED", "FAILED", "KILLED"):
        return f"its run {info.run_id} ended ({status})"
    if status is None and info.age_s > grace_s:
        return f"no run after {info.age_s / 60:.0f} min (its launch died)"
    return None


def _ls(args) -> int:
    found = clusters(aws_session(args.region).client("ec2"))
    if not found:
        print("no fowlflow clusters")
        return 0
    print(f"{'NAME':<20} {'INSTANCES':<22} {'STATE':<10} {'AGE':>7} {'IDLE':>7} {'AUTOSTOP':>8} "
          f"{'$/H':>7} KEEP  LAST RUN")
    for info in found.values():
        types = {i["InstanceType"] for i in info.instances}
        what = f"{len(info.instances)} x {', '.join(sorted(types))}" if types else "-"
        states = ",".join(sorted({i["State"]["Name"] for i in info.instances})) or "gone"
        prices = [hourly_price(i["InstanceType"]) for i in info.instances]
        price = f"{sum(prices):.2f}" if prices and None not in prices else "?"
        print(f"{info.name:<20} {what:<22} {states:<10} {info.age_s / 60:>6.0f}m "
              f"{idle_time(info):>7} {info.autostop:>8} {price:>7} "
              f"{'yes' if info.kept else 'no':<5} {info.run_id or '-'}")
    return 0


def _down(args) -> int:
    cluster = Cluster(aws_session(args.region).client("ec2"), args.name)
    removed = cluster.down()
    shutil.rmtree(state_dir(args.name), ignore_errors=True)
    if not any(removed.values()):
        raise ConfigError(f"no cluster {args.name!r} in this region (fowlflow ec2 ls lists "
                          "them; --region picks another region)")
    print(f"cluster {args.name} removed: " + ", ".join(
        f"{len(v)} {k.replace('_', ' ')}" for k, v in removed.items()))
    return 0


def _gc(args) -> int:
    ec2 = aws_session(args.region).client("ec2")
    doomed = {name: why for name, info in clusters(ec2).items()
              if (why := garbage_reason(info, args.grace_minutes * 60))}
    for name, why in doomed.items():
        print(f"{'removing' if args.yes else 'would remove'} cluster {name}: {why}")
        if args.yes:
            Cluster(ec2, name).down()
            shutil.rmtree(state_dir(name), ignore_errors=True)
    if not doomed:
        print("nothing to remove")
    elif not args.yes:
        print("(dry run: add --yes to remove these clusters)")
    sys.stdout.flush()
    return 0


def register(subparsers) -> None:
    """Add ``fowlflow ec2 ls|down|gc``."""
    text = "the AWS EC2 clusters the ec2 backend launched (ls, down NAME, gc)"
    ec2 = subparsers.add_parser("ec2", help=text, description=text)
    sub = ec2.add_subparsers(dest="ec2_command", required=True)
    helps = {"ls": "list the clusters: instances, state, age, idle time, autostop, price, "
                   "kept, last run",
             "down": "terminate a cluster's instances, delete its security group and key pair",
             "gc": "remove clusters that belong to no live run or kept cluster (dry run "
                   "unless --yes)"}
    for name, func in (("ls", _ls), ("down", _down), ("gc", _gc)):
        sp = sub.add_parser(name, help=helps[name], description=helps[name])
        sp.add_argument("--region", help="the AWS region (default: boto3's, AWS_DEFAULT_REGION)")
        if name == "down":
            sp.add_argument("name", help="the cluster name (fowlflow ec2 ls)")
        if name == "gc":
            sp.add_argument("--yes", action="store_true", help="remove (default: only list)")
            sp.add_argument("--grace-minutes", type=float, default=30, metavar="M",
                            help="leave clusters without a run alone for M minutes (default "
                                 "30: they may still be starting)")
        sp.set_defaults(func=func)
