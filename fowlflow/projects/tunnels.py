"""How remote hosts reach the tracking server: the URI they get, and ``ssh -R`` tunnels.

    host_uri = remote_tracking_uri(tracking_uri, cfg, ["10.0.0.5"])   # ConfigError if unreachable
    tunnels = Tunnels(runners, tracking_uri, remote_port=15000)       # "tunnel": true
    ...
    tunnels.close()
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from urllib.parse import urlparse

from fowlflow.errors import ConfigError, RemoteError
from fowlflow.projects.config import SshConfig
from fowlflow.projects.runners import SshRunner
from fowlflow.projects.ssh_connections import ssh_options

LOOPBACK_NAMES = ("localhost", "ip6-localhost")
TUNNEL_SETTLE_S = 1.0  # a forward that fails (port taken) makes ssh exit within this


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _port(parsed) -> int:
    return parsed.port or (443 if parsed.scheme == "https" else 80)


def remote_tracking_uri(tracking_uri: str, cfg: SshConfig, host_addrs: list[str]) -> str:
    """The tracking URI the hosts use; refuses URIs a remote host can't reach.

    Raises:
        ConfigError: file/SQLite/other non-HTTP URI, or a loopback server without a tunnel.
    """
    parsed = urlparse(tracking_uri)
    if parsed.scheme not in ("http", "https"):
        raise ConfigError(
            f"the ssh backend needs an http(s) tracking server that the hosts can reach, but "
            f"MLFLOW_TRACKING_URI is {tracking_uri!r} (a store on this machine). Fix: start "
            f"one, e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db --host 0.0.0.0 "
            f"--port 5000`, and set MLFLOW_TRACKING_URI=http://<this machine's address>:5000; "
            f"or keep it on 127.0.0.1 and add \"tunnel\": true to reach it through SSH")
    if cfg.tunnel:
        if not is_loopback(parsed.hostname or ""):
            raise ConfigError(f"\"tunnel\": true forwards a tracking server on this machine, "
                              f"but {tracking_uri!r} is not on localhost; remove \"tunnel\"")
        port = cfg.tunnel_remote_port or _port(parsed)
        return parsed._replace(netloc=f"127.0.0.1:{port}").geturl()
    if is_loopback(parsed.hostname or "") and not all(is_loopback(a) for a in host_addrs):
        raise ConfigError(f"the tracking server {tracking_uri!r} is on this machine's loopback "
                          f"address, which the hosts can't reach. Fix: add \"tunnel\": true, or "
                          f"serve on an address they can reach (mlflow server --host 0.0.0.0)")
    return tracking_uri


class Tunnels:
    """``ssh -N -R`` per host: the hosts reach the local tracking server on 127.0.0.1.

    Each tunnel is its own SSH connection (not a shared one), so it lives exactly as long as
    its process.
    """

    def __init__(self, runners: list[SshRunner], tracking_uri: str, remote_port: int):
        parsed = urlparse(tracking_uri)
        local = f"{parsed.hostname}:{_port(parsed)}"
        self.procs = []
        for runner in runners:
            argv = ["ssh", *ssh_options(runner.host, runner.access), "-N",
                    "-o", "ExitOnForwardFailure=yes", "-R", f"127.0.0.1:{remote_port}:{local}",
                    runner.host.destination]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            self.procs.append(proc)
            time.sleep(TUNNEL_SETTLE_S)
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace")[-1500:]
                self.close()
                raise RemoteError(f"reverse tunnel to {runner.name} failed: {err}\n  fix: "
                                  f"tunnel_remote_port {remote_port} may be taken on the host, "
                                  "or the host's sshd has AllowTcpForwarding no")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
