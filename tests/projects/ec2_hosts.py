"""The test plays the cloud booting instances: real sshd hosts at the addresses moto assigns.

:class:`FakeCloud` watches moto (no real AWS is reachable here) for fowlflow's instances. For
each new running instance it does what EC2 + cloud-init would: reads the instance's user data,
installs the SSH host key from it, authorizes the key pair's public key, and starts an sshd in
a network namespace of its own at the instance's private address, on the bridge of
tests/projects/conftest.py (``BRIDGE``; moto's subnet is the bridge's /24). When
moto says an instance is terminated, its sshd is stopped and its namespace deleted (the
machine is gone: its processes are killed and, with ``disk`` set, that folder is deleted, as
the instance's disk would be). Setup commands and the autostop service in the user data are not run here
(the watchdog has its own test). Every namespace and link is deleted by name at the end.
"""

from __future__ import annotations

import base64
import itertools
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.projects.conftest import BRIDGE, NETNS_ETC, NS_IFACE, Keys, Sshd, _run, \
    start_sshd, stop

_serial = itertools.count()


@dataclass
class Booted:
    instance_id: str
    address: str
    netns: str
    veth: str
    sshd: Sshd


def _add_namespace(ns: str, veth: str, address: str) -> None:
    (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
    (NETNS_ETC / ns / "hosts").write_text(
        f"127.0.0.1 localhost\n127.0.1.1 {socket.gethostname()}\n")
    _run("ip", "netns", "add", ns)
    _run("ip", "link", "add", veth, "type", "veth", "peer", "name", NS_IFACE, "netns", ns)
    _run("ip", "link", "set", veth, "master", BRIDGE)
    _run("ip", "link", "set", veth, "up")
    _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev", NS_IFACE)
    _run("ip", "netns", "exec", ns, "ip", "link", "set", NS_IFACE, "up")
    _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")


def _delete_namespace(ns: str, veth: str) -> None:
    _run("ip", "netns", "del", ns, check=False)
    _run("ip", "link", "del", veth, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


class FakeCloud:
    """Boots fowlflow's moto instances as sshd hosts until :meth:`close`."""

    def __init__(self, ec2, workdir: Path, boot_delay: float = 0.0):
        self.ec2, self.workdir, self.boot_delay = ec2, workdir, boot_delay
        self.booted: dict[str, Booted] = {}
        self.errors: list[str] = []
        self.disk: Path | None = None  # a folder that goes with a halted machine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as exc:  # shown by the test through self.errors
                self.errors.append(repr(exc))
            self._stop.wait(0.2)

    def _sync(self) -> None:
        reservations = self.ec2.describe_instances(Filters=[
            {"Name": "tag-key", "Values": ["fowlflow:cluster"]}])["Reservations"]
        for inst in (i for r in reservations for i in r["Instances"]):
            iid, state = inst["InstanceId"], inst["State"]["Name"]
            if state == "running" and iid not in self.booted:
                time.sleep(self.boot_delay)
                self.booted[iid] = self._boot(inst)
            elif state in ("shutting-down", "terminated") and iid in self.booted \
                    and self.booted[iid].sshd.proc.poll() is None:
                self._halt(self.booted[iid])

    def _boot(self, inst: dict) -> Booted:
        iid, address = inst["InstanceId"], inst["PrivateIpAddress"]
        d = self.workdir / iid
        d.mkdir(parents=True)
        d.chmod(0o700)
        raw = self.ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")
        cloud = yaml.safe_load(base64.b64decode(raw["UserData"]["Value"]))
        host_key = d / "ssh_host_ed25519_key"
        host_key.write_text(cloud["ssh_keys"]["ed25519_private"])
        host_key.chmod(0o600)
        host_key.with_suffix(".pub").write_text(cloud["ssh_keys"]["ed25519_public"] + "\n")
        pair = self.ec2.describe_key_pairs(KeyNames=[inst["KeyName"]],
                                           IncludePublicKey=True)["KeyPairs"][0]
        auth = d / "authorized_keys"
        auth.write_text(pair["PublicKey"].strip() + "\n")
        n = next(_serial)
        ns, veth = f"{BRIDGE}-ec2-{n}", f"{BRIDGE}e{n}"  # per test session, like the bridge
        _add_namespace(ns, veth, address)
        keys = Keys(d, d / "unused", host_key, d / "cloud-side-known-hosts", auth)
        sshd = start_sshd(keys, address, 22, d / "sshd", netns=ns)
        return Booted(iid, address, ns, veth, sshd)

    def _halt(self, booted: Booted) -> None:
        """The machine goes away: its sshd and every process left in its namespace."""
        stop(booted.sshd.proc)
        pids = _run("ip", "netns", "pids", booted.netns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _delete_namespace(booted.netns, booted.veth)
        if self.disk is not None:  # the namespaces share this machine's disk; an instance's
            shutil.rmtree(self.disk, ignore_errors=True)  # own disk goes with it

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for booted in self.booted.values():
            self._halt(booted)
