"""One ``mlflow run -b ec2``: check, provision (or reuse a kept cluster), hand over to the ssh
path, and tear down.

    Ec2Run(sub, cfg).run()      # -> the SubmittedRun of SshLaunch

Order: config and credentials, instance type, image and spot price are checked before anything
is created (:func:`fowlflow.projects.ec2_cloud.preflight`); the plan and its hourly price are
logged (on-demand: the AWS Pricing API's, else the list price table's:
:func:`fowlflow.projects.ec2_prices.on_demand_price`); the key pair, security group and
instances are created, all tagged ``fowlflow:cluster=<name>``; once every instance takes SSH
logins (host keys checked against the keys made here),
:class:`~fowlflow.projects.ssh_launch.SshLaunch` runs the entry point.
Failure or Ctrl-C at any point before that removes everything the cluster has; afterwards the
cluster is removed at the end of the run unless it is kept (``cluster_name`` without
``"down": true``), in which case its idle watchdog stops it after ``idle_minutes``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import signal
import threading
import time
import uuid

from fowlflow.errors import ConfigError, RemoteError
from fowlflow.projects import run_lifecycle
from fowlflow.projects.config import HostSpec
from fowlflow.projects.ec2_cloud import Plan, aws_session, preflight
from fowlflow.projects.ec2_cluster import Cluster, tag_specs
from fowlflow.projects.ec2_config import TAG_PREFIX, Ec2Config, state_dir
from fowlflow.projects.ec2_prices import cost_usd, describe, on_demand_price
from fowlflow.projects.ec2_ready import wait_ssh
from fowlflow.projects.ec2_recovery import (InterruptionWatch, describe_loss, lost_instances,
                                             resumed_submission)
from fowlflow.projects.ec2_userdata import HostKey, add_known_host, client_key, user_data
from fowlflow.projects.run_lifecycle import Submission
from fowlflow.projects.nodes import RunState
from fowlflow.projects.submitted import SupervisedRun
from fowlflow.projects.ssh_launch import SshLaunch

_logger = logging.getLogger(__name__)


class Ec2Launch(SshLaunch):
    """SshLaunch that also tags the run and the instances once the run exists."""

    on_record = None

    def _record(self, run_id: str, details: list[dict]) -> None:
        super()._record(run_id, details)
        if self.on_record is not None:
            self.on_record(run_id)


class Ec2Run:
    """Provision, launch, tear down; see the module docstring."""

    def __init__(self, sub: Submission, cfg: Ec2Config):
        self.sub, self.cfg = sub, cfg
        self.name = cfg.cluster_name or f"run-{uuid.uuid4().hex[:8]}"
        self.state = state_dir(self.name)
        self.cluster: Cluster | None = None
        self.plan: Plan | None = None
        self.price_source: str | None = None  # on-demand: the Pricing API or the table
        self.instances: list[dict] = []
        self.ready = False  # every instance took an SSH login
        self.released = False
        self.run_id: str | None = None
        self.started = time.time()
        self.launch_args: tuple = ()  # key pair, security groups, tags: for replacements
        self.early: dict[int, tuple[str, HostKey]] = {}  # rank -> replacement launched on notice
        self.launch: Ec2Launch | None = None  # the current attempt's

    def run(self):
        session = aws_session(self.cfg.region)
        self.plan = preflight(session, self.cfg)
        if not self.cfg.spot:  # spot keeps preflight's max_price / market price
            price, self.price_source = on_demand_price(session, self.cfg.instance_type,
                                                       self.plan.region, self.cfg.pricing_api)
            self.plan = dataclasses.replace(self.plan, price=price)
        self.cluster = Cluster(session.client("ec2"), self.name)
        try:
            self._wait_ready(self._provision())
            submitted = self._launch_with_recovery()
        except BaseException as exc:
            self._release(failed=True, why=exc)
            raise
        if self.cfg.ssh.wait and not self.sub.mlflow_keys.synchronous:
            self._release(failed=False)
        return submitted

    def _ssh_config(self, hosts: list[HostSpec], attempt: int = 0):
        """The ssh backend's config for ``hosts``; after a recovery, a folder of its own
        under ``remote_dir`` (a surviving node still has the first attempt's run folder,
        whose final status a restart in the same run must not read)."""
        remote = self.cfg.ssh.remote_dir
        return dataclasses.replace(
            self.cfg.ssh, hosts=tuple(hosts), strict_host_key_checking=True,
            remote_dir=remote if attempt == 0 else f"{remote.rstrip('/')}/recovery-{attempt}",
            known_hosts_file=str(self.state / "known_hosts"),
            process_count_per_node=self.cfg.process_count_per_node)

    def _wait_ready(self, hosts: list[HostSpec]) -> None:
        wait_ssh(hosts, self._ssh_config(hosts).access, self.cfg.ssh_timeout)
        self.ready = True

    def _launch_with_recovery(self):
        """SshLaunch; after a failure in which instances went away (spot), replace them and
        run again in the same run, from its checkpoint (:mod:`.ec2_recovery`)."""
        sub = self.sub
        for attempt in range(self.cfg.max_recoveries + 1):
            launch = Ec2Launch(sub, self._ssh_config(self._hosts(), attempt), backend="ec2",
                               on_end=self._end)
            launch.on_record = self._on_record
            self.launch = launch
            recover = attempt < self.cfg.max_recoveries
            watch = InterruptionWatch(self.cluster.ec2, self.instances,
                                      self.cfg.watch_seconds if recover else 0, self._on_notice)
            try:
                watch.start()
                return launch.run()  # waits for the run unless "wait": false / synchronous
            except RemoteError:
                watch.stop()
                lost = lost_instances(self.cluster.ec2, self.instances)
                if not lost or self.run_id is None or not recover:
                    self._drop_early()
                    raise
            except BaseException:
                watch.stop()
                self._drop_early()
                raise
            finally:
                watch.stop()
            self._replace(lost, attempt + 1, watch.noticed)
            sub = resumed_submission(self.sub, self.run_id)
        raise AssertionError("unreachable")

    def _on_notice(self, rank: int, inst: dict, what: str) -> None:
        """EC2 says node ``rank``'s instance ended or is about to (the interruption watch's
        thread): say so, tag the run, and launch its replacement now."""
        if self.run_id is None:  # still starting: a failure now is not recovered
            return
        _logger.warning("node%d %s: EC2 reports %s; launching its replacement now (run %s "
                        "resumes on it once the SSH stream gives the node up, reconnect_timeout "
                        "%d s)", rank, inst["InstanceId"], what, self.run_id,
                        self.cfg.ssh.reconnect_timeout)
        run_lifecycle.set_tags(self.sub.tracking_uri, self.run_id, {
            "ec2.interrupted": f"node{rank} {inst['InstanceId']}: {what} at "
                               f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"})
        self.early[rank] = self._launch_node(rank)
        self._stop_survivors(rank)

    def _stop_survivors(self, lost_rank: int) -> None:
        """Several nodes: the others would wait in their collectives for the lost one (gloo
        or NCCL timeouts, up to 30 min): stop them now, FAILED, so the run ends and is
        started again on every node (torchrun needs all of them) from the checkpoint."""
        nodes = [n for rank, n in enumerate(self.launch.nodes if self.launch else [])
                 if rank != lost_rank]
        if nodes:
            _logger.warning("stopping the other node(s) of run %s: the whole job restarts "
                            "with node%d's replacement", self.run_id, lost_rank)
            SupervisedRun(self.run_id, nodes, self.sub.tracking_uri).cancel_nodes(
                nodes, RunState.FAILED)

    def _drop_early(self) -> None:
        """Terminate replacements launched on a notice that no recovery will use."""
        if self.early:
            ids = [iid for iid, _ in self.early.values()]
            self.early.clear()
            _logger.info("terminating unused replacement(s) %s", ", ".join(ids))
            self.cluster.ec2.terminate_instances(InstanceIds=ids)

    def _replace(self, lost: list[tuple[int, dict]], n: int,
                 noticed: dict[int, str] | None = None) -> None:
        """New instances for the lost nodes (those launched on a notice, else now), ready
        for SSH; the run's tags say so."""
        marked = [(rank, self.instances[rank]) for rank in self.early
                  if rank not in {r for r, _ in lost}]  # noticed, not yet gone: soon will be
        if marked:
            self.cluster.ec2.terminate_instances(InstanceIds=[i["InstanceId"] for _, i in marked])
        lost = sorted([*lost, *marked], key=lambda pair: pair[0])
        _logger.warning("recovery %d of %d: %s gone; replacing and resuming run %s", n,
                        self.cfg.max_recoveries, describe_loss(lost), self.run_id)
        fresh = {rank: self.early.pop(rank, None) or self._launch_node(rank) for rank, _ in lost}
        running = self.cluster.wait_running([iid for iid, _ in fresh.values()])
        for (rank, (_, host_key)), inst in zip(fresh.items(), running):
            self.instances[rank] = inst
            add_known_host(self.state / "known_hosts", self._address(inst), host_key.public)
        self._wait_ready(self._hosts())
        run_lifecycle.set_tags(self.sub.tracking_uri, self.run_id, {
            "ec2.recoveries": str(n), f"ec2.recovery.{n}": json.dumps({
                "lost": describe_loss(lost),
                "replacements": [i["InstanceId"] for i in running],
                "noticed": {f"node{rank}": what for rank, what in (noticed or {}).items()}})})

    def _launch_node(self, rank: int) -> tuple[str, HostKey]:
        host_key = HostKey.generate(f"fowlflow-{self.name}-node{rank}")
        iid = self.cluster.launch(self.cfg, self.plan, rank, user_data(host_key, self.cfg),
                                  *self.launch_args)
        return iid, host_key

    def _base_tags(self) -> dict:
        return {**self.cfg.tags, TAG_PREFIX + "cluster": self.name,
                TAG_PREFIX + "keep": str(self.cfg.kept).lower(),
                TAG_PREFIX + "idle-minutes": str(self.cfg.idle_minutes),
                TAG_PREFIX + "created": str(int(time.time()))}

    def _provision(self) -> list[HostSpec]:
        """Reuse the named cluster's running instances, or create them; the hosts to use."""
        cfg, plan, cluster = self.cfg, self.plan, self.cluster
        live = cluster.instances()
        if live:
            self._check_reuse(live)
            _logger.info("reusing cluster %s: %s", self.name,
                         ", ".join(i["InstanceId"] for i in live))
            self.instances = cluster.wait_running([i["InstanceId"] for i in live])
            self.ready = True  # it ran before: not torn down on failure unless down says so
            self.launch_args = (live[0]["KeyName"],
                                [g["GroupId"] for g in live[0]["SecurityGroups"]],
                                self._base_tags())
            return self._hosts()
        _logger.info("launching cluster %s in %s: %s, image %s", self.name, plan.region,
                     describe(cfg.instance_type, cfg.node_count, plan.price, cfg.spot,
                              self.price_source),
                     plan.image_id)
        tags = self._base_tags()
        key = client_key(self.state)
        key_name = cluster.ensure_key_pair(key.with_suffix(".pub").read_text(), tags)
        self.launch_args = (key_name, cluster.ensure_security_group(cfg, tags), tags)
        host_keys = dict(self._launch_node(rank) for rank in range(cfg.node_count))
        self.instances = cluster.wait_running(list(host_keys))
        for inst in self.instances:
            add_known_host(self.state / "known_hosts", self._address(inst),
                           host_keys[inst["InstanceId"]].public)
        return self._hosts()

    def _check_reuse(self, live: list[dict]) -> None:
        types = sorted({i["InstanceType"] for i in live})
        if len(live) != self.cfg.node_count or types != [self.cfg.instance_type]:
            raise ConfigError(
                f"cluster {self.name!r} has {len(live)} x {', '.join(types)}, not "
                f"{self.cfg.node_count} x {self.cfg.instance_type}; use it as it is, or remove "
                f"it first (fowlflow ec2 down {self.name}), or pick another cluster_name")
        if not (self.state / "known_hosts").exists() or not (self.state / "id_ed25519").exists():
            raise ConfigError(f"cluster {self.name!r} runs, but its SSH key and known_hosts "
                              f"are not in {self.state} (made on another machine?); remove it "
                              f"(fowlflow ec2 down {self.name}) and launch again")

    def _address(self, inst: dict) -> str:
        key = "PrivateIpAddress" if self.cfg.address == "private" else "PublicIpAddress"
        if not inst.get(key):
            raise ConfigError(f"instance {inst['InstanceId']} has no {self.cfg.address} "
                              "address; use \"address\": \"private\" from inside the VPC, or a "
                              "subnet that assigns public addresses")
        return inst[key]

    def _hosts(self) -> list[HostSpec]:
        return [HostSpec(self._address(i), user=self.cfg.user,
                         identity_file=str(self.state / "id_ed25519")) for i in self.instances]

    def _on_record(self, run_id: str) -> None:
        """The run exists and its nodes started: tag both sides."""
        self.run_id = run_id
        ids = [i["InstanceId"] for i in self.instances]
        volumes = [m["Ebs"]["VolumeId"] for i in self.instances
                   for m in i.get("BlockDeviceMappings", []) if "Ebs" in m]
        self.cluster.ec2.create_tags(Resources=ids + volumes, Tags=tag_specs(
            {TAG_PREFIX + "run-id": run_id}, "instance")[0]["Tags"])
        run_lifecycle.set_tags(self.sub.tracking_uri, run_id, {
            "ec2.cluster": self.name, "ec2.region": self.plan.region,
            "ec2.instance_type": self.cfg.instance_type, "ec2.spot": str(self.cfg.spot).lower(),
            "ec2.instances": json.dumps(ids),
            "ec2.price_usd_per_hour": "unknown" if self.plan.price is None
            else str(self.plan.price)})

    def _end(self) -> None:
        """SshLaunch is done with the run: record its cost. The cluster goes once the
        failure summary has read the nodes' logs (in :meth:`run`), or here when MLflow
        itself waited (``synchronous``)."""
        if self.run_id is not None:
            hours = len(self.instances) * (time.time() - self.started) / 3600
            cost = cost_usd(self.plan.price, hours)
            run_lifecycle.set_tags(self.sub.tracking_uri, self.run_id, {
                "ec2.node_hours": f"{hours:.4f}",
                "ec2.cost_usd": "unknown" if cost is None else f"{cost:.2f}"})
        if self.sub.mlflow_keys.synchronous:  # MLflow waited: nothing reads the nodes now
            self._release(failed=False)
        elif not self.cfg.ssh.wait and self.cfg.terminate_at_end:
            _logger.info("cluster %s: instances stop themselves %d idle minutes after the run "
                         "(or: fowlflow ec2 down %s)", self.name, self.cfg.idle_minutes,
                         self.name)

    def _release(self, failed: bool, why: BaseException | None = None) -> None:
        """Remove the cluster when it is not kept, or when it never became usable. Ctrl-C is
        ignored meanwhile (a second one would leave half a cluster); after a failure, a
        teardown error is logged with the fix and the first error is the one raised."""
        if self.released or self.cluster is None:
            return
        if not (self.cfg.terminate_at_end or (failed and not self.ready)):
            _logger.info("cluster %s kept (fowlflow ec2 down %s removes it)", self.name,
                         self.name)
            return
        self.released = True
        if failed:
            _logger.error("launch failed (%s); removing cluster %s (Ctrl-C is ignored until "
                          "it is gone)", why, self.name)
        try:
            with _sigint_ignored():
                removed = self.cluster.down()
        except Exception as exc:
            if not failed:
                raise
            _logger.error("removing cluster %s failed: %s; fix: run `fowlflow ec2 down %s`",
                          self.name, exc, self.name)
            return
        shutil.rmtree(self.state, ignore_errors=True)
        _logger.info("cluster %s removed: %d instance(s), %d security group(s), %d key pair(s)",
                     self.name, len(removed["instances"]), len(removed["security_groups"]),
                     len(removed["key_pairs"]))


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored in the block (only the main thread may change signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
