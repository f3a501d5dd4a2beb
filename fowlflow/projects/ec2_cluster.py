"""A cluster's AWS resources: made, found and removed by their ``fowlflow:cluster`` tag.

    cluster = Cluster(ec2, "gpu-cluster")
    cluster.instances()          # its live instances (pending/running/stopping/stopped)
    key = cluster.ensure_key_pair(state_dir, tags)
    groups = cluster.ensure_security_group(cfg, tags)
    cluster.launch(cfg, plan, rank, user_data, key, groups, tags)   # one instance
    cluster.down()               # terminate instances, delete the group and the key pair

Everything is created with its tags (TagSpecifications), so a resource is never untagged even
when the client dies right after AWS made it; :meth:`down` finds by tag, not by memory.
"""

from __future__ import annotations

import ipaddress
import logging
import time
import urllib.request

from fowlflow.errors import ConfigError, RemoteError
from fowlflow.projects.ec2_cloud import Plan, call
from fowlflow.projects.ec2_config import TAG_PREFIX, Ec2Config

_logger = logging.getLogger(__name__)
CLUSTER_TAG = TAG_PREFIX + "cluster"
LIVE_STATES = ("pending", "running", "stopping", "stopped")
CHECKIP_URL = "https://checkip.amazonaws.com"


def tag_specs(tags: dict, *resource_types: str) -> list[dict]:
    pairs = [{"Key": k, "Value": str(v)} for k, v in tags.items()]
    return [{"ResourceType": t, "Tags": pairs} for t in resource_types]


def tags_of(resource: dict) -> dict:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def caller_cidr() -> str:
    """This machine's public address as a /32 (what AWS sees connecting from here)."""
    try:
        with urllib.request.urlopen(CHECKIP_URL, timeout=5) as resp:
            address = resp.read().decode().strip()
        return str(ipaddress.ip_network(f"{address}/32"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not find this machine's public address ({CHECKIP_URL}: "
                          f"{exc}); set \"ssh_cidr\" (e.g. \"203.0.113.7/32\")") from exc


class Cluster:
    """The resources of one named cluster in one region."""

    def __init__(self, ec2, name: str):
        self.ec2, self.name = ec2, name
        self.filter = [{"Name": f"tag:{CLUSTER_TAG}", "Values": [name]}]

    def instances(self, states: tuple[str, ...] = LIVE_STATES) -> list[dict]:
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[*self.filter, {"Name": "instance-state-name", "Values": list(states)}])
        return sorted((i for page in pages for r in page["Reservations"] for i in r["Instances"]),
                      key=lambda i: int(tags_of(i).get(TAG_PREFIX + "node", "0")))

    def ensure_key_pair(self, public_key: str, tags: dict) -> str:
        """Import the cluster's login key as the key pair ``fowlflow-<name>`` (once)."""
        name = f"fowlflow-{self.name}"
        found = self.ec2.describe_key_pairs(Filters=self.filter)["KeyPairs"]
        if not found:
            call("import_key_pair", self.ec2.import_key_pair, KeyName=name,
                 PublicKeyMaterial=public_key.encode(),
                 TagSpecifications=tag_specs(tags, "key-pair"))
        return name

    def _vpc(self, cfg: Ec2Config) -> dict:
        if cfg.subnet_id:
            subnets = call("describe_subnets", self.ec2.describe_subnets,
                           SubnetIds=[cfg.subnet_id])["Subnets"]
            return call("describe_vpcs", self.ec2.describe_vpcs,
                        VpcIds=[subnets[0]["VpcId"]])["Vpcs"][0]
        vpcs = self.ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise ConfigError(f"region {self.ec2.meta.region_name} has no default VPC; give "
                              "\"subnet_id\" (a subnet of your VPC)")
        return vpcs[0]

    def ensure_security_group(self, cfg: Ec2Config, tags: dict) -> list[str]:
        """``security_group_ids`` as given, else the cluster's own group: SSH from
        ``ssh_cidr`` (default: the VPC for private addresses, this machine for public ones)
        and all traffic between the group's members (NCCL, c10d)."""
        if cfg.security_group_ids:
            return list(cfg.security_group_ids)
        found = self.ec2.describe_security_groups(Filters=self.filter)["SecurityGroups"]
        if found:
            return [found[0]["GroupId"]]
        vpc = self._vpc(cfg)
        cidr = cfg.ssh_cidr or (vpc["CidrBlock"] if cfg.address == "private" else caller_cidr())
        group = call("create_security_group", self.ec2.create_security_group,
                     GroupName=f"fowlflow-{self.name}", VpcId=vpc["VpcId"],
                     Description=f"fowlflow cluster {self.name}: SSH in, all traffic inside",
                     TagSpecifications=tag_specs(tags, "security-group"))["GroupId"]
        call("authorize_security_group_ingress", self.ec2.authorize_security_group_ingress,
             GroupId=group, IpPermissions=[
                 {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                  "IpRanges": [{"CidrIp": cidr, "Description": "fowlflow ssh"}]},
                 {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]}])
        return [group]

    def launch(self, cfg: Ec2Config, plan: Plan, rank: int, user_data: str, key_name: str,
               groups: list[str], tags: dict) -> str:
        """Start node ``rank``; its instance id."""
        node_tags = {**tags, TAG_PREFIX + "node": str(rank),
                     "Name": f"fowlflow-{self.name}-node{rank}"}
        args = dict(ImageId=plan.image_id, InstanceType=cfg.instance_type, MinCount=1,
                    MaxCount=1, KeyName=key_name, UserData=user_data,
                    InstanceInitiatedShutdownBehavior="terminate",
                    TagSpecifications=tag_specs(node_tags, "instance", "volume"),
                    BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {
                        "VolumeSize": cfg.volume_size_gb, "VolumeType": "gp3",
                        "DeleteOnTermination": True}}])
        if cfg.address == "public":
            args["NetworkInterfaces"] = [{"DeviceIndex": 0, "AssociatePublicIpAddress": True,
                                          "Groups": groups, **({"SubnetId": cfg.subnet_id}
                                                               if cfg.subnet_id else {})}]
        else:
            args.update(SecurityGroupIds=groups,
                        **({"SubnetId": cfg.subnet_id} if cfg.subnet_id else {}))
        if cfg.spot:
            spot = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
            if cfg.max_price is not None:
                spot["MaxPrice"] = str(cfg.max_price)
            args["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
        if cfg.iam_instance_profile:
            key = "Arn" if cfg.iam_instance_profile.startswith("arn:") else "Name"
            args["IamInstanceProfile"] = {key: cfg.iam_instance_profile}
        reply = call(f"run_instances (node {rank}, {cfg.instance_type})",
                     self.ec2.run_instances, **args)
        return reply["Instances"][0]["InstanceId"]

    def wait_running(self, ids: list[str], timeout: float = 600) -> list[dict]:
        """The instances once all run (in ``ids``' order).

        Raises:
            RemoteError: one ended instead (spot capacity, a bad image) or time ran out.
        """
        deadline, delay = time.monotonic() + timeout, 0.5
        while True:
            found = {i["InstanceId"]: i for r in call(
                "describe_instances", self.ec2.describe_instances,
                InstanceIds=ids)["Reservations"] for i in r["Instances"]}
            states = {i: found[i]["State"]["Name"] for i in ids}
            ended = [i for i, s in states.items() if s in ("shutting-down", "terminated",
                                                           "stopping", "stopped")]
            if ended:
                reason = found[ended[0]].get("StateReason", {}).get("Message", "no reason given")
                raise RemoteError(f"instance {ended[0]} ended while starting: {reason}")
            if all(s == "running" for s in states.values()):
                return [found[i] for i in ids]
            if time.monotonic() > deadline:
                raise RemoteError(f"instances not running after {timeout:.0f} s: {states}")
            time.sleep(delay)
            delay = min(delay * 2, 5)

    def _delete_group(self, group: str, timeout: float) -> None:
        """Delete a security group; AWS refuses (DependencyViolation) while the network
        interfaces of just-terminated instances are still being detached: retry a while."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return call("delete_security_group", self.ec2.delete_security_group,
                            GroupId=group)
            except RemoteError as exc:
                if "DependencyViolation" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(5)

    def down(self, timeout: float = 600) -> dict:
        """Terminate the cluster's instances, then delete its security group and key pair.

        Returns:
            what was removed: ``{"instances": [...], "security_groups": [...],
            "key_pairs": [...]}``.
        """
        ids = [i["InstanceId"] for i in self.instances(("pending", "running", "stopping",
                                                        "stopped", "shutting-down"))]
        if ids:
            call("terminate_instances", self.ec2.terminate_instances, InstanceIds=ids)
            self.ec2.get_waiter("instance_terminated").wait(
                InstanceIds=ids, WaiterConfig={"Delay": 2, "MaxAttempts": int(timeout / 2)})
        groups = [g["GroupId"] for g in
                  self.ec2.describe_security_groups(Filters=self.filter)["SecurityGroups"]]
        for group in groups:
            self._delete_group(group, timeout)
        keys = [k["KeyName"] for k in self.ec2.describe_key_pairs(Filters=self.filter)["KeyPairs"]]
        for key in keys:
            call("delete_key_pair", self.ec2.delete_key_pair, KeyName=key)
        volumes = [v["VolumeId"] for v in self.ec2.describe_volumes(
            Filters=[*self.filter, {"Name": "status", "Values": ["available"]}])["Volumes"]]
        for volume in volumes:  # a root volume outlives its instance only if told to
            call("delete_volume", self.ec2.delete_volume, VolumeId=volume)
        return {"instances": ids, "security_groups": groups, "key_pairs": keys,
                "volumes": volumes}
