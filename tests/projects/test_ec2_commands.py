"""``fowlflow ec2 ls|down|gc`` (the real CLI, as docs/ec2.md writes it) and the autostop
watchdog.

moto's server mode stands in for EC2, because no real AWS is reachable from here: the tests
plant fowlflow-tagged resources there with boto3, the way a launch or a crashed launch leaves
them, and the CLI finds them through ``AWS_ENDPOINT_URL_EC2``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from fowlflow.projects.ec2_autostop import busy
from tests.projects.ec2_moto import aws, moto_url  # noqa: F401
from tests.projects.helpers import BIN
from tests.test_docs_commands import documented

AUTOSTOP = [sys.executable, "-m", "fowlflow.projects.ec2_autostop"]


def sh(command: str) -> subprocess.CompletedProcess:
    """A command of docs/ec2.md as written, with the venv's bin/ first on PATH."""
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})


def plant(aws, cluster: str, *, keep=False, run_id=None, age_min=60.0, instance=True,
          idle_minutes=None):
    """What a launch leaves: a tagged key pair, security group and (optionally) instance."""
    tags = {"fowlflow:cluster": cluster, "fowlflow:keep": str(keep).lower(),
            "fowlflow:created": str(int(time.time() - age_min * 60))}
    if idle_minutes is not None:
        tags["fowlflow:idle-minutes"] = str(idle_minutes)
    if run_id:
        tags["fowlflow:run-id"] = run_id
    spec = lambda kind: [{"ResourceType": kind,  # noqa: E731
                          "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
    vpc = aws.ec2.describe_subnets(SubnetIds=[aws.subnet_id])["Subnets"][0]["VpcId"]
    aws.ec2.create_security_group(GroupName=f"fowlflow-{cluster}", Description="test",
                                  VpcId=vpc, TagSpecifications=spec("security-group"))
    aws.ec2.create_key_pair(KeyName=f"fowlflow-{cluster}", TagSpecifications=spec("key-pair"))
    if instance:
        aws.ec2.run_instances(ImageId=aws.image_id, InstanceType="g6e.xlarge", MinCount=1,
                              MaxCount=1, SubnetId=aws.subnet_id,
                              TagSpecifications=spec("instance"))


def clusters_left(aws) -> set[str]:
    tagged = [{"Name": "tag-key", "Values": ["fowlflow:cluster"]}]
    names = {t["Value"] for g in aws.ec2.describe_security_groups(Filters=tagged)[
        "SecurityGroups"] for t in g["Tags"] if t["Key"] == "fowlflow:cluster"}
    names |= {t["Value"] for i in aws.instances(("pending", "running")) for t in i["Tags"]
              if t["Key"] == "fowlflow:cluster"}
    return names


def test_gc_finds_planted_orphans_dry_run_first(aws, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    ended = client.create_run("0").info.run_id
    client.set_terminated(ended, "FAILED")
    live = client.create_run("0").info.run_id
    plant(aws, "ended-run", run_id=ended)                 # garbage: its run ended
    plant(aws, "died-launching", age_min=90)              # garbage: no run after 90 min
    plant(aws, "stopped-itself", instance=False)          # garbage: group + key pair only
    plant(aws, "kept", keep=True, run_id=ended)           # kept on purpose
    plant(aws, "running", run_id=live)                    # its run is live
    plant(aws, "starting", age_min=1)                     # may still be starting
    plant(aws, "elsewhere", run_id="0123456789abcdef0123456789abcdef")  # not in this store
    before = clusters_left(aws)
    dry = sh(documented("fowlflow ec2 gc"))
    assert dry.returncode == 0, dry.stderr
    assert "(dry run: add --yes" in dry.stdout
    for name in ("ended-run", "died-launching", "stopped-itself"):
        assert f"would remove cluster {name}:" in dry.stdout
    assert clusters_left(aws) == before  # nothing removed by a dry run
    real = sh(documented("fowlflow ec2 gc --yes"))
    assert real.returncode == 0, real.stderr
    assert clusters_left(aws) == {"kept", "running", "starting", "elsewhere"}
    listing = sh(documented("fowlflow ec2 ls"))
    assert listing.returncode == 0, listing.stderr
    assert [line.split()[0] for line in listing.stdout.splitlines()[1:]] == \
        ["elsewhere", "kept", "running", "starting"]
    assert "1 x g6e.xlarge" in listing.stdout and "1.86" in listing.stdout


def test_ls_shows_idle_time_from_the_last_run(aws, tmp_path, monkeypatch):
    """IDLE: since the last run ended in the tracking store, ``run on`` while it runs, since
    launch without a run, ``?`` for a run the store does not know; AUTOSTOP from the tag."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    ended = client.create_run("0").info.run_id
    client.set_terminated(ended, "FINISHED", end_time=int((time.time() - 42 * 60) * 1000))
    live = client.create_run("0").info.run_id
    plant(aws, "ended", keep=True, run_id=ended, idle_minutes=60)
    plant(aws, "busy", keep=True, run_id=live, idle_minutes=0)
    plant(aws, "never-ran", keep=True, idle_minutes=30)
    plant(aws, "elsewhere", run_id="0123456789abcdef0123456789abcdef")
    plant(aws, "stopped-itself", instance=False)
    listing = sh("fowlflow ec2 ls")
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()}
    assert "IDLE" in lines["NAME"] and "AUTOSTOP" in lines["NAME"]
    expected = {"ended": r"4[23]m +60m", "busy": "run on +off", "never-ran": "[01]m +30m",
                "elsewhere": r"\? +-", "stopped-itself": "- +-"}
    for name, idle in expected.items():
        assert re.search(rf"^{name} .*m +{idle} ", lines[name]), (name, listing.stdout)


def test_down_removes_a_cluster_and_names_an_unknown_one(aws):
    plant(aws, "gpu-cluster")
    done = sh(documented("fowlflow ec2 down gpu-cluster"))
    assert done.returncode == 0, done.stderr
    assert "1 instances, 1 security groups, 1 key pairs" in done.stdout
    assert clusters_left(aws) == set()
    missing = sh("fowlflow ec2 down gpu-cluster")
    assert missing.returncode == 2
    assert "no cluster 'gpu-cluster' in this region (fowlflow ec2 ls" in missing.stderr


def test_autostop_shuts_down_after_idle_not_while_a_run_is_on(tmp_path):
    """The watchdog from the user data, run here with a short timer and a stand-in for
    ``shutdown`` (a command that writes a file): it waits while a process carrying the marker
    runs, then "shuts down" once the machine has been idle long enough."""
    marker = f"ff-autostop-test-{time.monotonic_ns()}"
    flag = tmp_path / "shut-down"
    busy_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                  marker])
    watchdog = subprocess.Popen([*AUTOSTOP, "--idle-minutes", "0.02", "--interval", "0.1",
                                 "--marker", marker, "--shutdown", f"touch {flag}"],
                                stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # 2.5 x the idle time, while "a run" is on
        assert watchdog.poll() is None and not flag.exists()
        busy_proc.kill()
        busy_proc.wait()
        out, _ = watchdog.communicate(timeout=20)
    finally:
        for proc in (busy_proc, watchdog):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert watchdog.returncode == 0 and flag.exists()
    assert "idle for 0.0 min; running touch" in out
    assert not busy(marker)

