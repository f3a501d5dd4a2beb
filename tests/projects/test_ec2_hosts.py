"""``-b ec2`` end to end: moto stands in for EC2 (no real AWS is reachable from here) and real
sshd hosts stand in for the instances.

moto's subnet is the test bridge's 10.77.0.0/24, so the private addresses it assigns are
addresses :class:`tests.projects.ec2_hosts.FakeCloud` starts sshd hosts at, each in a network
namespace, with the host key the backend put in the instance's user data. The backend reaches
them with that key checked (its own known_hosts), ships the project, trains and terminates.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from fowlflow.errors import RemoteError
from fowlflow.projects.ec2 import Ec2Backend
from tests.conftest import ROOT, TINY_PARAMS
from tests.projects.conftest import NS_IFACE
from tests.projects.ec2_hosts import FakeCloud
from tests.projects.ec2_moto import aws, ec2_config, moto_url  # noqa: F401
from tests.net import wait_until
from tests.projects.helpers import STANDIN, finish, fowlflow, mlflow_cli


@pytest.fixture
def cloud(network, aws, tmp_path):
    booted = FakeCloud(aws.ec2, tmp_path / "cloud")
    yield booted
    booted.close()
    assert not booted.errors, booted.errors


def host_config(aws, tmp_path, **extra) -> dict:
    return ec2_config(aws, remote_dir=str(tmp_path / "remote"), process_count_per_node=1,
                      env={"GLOO_SOCKET_IFNAME": NS_IFACE}, **extra)


def run_standin(aws, store, tmp_path, params: dict, **cfg):
    return Ec2Backend().run(str(STANDIN), "main", params, None,
                            host_config(aws, tmp_path, **cfg), store.uri, store.experiment_id)


def test_two_instances_train_end_to_end_and_are_terminated(server_store, cloud, aws, tmp_path):
    """The real ``mlflow run . -b ec2`` with the real trainer on 2 instances x 1 process."""
    params = {**TINY_PARAMS, "data": "synthetic", "output_dir": "outputs"}
    code, out, err = finish(mlflow_cli(ROOT, "ec2", host_config(aws, tmp_path, node_count=2),
                                       params), timeout=500)
    assert code == 0, out[-3000:] + err[-4000:]
    run = server_store.only_run()
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["fowlflow.backend"] == "ec2" and tags["fowlflow.nodes"] == "2"
    instances = json.loads(tags["fowlflow.ec2.instances"])
    assert sorted(instances) == sorted(cloud.booted)
    details = json.loads(tags["fowlflow.node_details"])
    assert [d["address"] for d in details] == [cloud.booted[i].address for i in instances]
    assert tags["fowlflow.ec2.instance_type"] == "g6e.xlarge"
    assert tags["fowlflow.ec2.price_usd_per_hour"] == "1.861"
    hours = float(tags["fowlflow.ec2.node_hours"])
    assert 0 < hours < 0.5 and float(tags["fowlflow.ec2.cost_usd"]) == round(1.861 * hours, 2)
    assert "Epoch 1/1" in server_store.artifact_text(run.info.run_id, "fowlflow-logs/node0.log")
    # checkpoint_artifact=auto: the checkpoint outlives the instances
    assert [a.path for a in server_store.client.list_artifacts(run.info.run_id, "checkpoints")] \
        == ["checkpoints/checkpoint.pt"]
    assert aws.leftovers() == {}  # both instances, their volumes, group and key pair
    assert not os.listdir(tmp_path / "ec2-home")  # the cluster's key + known_hosts removed
    for booted in cloud.booted.values():  # logged in with the key, host key checked
        assert "Accepted publickey for root" in booted.sshd.log.read_text()
    # no private key (the login key's or a host key's) in params, tags or the output
    assert "PRIVATE KEY" not in json.dumps(run.data.params) + json.dumps(tags) + out + err


def test_kept_cluster_is_reused_then_removed_by_down(server_store, cloud, aws, tmp_path):
    cfg = {"cluster_name": "warm", "idle_minutes": 20}
    run_standin(aws, server_store, tmp_path, {"steps": 2, "sleep": 0.1}, **cfg)
    first = {i["InstanceId"] for i in aws.instances(("running",))}
    assert len(first) == 1  # kept: still running after the run
    run_standin(aws, server_store, tmp_path, {"steps": 2, "sleep": 0.1}, **cfg)
    assert {i["InstanceId"] for i in aws.instances(("pending", "running"))} == first
    runs = server_store.runs()
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert {r.data.tags["fowlflow.ec2.cluster"] for r in runs} == {"warm"}
    last = aws.instances(("running",))[0]
    assert {"Key": "fowlflow:run-id", "Value": runs[0].info.run_id} in last["Tags"]
    down = fowlflow("ec2", "down", "warm")
    assert down.returncode == 0, down.stderr
    assert aws.leftovers() == {}


def test_trainer_failure_and_a_python_without_mlflow_leave_nothing(server_store, cloud, aws,
                                                                   tmp_path):
    with pytest.raises(RemoteError) as err:
        run_standin(aws, server_store, tmp_path, {"steps": 3, "fail_at": 0})
    assert "failing on purpose" in str(err.value)
    assert server_store.only_run().info.status == "FAILED"
    assert aws.leftovers() == {}
    no_mlflow = "/usr/bin/python3"  # the system Python: no mlflow ("an AMI without mlflow")
    assert os.path.exists(no_mlflow) and no_mlflow != sys.executable
    with pytest.raises(RemoteError) as err:
        run_standin(aws, server_store, tmp_path, {"steps": 1}, python=no_mlflow)
    assert f"{no_mlflow} (" in str(err.value) and "has no mlflow; fix: install it" \
        in str(err.value)
    assert aws.leftovers() == {}
    assert len(server_store.runs()) == 1  # the second failed before any run existed


def test_spot_interruption_replaces_the_instance_and_resumes_the_run(server_store, cloud, aws,
                                                                      tmp_path):
    """moto terminates the spot instance once epoch 2's metrics are in the run and a
    checkpoint is in its artifacts (a spot interruption; epoch 2's checkpoint may still be on
    its way up, so the replacement may resume from epoch 1's). The interruption watch sees it
    in EC2 and launches the replacement before the SSH stream gives up; the replacement
    resumes the same run from the checkpoint: 3 epochs, every metric once per step."""
    cloud.disk = tmp_path / "remote"  # the instance's disk goes with it
    params = {**TINY_PARAMS, "data": "synthetic", "output_dir": "outputs", "num_epochs": "3",
              "image_size": "64"}
    cfg = host_config(aws, tmp_path, spot=True, reconnect_timeout=20, max_recoveries=1,
                      watch_seconds=1)
    proc = mlflow_cli(ROOT, "ec2", cfg, params)
    run = server_store.wait_for_run(proc, timeout=300)
    client = server_store.client
    wait_until(lambda: client.list_artifacts(run.info.run_id, "checkpoints") and 2 in
               [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")],
               what="epoch 2's metrics and a checkpoint artifact", timeout=400, interval=0.2,
               proc=proc)
    first = aws.instances(("running",))
    assert len(first) == 1 and first[0].get("InstanceLifecycle") == "spot"
    aws.ec2.terminate_instances(InstanceIds=[first[0]["InstanceId"]])
    code, out, err = finish(proc, timeout=500)
    assert code == 0, out[-3000:] + err[-4000:]
    run = server_store.only_run()
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["fowlflow.ec2.recoveries"] == "1"
    recovery = json.loads(tags["fowlflow.ec2.recovery.1"])
    assert first[0]["InstanceId"] in recovery["lost"]
    assert recovery["replacements"] == json.loads(tags["fowlflow.ec2.instances"])
    assert recovery["replacements"] != [first[0]["InstanceId"]]
    # the watch saw it in EC2 (state shutting-down/terminated) and launched the replacement
    assert tags["fowlflow.ec2.interrupted"].startswith(f"node0 {first[0]['InstanceId']}: state ")
    assert list(recovery["noticed"]) == ["node0"]
    assert "launching its replacement now" in err
    assert tags["resumed_from"] == f"runs:/{run.info.run_id}/checkpoints/checkpoint.pt"
    keys = [k for k in run.data.metrics if not k.startswith("system/")]
    assert "train_loss_step" in keys and any(k.startswith("val_recall_") for k in keys), keys
    for key in keys:  # every epoch, step and per-class metric: one value per step
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    for key in ("val_acc", "train_loss", "best_val_acc", "lr", "epoch_seconds"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [1, 2, 3], (key, steps)
    assert aws.leftovers() == {}


def test_two_node_spot_interruption_restarts_every_node_from_the_checkpoint(
        server_store, cloud, aws, tmp_path):
    """2 instances x 1 process; moto terminates node 1's once a checkpoint is in the run's
    artifacts. Node 0 would wait in its collectives for the lost peer: the interruption
    watch stops it, node 1 gets a replacement, and the whole job (torchrun needs every node)
    starts again in the same run from the checkpoint: every metric once per step. (The
    stand-in hosts share this machine's disk, so node 1's folder outlives its instance.)"""
    params = {**TINY_PARAMS, "data": "synthetic", "output_dir": "outputs", "num_epochs": "3"}
    cfg = host_config(aws, tmp_path, node_count=2, spot=True, reconnect_timeout=20,
                      max_recoveries=1, watch_seconds=1)
    proc = mlflow_cli(ROOT, "ec2", cfg, params)
    run = server_store.wait_for_run(proc, timeout=300)
    client = server_store.client
    wait_until(lambda: client.list_artifacts(run.info.run_id, "checkpoints"),
               what="a checkpoint artifact", timeout=400, interval=0.2, proc=proc)
    first = aws.instances(("running",))
    assert len(first) == 2
    node1 = next(i for i in first if {"Key": "fowlflow:node", "Value": "1"} in i["Tags"])
    aws.ec2.terminate_instances(InstanceIds=[node1["InstanceId"]])
    code, out, err = finish(proc, timeout=600)
    assert code == 0, out[-3000:] + err[-12000:]
    run = server_store.only_run()
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags["fowlflow.nodes"] == "2"
    assert tags["fowlflow.ec2.recoveries"] == "1"
    recovery = json.loads(tags["fowlflow.ec2.recovery.1"])
    assert recovery["lost"].startswith(f"node1 {node1['InstanceId']}")
    assert list(recovery["noticed"]) == ["node1"]
    instances = json.loads(tags["fowlflow.ec2.instances"])
    assert node1["InstanceId"] not in instances and recovery["replacements"][0] in instances
    assert "stopping the other node(s)" in err
    assert tags["resumed_from"] == f"runs:/{run.info.run_id}/checkpoints/checkpoint.pt"
    for key in [k for k in run.data.metrics if not k.startswith("system/")]:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc")) \
        == [1, 2, 3]
    assert aws.leftovers() == {}
