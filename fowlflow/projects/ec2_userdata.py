"""Keys and user data: each instance's SSH host key is made here, so the first connection is
checked against a known key, never trusted blindly.

    client = client_key(state_dir)            # id_ed25519 (0600) + .pub: the key pair
    host = HostKey.generate()                 # private + public, in memory only
    text = user_data(host, cfg, idle_minutes=30)   # #cloud-config for run_instances
    add_known_host(state_dir / "known_hosts", "10.0.0.5", host.public)

cloud-init installs ``ssh_keys`` as the sshd host key before sshd starts, runs ``setup`` (by
default: MLflow into the image's Python) and starts the idle watchdog (:mod:`.ec2_autostop`).
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fowlflow.errors import RemoteError
from fowlflow.projects.ec2_config import Ec2Config

AUTOSTOP_SRC = Path(__file__).with_name("ec2_autostop.py")
AUTOSTOP_PATH = "/usr/local/bin/fowlflow-autostop"
AUTOSTOP_UNIT = """[Unit]
Description=fowlflow idle watchdog: shut down after {minutes} idle minutes
[Service]
ExecStart=/usr/bin/python3 {path} --idle-minutes {minutes}
Restart=on-failure
[Install]
WantedBy=multi-user.target
"""


def _keygen(path: Path, comment: str) -> None:
    proc = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                           "-f", str(path)], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RemoteError(f"ssh-keygen failed: {proc.stderr.strip()}; install openssh-client")


@dataclass(frozen=True)
class HostKey:
    """One instance's ed25519 host key; the private half only ever goes into user data."""

    private: str
    public: str  # "ssh-ed25519 AAAA... comment"

    @classmethod
    def generate(cls, comment: str = "fowlflow-host") -> "HostKey":
        with tempfile.TemporaryDirectory(prefix="fowlflow-hostkey-") as tmp:
            path = Path(tmp) / "key"
            _keygen(path, comment)
            return cls(path.read_text(), path.with_suffix(".pub").read_text().strip())


def client_key(state_dir: Path) -> Path:
    """The cluster's login key in ``state_dir`` (made once, 0600); returns its path."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    state_dir.chmod(0o700)
    key = state_dir / "id_ed25519"
    if not key.exists():
        _keygen(key, f"fowlflow-{state_dir.name}")
    key.chmod(0o600)
    return key


def add_known_host(known_hosts: Path, address: str, public: str) -> None:
    """Trust ``public`` for ``address`` (replacing an older line for the same address)."""
    keep = [line for line in (known_hosts.read_text().splitlines()
                              if known_hosts.exists() else [])
            if line.split(" ", 1)[0] != address]
    key_type, key_b64 = public.split()[:2]
    known_hosts.write_text("\n".join([*keep, f"{address} {key_type} {key_b64}"]) + "\n")
    known_hosts.chmod(0o600)


def user_data(host: HostKey, cfg: Ec2Config) -> str:
    """The instance's ``#cloud-config``: host key, setup commands, the idle watchdog."""
    import yaml

    doc = {"ssh_deletekeys": True, "ssh_genkeytypes": [],
           "ssh_keys": {"ed25519_private": host.private, "ed25519_public": host.public},
           "runcmd": list(cfg.setup_commands)}
    if cfg.idle_minutes:
        doc["write_files"] = [
            {"path": AUTOSTOP_PATH, "permissions": "0755", "content": AUTOSTOP_SRC.read_text()},
            {"path": "/etc/systemd/system/fowlflow-autostop.service",
             "content": AUTOSTOP_UNIT.format(minutes=cfg.idle_minutes, path=AUTOSTOP_PATH)}]
        doc["runcmd"] += [["systemctl", "daemon-reload"],
                          ["systemctl", "enable", "--now", "fowlflow-autostop.service"]]
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False)
