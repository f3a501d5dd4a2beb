"""EC2, SSM and STS for the ec2 backend's tests: a moto server, because no real AWS is
reachable from here.

moto runs in server mode on a free port; boto3 (in the tests, in the backend, in the ``mlflow``
and ``fowlflow`` CLIs they start) reaches it through ``AWS_ENDPOINT_URL_EC2`` / ``_SSM`` /
``_STS``, the same way it would reach AWS, so no boto3 call is patched. Each test starts from
a reset moto (``/moto-api/reset``) with its own VPC whose subnet is the test bridge's /24
(conftest.py's ``BRIDGE_IP``): the addresses moto hands out (.4, .5, ...) are addresses
:mod:`tests.projects.ec2_hosts` can start real sshd hosts at.

:class:`FaultyEc2` sits in front of moto and answers one chosen ``RunInstances`` call with
AWS's ``InsufficientInstanceCapacity`` error ("the second instance fails").
"""

from __future__ import annotations

import http.server
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

from tests.net import free_port
from tests.projects.conftest import BRIDGE_IP

REGION = "us-east-1"
SUBNET_CIDR = BRIDGE_IP.rsplit(".", 1)[0] + ".0/24"  # the test bridge's network (conftest.py)
CAPACITY_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
                  b"<Code>InsufficientInstanceCapacity</Code><Message>We currently do not have "
                  b"sufficient capacity in the Availability Zone you requested.</Message>"
                  b"</Error></Errors><RequestID>fowlflow-test</RequestID></Response>")


@dataclass(frozen=True)
class Moto:
    url: str
    image_id: str  # a Linux AMI of moto's built-in list (the same after every reset)


@pytest.fixture(scope="session")
def moto_url() -> Moto:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=url,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    image = next(i["ImageId"] for i in ec2.describe_images()["Images"]
                 if i.get("Platform") != "windows")
    yield Moto(url, image)
    server.stop()


@dataclass
class Aws:
    """This test's moto: clients, its subnet, and what fowlflow left there."""

    url: str
    ec2: object
    subnet_id: str
    image_id: str

    def leftovers(self) -> dict:
        """Every fowlflow-tagged resource that still exists (instances not terminated)."""
        tagged = [{"Name": "tag-key", "Values": ["fowlflow:cluster"]}]
        instances = [i["InstanceId"] for r in self.ec2.describe_instances(Filters=tagged + [
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping",
                                                       "stopped", "shutting-down"]}])[
            "Reservations"] for i in r["Instances"]]
        found = {
            "instances": instances,
            "volumes": [v["VolumeId"] for v in self.ec2.describe_volumes(Filters=tagged)[
                "Volumes"]],
            "security_groups": [g["GroupId"] for g in self.ec2.describe_security_groups(
                Filters=tagged)["SecurityGroups"]],
            "key_pairs": [k["KeyName"] for k in self.ec2.describe_key_pairs(Filters=tagged)[
                "KeyPairs"]]}
        return {k: v for k, v in found.items() if v}

    def instances(self, states=("pending", "running")) -> list[dict]:
        return [i for r in self.ec2.describe_instances(Filters=[
            {"Name": "tag-key", "Values": ["fowlflow:cluster"]},
            {"Name": "instance-state-name", "Values": list(states)}])["Reservations"]
            for i in r["Instances"]]


@pytest.fixture
def aws(moto_url, monkeypatch, tmp_path) -> Aws:
    """A reset moto, this test's credentials/endpoints in the environment, a subnet."""
    import boto3

    moto_url, image = moto_url.url, moto_url.image_id
    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset",
                                                  method="POST"), timeout=30).close()
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
           "FOWLFLOW_EC2_HOME": str(tmp_path / "ec2-home")}
    for service in ("EC2", "SSM", "STS", "PRICING"):  # moto has no Pricing API: a 500, the table
        env[f"AWS_ENDPOINT_URL_{service}"] = moto_url
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ec2 = boto3.client("ec2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=SUBNET_CIDR)["Subnet"]["SubnetId"]
    return Aws(moto_url, ec2, subnet, image)


def ec2_config(aws: Aws, **extra) -> dict:
    """A backend config for moto's subnet: private addresses, the test's Python."""
    import sys

    return {"instance_type": "g6e.xlarge", "image": aws.image_id, "subnet_id": aws.subnet_id,
            "address": "private", "user": "root", "python": sys.executable, "setup": [],
            "ssh_timeout": 60, "connect_timeout": 5, **extra}


class FaultyEc2:
    """An EC2 endpoint that forwards to moto but fails RunInstances call number ``fail_at``
    (1-based) with InsufficientInstanceCapacity."""

    def __init__(self, upstream: str, fail_at: int):
        calls = {"RunInstances": 0}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if b"Action=RunInstances" in body:
                    calls["RunInstances"] += 1
                    if calls["RunInstances"] == fail_at:
                        return self._reply(400, CAPACITY_ERROR, "text/xml")
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length")}
                req = urllib.request.Request(upstream + self.path, data=body, headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        self._reply(resp.status, resp.read(), resp.headers["Content-Type"])
                except urllib.error.HTTPError as err:
                    self._reply(err.code, err.read(), err.headers["Content-Type"])

            def _reply(self, code, data, ctype):
                self.send_response(code)
                self.send_header("Content-Type", ctype or "text/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.calls = calls
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
