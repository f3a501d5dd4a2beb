"""``-b ec2`` config: the cloud keys, plus the ssh backend's keys that still make sense.

    cfg = parse_ec2_config({"instance_type": "g6e.xlarge", "node_count": 2, "spot": True})
    cfg.ssh            # an SshConfig (python, env, tunnel, ...) whose hosts come later
    cfg.terminate_at_end   # down, else: true unless the cluster is named (kept warm)

Unknown keys are refused, naming the valid ones; nothing here talks to AWS (see
:mod:`.ec2_cloud` for the checks that do).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fowlflow.errors import ConfigError
from fowlflow.projects.config import (NprocSpec, SshConfig, _bool, _int, _nproc,
                                      parse_ssh_config)

# The public PyTorch deep-learning AMI (Ubuntu 22.04, NVIDIA driver), resolved through SSM.
DEFAULT_IMAGE = ("/aws/service/deeplearning/ami/x86_64/"
                 "oss-nvidia-driver-gpu-pytorch-2.7-ubuntu-22.04/latest/ami-id")
DEFAULT_PYTHON = "/opt/pytorch/bin/python3"  # that AMI's PyTorch environment
# ssh-backend keys passed through as they are (hosts, keys and known_hosts are the backend's).
SSH_KEYS = ("python", "remote_dir", "connect_timeout", "ssh_options", "env", "forward_env",
            "tunnel", "tunnel_remote_port", "rdzv_port", "max_restarts", "ship", "wait",
            "stream", "reconnect_timeout")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
TAG_PREFIX = "fowlflow:"


@dataclass(frozen=True)
class Ec2Config:
    """What to launch, where, and how to reach it; ``ssh`` holds the ssh-backend settings."""

    region: str | None = None
    instance_type: str = "g4dn.xlarge"
    node_count: int = 1
    process_count_per_node: NprocSpec = "all"
    image: str = DEFAULT_IMAGE
    spot: bool = False
    max_price: float | None = None
    pricing_api: bool = True
    subnet_id: str | None = None
    security_group_ids: tuple[str, ...] = ()
    ssh_cidr: str | None = None
    volume_size_gb: int = 100
    iam_instance_profile: str | None = None
    tags: dict = field(default_factory=dict)
    cluster_name: str | None = None
    idle_minutes: int = 30
    down: bool | None = None
    address: str = "public"
    user: str = "ubuntu"
    ssh_timeout: int = 900
    setup: tuple[str, ...] | None = None
    max_recoveries: int = 3
    watch_seconds: int = 10
    ssh: SshConfig = field(default_factory=lambda: parse_ssh_config({"hosts": ["-"]}))

    @property
    def kept(self) -> bool:
        """A named cluster stays up after the run unless ``down`` says otherwise."""
        return not self.terminate_at_end

    @property
    def terminate_at_end(self) -> bool:
        return self.down if self.down is not None else self.cluster_name is None

    @property
    def setup_commands(self) -> tuple[str, ...]:
        """Run by cloud-init at first boot; by default MLflow into the image's Python."""
        if self.setup is not None:
            return self.setup
        return (f"{self.ssh.python} -m pip install -q 'mlflow==3.17.*'",)


def _str(user: dict, key: str, default=None, choices: tuple[str, ...] = ()):
    value = user.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str) or not value or (choices and value not in choices):
        want = " or ".join(f'"{c}"' for c in choices) if choices else "a non-empty string"
        raise ConfigError(f"{key} must be {want}, got {value!r}")
    return value


def _str_list(user: dict, key: str) -> tuple[str, ...] | None:
    value = user.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key} must be a list of strings, got {value!r}")
    return tuple(value)


def _tags(user: dict) -> dict:
    tags = user.get("tags", {})
    if not isinstance(tags, dict) or not all(isinstance(k, str) and k for k in tags):
        raise ConfigError(f"tags must be an object of Key: value, got {tags!r}")
    reserved = [k for k in tags if k.startswith(TAG_PREFIX) or k.startswith("aws:")]
    if reserved:
        raise ConfigError(f"tags {reserved}: the prefixes \"{TAG_PREFIX}\" and \"aws:\" are "
                          "reserved (fowlflow and AWS set them); rename these tags")
    return {k: str(v) for k, v in tags.items()}


def _checked(user: dict) -> dict:
    """The values that need more than a type check."""
    name = _str(user, "cluster_name")
    if name is not None and not NAME_RE.match(name):
        raise ConfigError(f"cluster_name {name!r} must be 1-40 lowercase letters, digits or "
                          "'-', starting with a letter (e.g. \"gpu-cluster\")")
    cidr = _str(user, "ssh_cidr")
    if cidr is not None:
        try:
            cidr = str(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise ConfigError(f"ssh_cidr {cidr!r} is not a CIDR block; give e.g. "
                              "\"203.0.113.7/32\" (your address) or \"10.0.0.0/16\"") from None
    price = user.get("max_price")
    if price is not None and (isinstance(price, bool) or not isinstance(price, (int, float))
                              or price <= 0):
        raise ConfigError(f"max_price must be a positive number of USD per hour, "
                          f"got {price!r}")
    if price is not None and not user.get("spot"):
        raise ConfigError("max_price only applies to spot instances; add \"spot\": true or "
                          "remove max_price")
    down = user.get("down")
    if down is not None and not isinstance(down, bool):
        raise ConfigError(f"down must be true or false, got {down!r}")
    if user.get("wait") is False and user.get("idle_minutes") == 0 and down is not False:
        raise ConfigError("\"wait\": false with \"idle_minutes\": 0 would leave the "
                          "instances running after the run; keep idle_minutes > 0 (the "
                          "instances then stop themselves) or add \"down\": false on purpose")
    return {"cluster_name": name, "ssh_cidr": cidr, "down": down,
            "max_price": float(price) if price is not None else None}


def parse_ec2_config(user: dict) -> Ec2Config:
    """Validate the ec2 backend's keys (MLflow's already removed).

    Raises:
        ConfigError: unknown key or bad value; the message names the valid keys or values.
    """
    valid = sorted({f.name for f in dataclasses.fields(Ec2Config)} - {"ssh"} | set(SSH_KEYS))
    unknown = sorted(set(user) - set(valid))
    if unknown:
        raise ConfigError(f"unknown ec2 backend config key(s) {unknown}; valid keys are: "
                          f"{', '.join(valid)}")
    ssh_user = {k: user[k] for k in SSH_KEYS if k in user}
    ssh = parse_ssh_config({"hosts": ["-"], "python": DEFAULT_PYTHON, **ssh_user})
    return Ec2Config(
        region=_str(user, "region"),
        instance_type=_str(user, "instance_type", Ec2Config.instance_type),
        node_count=_int(user, "node_count", 1, minimum=1),
        process_count_per_node=_nproc(user),
        image=_str(user, "image", DEFAULT_IMAGE), spot=_bool(user, "spot", False),
        pricing_api=_bool(user, "pricing_api", True),
        subnet_id=_str(user, "subnet_id"),
        security_group_ids=_str_list(user, "security_group_ids") or (),
        volume_size_gb=_int(user, "volume_size_gb", 100, minimum=8),
        iam_instance_profile=_str(user, "iam_instance_profile"), tags=_tags(user),
        idle_minutes=_int(user, "idle_minutes", 30, minimum=0),
        address=_str(user, "address", "public", choices=("private", "public")),
        user=_str(user, "user", "ubuntu"),
        ssh_timeout=_int(user, "ssh_timeout", 900, minimum=1),
        setup=_str_list(user, "setup"), max_recoveries=_int(user, "max_recoveries", 3),
        watch_seconds=_int(user, "watch_seconds", 10, minimum=0),
        ssh=ssh, **_checked(user))


def state_dir(cluster: str) -> Path:
    """This machine's folder for one cluster's SSH key and known_hosts (0700):
    ``$FOWLFLOW_EC2_HOME/<cluster>``, by default ``~/.fowlflow/ec2/<cluster>``."""
    base = Path(os.environ.get("FOWLFLOW_EC2_HOME") or Path.home() / ".fowlflow" / "ec2")
    return base / cluster
