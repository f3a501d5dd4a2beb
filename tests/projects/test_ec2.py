"""The ec2 backend's config, checks and lifecycle against moto (no real AWS is reachable from
here, so moto's server mode stands in for EC2, SSM and STS; boto3 reaches it through
``AWS_ENDPOINT_URL_*``, nothing is patched).

Every failure path ends with a count of each fowlflow-tagged instance, volume, security group
and key pair left in moto: zero. The hosts are not started here (that is
test_ec2_hosts.py), so SSH never answers at the addresses moto assigns.
"""

from __future__ import annotations

import base64
import os
import stat
import threading
import time

import pytest
import yaml

from fowlflow.errors import ConfigError, RemoteError
from fowlflow.projects.ec2 import Ec2Backend
from fowlflow.projects.ec2_config import parse_ec2_config
from tests.conftest import ROOT
from tests.projects.ec2_moto import FaultyEc2, aws, ec2_config, moto_url  # noqa: F401


def launch(aws, tmp_path, **cfg):
    return Ec2Backend().run(str(ROOT), "main", {}, None, ec2_config(aws, **cfg),
                            f"sqlite:///{tmp_path / 'mlflow.db'}", "0")


# --- config ---------------------------------------------------------------------------------

def test_config_defaults_and_ssh_keys_pass_through():
    cfg = parse_ec2_config({"instance_type": "g6e.xlarge", "node_count": 2, "spot": True,
                            "max_price": 1.5, "env": {"NCCL_DEBUG": "INFO"}, "tunnel": True})
    assert (cfg.node_count, cfg.spot, cfg.max_price) == (2, True, 1.5)
    assert cfg.ssh.env == {"NCCL_DEBUG": "INFO"} and cfg.ssh.tunnel
    assert cfg.terminate_at_end and not cfg.kept  # unnamed: removed after the run
    named = parse_ec2_config({"cluster_name": "gpu-cluster"})
    assert named.kept and parse_ec2_config({"cluster_name": "c", "down": True}).terminate_at_end
    assert "mlflow==3.17" in parse_ec2_config({}).setup_commands[0]
    assert cfg.watch_seconds == 10 and parse_ec2_config({"watch_seconds": 0}).watch_seconds == 0


@pytest.mark.parametrize("user, needle", [
    ({"hosts": ["x"]}, "unknown ec2 backend config key(s) ['hosts']"),
    ({"strict_host_key_checking": False}, "valid keys are"),
    ({"max_price": 0.5}, "add \"spot\": true"),
    ({"spot": True, "max_price": -1}, "max_price must be a positive number"),
    ({"address": "both"}, "address must be \"private\" or \"public\""),
    ({"cluster_name": "GPU cluster"}, "cluster_name 'GPU cluster'"),
    ({"ssh_cidr": "my laptop"}, "is not a CIDR block"),
    ({"tags": {"fowlflow:cluster": "x"}}, "reserved"),
    ({"node_count": 0}, "node_count must be an integer >= 1"),
    ({"wait": False, "idle_minutes": 0}, "would leave the instances running"),
])
def test_bad_config_names_the_problem(user, needle):
    with pytest.raises(ConfigError) as err:
        parse_ec2_config(user)
    assert needle in str(err.value)


# --- checks before anything is created ------------------------------------------------------

@pytest.mark.parametrize("setup, cfg, needle", [
    ("no-credentials", {}, "no AWS credentials found"),
    (None, {"region": "mars-north-1"}, "unknown AWS region 'mars-north-1'"),
    (None, {"instance_type": "g99.huge"}, "unknown instance type 'g99.huge'"),
    (None, {"image": "ami-00000000deadbeef0"}, "does not exist"),
    (None, {"image": "/fowlflow/test/no-such-parameter"}, "no such SSM parameter"),
    (None, {"spot": True, "max_price": 0.000001}, "below the current spot price"),
])
def test_bad_input_fails_before_anything_is_created(aws, tmp_path, monkeypatch, setup, cfg,
                                                    needle):
    if setup == "no-credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError) as err:
        launch(aws, tmp_path, **cfg)
    assert needle in str(err.value)
    assert aws.leftovers() == {}
    assert not (tmp_path / "ec2-home").exists() or not any((tmp_path / "ec2-home").iterdir())


def test_image_from_an_ssm_parameter_and_tags_and_user_data(aws, tmp_path):
    """SSH never answers (no host is started): the error names the fixes, and the instance,
    its volume, group and key pair are gone; before that they carried the cluster's tags."""
    import boto3

    boto3.client("ssm").put_parameter(Name="/fowlflow/test/ami", Value=aws.image_id,
                                      Type="String")
    seen = {}

    def watch():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not seen:
            for inst in aws.instances():
                seen["instance"] = inst
                seen["user_data"] = aws.ec2.describe_instance_attribute(
                    InstanceId=inst["InstanceId"], Attribute="userData")["UserData"]["Value"]
                seen["groups"] = aws.ec2.describe_security_groups(
                    GroupIds=[g["GroupId"] for g in inst["SecurityGroups"]])["SecurityGroups"]
                seen["key"] = sorted(os.listdir(tmp_path / "ec2-home" / "team-a"))
                seen["known_hosts"] = (tmp_path / "ec2-home" / "team-a" / "known_hosts").read_text()
                seen["key_mode"] = stat.S_IMODE(
                    os.stat(tmp_path / "ec2-home" / "team-a" / "id_ed25519").st_mode)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with pytest.raises(RemoteError) as err:
        launch(aws, tmp_path, image="/fowlflow/test/ami", ssh_timeout=3, cluster_name="team-a",
               tags={"team": "vision"})
    watcher.join()
    assert "was not ready within 3 s" in str(err.value) and "ssh_cidr" in str(err.value)
    assert aws.leftovers() == {}
    assert not (tmp_path / "ec2-home" / "team-a").exists()
    inst = seen["instance"]
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags["fowlflow:cluster"] == "team-a" and tags["team"] == "vision"
    assert inst["ImageId"] == aws.image_id and inst["InstanceType"] == "g6e.xlarge"
    assert inst["KeyName"] == "fowlflow-team-a"
    ingress = seen["groups"][0]["IpPermissions"]
    vpc_cidr = aws.ec2.describe_vpcs(VpcIds=[inst["VpcId"]])["Vpcs"][0]["CidrBlock"]
    assert any(p.get("FromPort") == 22 and p["IpRanges"][0]["CidrIp"] == vpc_cidr
               for p in ingress)  # private addresses: SSH from the VPC only
    assert any(p.get("UserIdGroupPairs") for p in ingress)  # all traffic inside the group
    assert seen["key"] == ["id_ed25519", "id_ed25519.pub", "known_hosts"]
    assert seen["key_mode"] == 0o600
    # the host key went in through user data and is the one known_hosts trusts for the address
    cloud = yaml.safe_load(base64.b64decode(seen["user_data"]))
    host_pub = cloud["ssh_keys"]["ed25519_public"].split()[:2]
    assert seen["known_hosts"].split() == [inst["PrivateIpAddress"], *host_pub]
    assert "PRIVATE KEY" in cloud["ssh_keys"]["ed25519_private"]
    assert cloud["ssh_genkeytypes"] == [] and cloud["ssh_deletekeys"] is True
    files = {f["path"]: f for f in cloud["write_files"]}
    assert "def watch(" in files["/usr/local/bin/fowlflow-autostop"]["content"]
    assert "--idle-minutes 30" in files["/etc/systemd/system/fowlflow-autostop.service"]["content"]
    assert ["systemctl", "enable", "--now", "fowlflow-autostop.service"] in cloud["runcmd"]


def test_second_instance_fails_nothing_left(aws, tmp_path, monkeypatch):
    faulty = FaultyEc2(aws.url, fail_at=2)
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", faulty.url)
    try:
        with pytest.raises(RemoteError) as err:
            launch(aws, tmp_path, node_count=2)
    finally:
        faulty.close()
    assert "run_instances (node 1, g6e.xlarge) failed: InsufficientInstanceCapacity" \
        in str(err.value)
    assert faulty.calls["RunInstances"] == 2
    assert aws.leftovers() == {}
    assert aws.instances(("terminated",))  # node 0 was made, then terminated


def test_ctrl_c_while_waiting_for_ssh_leaves_nothing(aws, tmp_path, monkeypatch):
    """Ctrl-C arrives while the launch waits for port 22 of the instances it created.

    The KeyboardInterrupt is raised where the wait checks the port, once both instances are
    running: where a Ctrl-C lands. It used to come from another thread through
    ``_thread.interrupt_main()``, which is no Ctrl-C (it wakes no blocked system call); that
    was lost once in CI, where this sandbox accepted the TCP connection to the moto address
    and the ssh probe then waited out the whole ``ssh_timeout``."""
    from fowlflow.projects import ec2_ready

    checked = []

    def ctrl_c_once_running(address, port):
        checked.append(address)
        assert len(aws.instances(("running",))) == 2
        raise KeyboardInterrupt

    monkeypatch.setattr(ec2_ready, "_port_open", ctrl_c_once_running)
    with pytest.raises(KeyboardInterrupt):
        launch(aws, tmp_path, node_count=2, ssh_timeout=60)
    assert len(checked) == 1
    assert aws.leftovers() == {}


# --- interruptions ----------------------------------------------------------------------------

def test_interruption_watch_reports_an_ended_instance_once(aws):
    """The watch a run has while it is on: moto terminates node 1 (moto does not link spot
    requests to RunInstances, so only instance states are emulated); reported once, with
    its rank and EC2's state."""
    from fowlflow.projects.ec2_recovery import InterruptionWatch

    ids = [aws.ec2.run_instances(ImageId=aws.image_id, InstanceType="g6e.xlarge", MinCount=1,
                                 MaxCount=1, SubnetId=aws.subnet_id)["Instances"][0]["InstanceId"]
           for _ in range(2)]
    instances = [i for r in aws.ec2.describe_instances(InstanceIds=ids)["Reservations"]
                 for i in r["Instances"]]
    instances.sort(key=lambda i: ids.index(i["InstanceId"]))
    seen = []
    watch = InterruptionWatch(aws.ec2, instances, 0.1,
                              lambda rank, inst, what: seen.append((rank, inst["InstanceId"], what)))
    watch.start()
    try:
        time.sleep(0.5)
        assert seen == []
        aws.ec2.terminate_instances(InstanceIds=[ids[1]])
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # a few more polls: still once
    finally:
        watch.stop()
    assert [(rank, iid) for rank, iid, _ in seen] == [(1, ids[1])]
    assert seen[0][2].split(" (")[0] in ("state shutting-down", "state terminated")
    assert list(watch.noticed) == [1] and seen[0][2] in watch.noticed[1]
    off = InterruptionWatch(aws.ec2, instances, 0, lambda *a: seen.append(a)).start()
    off.stop()  # interval 0: no thread, nothing polled
    assert len(seen) == 1
