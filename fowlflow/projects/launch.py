"""Pure functions that turn an entry point command into the argv a node runs.

MLflow renders an entry point to one shell string (``python -m fowlflow.train --data x``);
:func:`torchrun_argv` wraps it for ``torch.distributed.run``::

    torchrun_argv("python -m fowlflow.train --num_epochs 1", nproc=2)
    # ['python', '-m', 'torch.distributed.run', '--nproc-per-node', '2', '--standalone',
    #  '--max-restarts', '0', '-m', 'fowlflow.train', '--num_epochs', '1']

``python -m X`` and ``python script.py`` become torchrun's module/script form; any other command
runs under ``--no-python``. Nothing here touches the system, so all of it is unit-tested.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from fowlflow.errors import ConfigError

_PYTHON = re.compile(r"^(.*/)?python(\d(\.\d+)?)?$")


@dataclass(frozen=True)
class Rendezvous:
    """Multi-node rendezvous: ``nnodes`` torchrun agents meet at ``host:port`` (c10d)."""

    nnodes: int
    node_rank: int
    host: str
    port: int
    run_id: str
    local_addr: str | None = None  # this node's address as its peers reach it


def entry_argv(command: str) -> list[str]:
    """Split MLflow's rendered entry point command (it quotes each value with shlex)."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(f"entry point command {command!r} can't be split into arguments: "
                          f"{exc}") from exc
    if not argv:
        raise ConfigError("the entry point command is empty; set `command:` in MLproject")
    return argv


def torchrun_argv(command: str, nproc: int, python: str = "python", max_restarts: int = 0,
                  rdzv: Rendezvous | None = None) -> list[str]:
    """Build the argv that runs ``command`` under torchrun on one node.

    Args:
        command: the rendered entry point command.
        nproc: processes on this node (one per GPU, or CPU processes with gloo).
        python: interpreter that runs ``-m torch.distributed.run`` (the one with torch).
        max_restarts: torchrun's ``--max-restarts``.
        rdzv: multi-node rendezvous; None means a single node (``--standalone``).

    Returns:
        The argv list.
    """
    if nproc < 1:
        raise ConfigError(f"process count per node must be >= 1, got {nproc}")
    argv = entry_argv(command)
    launch = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if rdzv is None:
        launch += ["--standalone"]
    else:
        launch += ["--nnodes", str(rdzv.nnodes), "--node-rank", str(rdzv.node_rank),
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{rdzv.host}:{rdzv.port}",
                   "--rdzv-id", rdzv.run_id,
                   "--rdzv-conf", f"is_host={'true' if rdzv.node_rank == 0 else 'false'}"]
        if rdzv.local_addr:
            launch += ["--local-addr", rdzv.local_addr]
    launch += ["--max-restarts", str(max_restarts)]
    if _PYTHON.match(argv[0]) and len(argv) >= 3 and argv[1] == "-m":
        return launch + ["-m", *argv[2:]]
    if _PYTHON.match(argv[0]) and len(argv) >= 2 and not argv[1].startswith("-"):
        return launch + argv[1:]
    return launch + ["--no-python", *argv]


def resolve_nproc(spec: int | str, gpu_count: int) -> int:
    """``"all"`` means one process per GPU (one process on a CPU-only machine)."""
    if spec == "all":
        return max(gpu_count, 1)
    return int(spec)


def pick_gpus(gpus: list[dict], wanted_ids: tuple[int, ...] | None, free: int | None,
              nproc_spec: int | str) -> tuple[list[int], int]:
    """Choose GPU indices and the process count.

    Args:
        gpus: ``[{"index": 0, "name": "...", "memory_used_mib": 3, "processes": 0}, ...]``.
        wanted_ids: explicit GPU indices from the config, or None.
        free: how many idle GPUs (no compute processes) to take, or None.
        nproc_spec: ``process_count_per_node``.

    Returns:
        ``(gpu_ids, nproc)``; ``gpu_ids`` is empty on a CPU-only machine.

    Raises:
        ConfigError: a wanted GPU doesn't exist, or not enough are idle.
    """
    present = [g["index"] for g in gpus]
    if wanted_ids is not None:
        missing = [i for i in wanted_ids if i not in present]
        if missing:
            raise ConfigError(f"gpus {list(wanted_ids)}: GPU(s) {missing} not found; this "
                              f"machine has {present or 'no GPUs'}")
        chosen = list(wanted_ids)
    elif free is not None:
        idle = [g["index"] for g in gpus if not g.get("processes")]
        if len(idle) < free:
            raise ConfigError(f"free_gpus={free} but only {len(idle)} GPU(s) are idle "
                              f"({idle}); lower free_gpus or list gpus explicitly")
        chosen = idle[:free]
    else:
        chosen = present
    nproc = resolve_nproc(nproc_spec, len(chosen))
    if chosen and nproc > len(chosen):
        raise ConfigError(f"process_count_per_node={nproc} but only {len(chosen)} GPU(s) "
                          f"{chosen} are selected; use at most one process per GPU")
    if chosen and nproc < len(chosen):
        chosen = chosen[:nproc]
    return chosen, nproc


def node_argv(command: str, python: str, nproc: int, max_restarts: int = 0,
              rdzv: Rendezvous | None = None) -> list[str]:
    """What one node runs: the entry point itself for a single process, else torchrun.

    A leading ``python`` is replaced by the ``python`` argument (the environment's interpreter),
    so the command does not depend on which ``python`` comes first on the host's PATH.
    """
    if nproc == 1 and rdzv is None:
        argv = entry_argv(command)
        return [python, *argv[1:]] if _PYTHON.match(argv[0]) else argv
    return torchrun_argv(command, nproc, python=python, max_restarts=max_restarts, rdzv=rdzv)
