"""Wait until freshly started instances take SSH logins and cloud-init has finished.

    wait_ssh(hosts, access, timeout=900)

For each host: port 22 accepts connections, then one login (host key checked against the
key fowlflow made for it) that waits for ``cloud-init status --wait`` where cloud-init exists,
so the setup commands (MLflow into the image's Python) are done before the launch starts.
"""

from __future__ import annotations

import socket
import time

from fowlflow.errors import RemoteError
from fowlflow.projects.config import HostSpec, SshAccess
from fowlflow.projects.runners import SshRunner

CLOUD_INIT_WAIT = ("command -v cloud-init >/dev/null 2>&1 || exit 0; "
                   "cloud-init status --wait >/dev/null; exit 0")


def _port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return True
    except OSError:
        return False


def wait_ssh(hosts: list[HostSpec], access: SshAccess, timeout: float) -> None:
    """Return once every host took a login; retry until ``timeout`` s have passed.

    Raises:
        RemoteError: a host did not get there in time; names the host and the likely fixes.
    """
    deadline = time.monotonic() + timeout
    for host in hosts:
        port, last = host.port or 22, None
        while True:
            if _port_open(host.host, port):
                try:
                    SshRunner(host, access).run(["sh", "-c", CLOUD_INIT_WAIT],
                                                timeout=max(5.0, deadline - time.monotonic()))
                    break
                except RemoteError as exc:
                    last = exc
            if time.monotonic() > deadline:
                why = f" (last error: {last})" if last else " (port 22 never answered)"
                raise RemoteError(
                    f"SSH on {host.host}:{port} was not ready within {timeout:.0f} s{why}; "
                    "the instance may boot slowly (raise \"ssh_timeout\"), or port 22 is "
                    "blocked from here (check \"ssh_cidr\", \"security_group_ids\" and "
                    "\"address\": \"public\" unless this machine is in the VPC)")
            time.sleep(1)
