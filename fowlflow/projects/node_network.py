"""What a multi-node run needs to know about the hosts' network, asked on the hosts themselves.

Two questions, each one command through the host's :class:`~fowlflow.projects.runners.Runner`::

    port = free_port(runner, "python3")            # a TCP port nothing listens on, e.g. 41873
    iface = route_interface(runner, "10.0.0.6")    # "eth0": the interface that reaches a peer

``free_port`` gives every run its own rendezvous port (two runs on the same hosts no longer
both take 29400). ``route_interface`` is asked on every node for another node's address
(``ip -o route get``): gloo and NCCL otherwise pick their interface from the address the
host's *name* resolves to, which is loopback where ``/etc/hosts`` says ``127.0.1.1 hostname``
(Debian's default), and the peers then try to reach each other at 127.0.0.1.
"""

from __future__ import annotations

import logging
import re

from fowlflow.errors import RemoteError
from fowlflow.projects.runners import Runner

_logger = logging.getLogger(__name__)
DEFAULT_RDZV_PORT = 29400
SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
# Binds port 0 on every address (as torchrun's c10d store does) and prints what the kernel gave.
_FREE_PORT = ("import socket; s = socket.socket(); s.bind(('', 0)); "
              "print(s.getsockname()[1])")
_DEV = re.compile(r"\bdev\s+(\S+)")


def free_port(runner: Runner, python: str) -> int:
    """A TCP port that is free on ``runner``'s machine right now."""
    return int(runner.run([python, "-c", _FREE_PORT], timeout=60).stdout.strip())


def route_interface(runner: Runner, peer: str) -> str | None:
    """The interface ``runner``'s machine uses to reach ``peer`` (None, with a warning, when
    the host has no ``ip`` or no route)."""
    proc = runner.run(["ip", "-o", "route", "get", peer], timeout=60, check=False)
    match = _DEV.search(proc.stdout.decode(errors="replace"))
    if proc.returncode != 0 or match is None:
        _logger.warning("%s: could not find the interface that reaches %s (`ip -o route get "
                        "%s`: %s); gloo/NCCL choose their own; if the nodes can't connect, set "
                        "\"env\": {\"GLOO_SOCKET_IFNAME\": ..., \"NCCL_SOCKET_IFNAME\": ...}",
                        runner.name, peer, peer,
                        (proc.stderr or proc.stdout).decode(errors="replace").strip()
                        or f"exit {proc.returncode}")
        return None
    return match.group(1)


def socket_env(iface: str | None, user_env: dict) -> dict:
    """``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` for ``iface``; the user's ``env`` wins."""
    if iface is None:
        return {}
    return {name: iface for name in SOCKET_IFNAME_VARS if name not in user_env}


def peer_of(rank: int, addrs: list[str]) -> str:
    """The address node ``rank`` must reach: node 0 (the rendezvous host), node 1 for node 0."""
    return addrs[1] if rank == 0 else addrs[0]


def rendezvous_port(configured: int | None, rdzv_runner: Runner | None, python: str) -> int:
    """The configured port, else a free one probed on the rendezvous host (when it is one of
    the run's hosts), else torchrun's usual 29400."""
    if configured is not None:
        return configured
    if rdzv_runner is None:
        return DEFAULT_RDZV_PORT
    try:
        return free_port(rdzv_runner, python)
    except (RemoteError, ValueError) as exc:
        raise RemoteError(f"{rdzv_runner.name}: could not find a free port for the rendezvous "
                          f"({exc}); fix: set \"rdzv_port\" in the backend config") from exc
