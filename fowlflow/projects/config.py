"""Backend config: parsed once, before any run exists, into frozen dataclasses.

``mlflow run -b torchrun -c '{"process_count_per_node": 2}'`` hands the backend a dict that
also holds MLflow's own keys; :func:`split_mlflow_keys` takes those out, then
:func:`parse_torchrun_config` / :func:`parse_ssh_config` reject unknown keys (naming the valid
ones) and bad values::

    mlflow_keys, user = split_mlflow_keys(backend_config)
    cfg = parse_ssh_config(user)        # raises ConfigError before anything is launched
    cfg.hosts[0].destination            # "alice@gpu-box"
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Union

from fowlflow.errors import ConfigError

# Keys MLflow adds to every backend config (mlflow/projects/utils.py + __init__.py).
MLFLOW_KEYS = ("ENV_MANAGER", "SYNCHRONOUS", "DOCKER_ARGS", "STORAGE_DIR", "build_image",
               "docker_auth", "_mlflow_local_backend_run_id")
ENV_MANAGERS = ("local", "virtualenv", "uv", "conda")
# Sent to remote hosts through the 0600 env file when set here (never on a command line).
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                   "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS",
                   "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")

NprocSpec = Union[int, str]


@dataclass(frozen=True)
class MlflowKeys:
    """What MLflow itself put in the backend config."""

    env_manager: str | None = None
    synchronous: bool = False
    storage_dir: str | None = None
    run_id: str | None = None


@dataclass(frozen=True)
class TorchrunConfig:
    """``-b torchrun``: DDP on this machine's GPUs (or CPU processes with gloo)."""

    process_count_per_node: NprocSpec = "all"
    gpus: tuple[int, ...] | None = None
    free_gpus: int | None = None
    max_restarts: int = 0
    wait: bool = True
    stream: bool = True
    run_dir: str = "~/.fowlflow/runs"
    env: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HostSpec:
    """One SSH destination; ``host`` may be a ``~/.ssh/config`` alias."""

    host: str
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


@dataclass(frozen=True)
class SshAccess:
    """How to reach every host of a run: the ssh settings that are the same for all of them."""

    strict_host_key_checking: bool = True
    known_hosts_file: str | None = None
    connect_timeout: int = 10
    ssh_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class SshConfig:
    """``-b ssh``: one or more remote hosts, one torchrun per host."""

    hosts: tuple[HostSpec, ...]
    process_count_per_node: NprocSpec = "all"
    python: str = "python3"
    remote_dir: str = ".fowlflow"
    strict_host_key_checking: bool = True
    known_hosts_file: str | None = None
    connect_timeout: int = 10
    ssh_options: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    forward_env: tuple[str, ...] = ()
    tunnel: bool = False
    shared_artifact_root: bool = False  # a local artifact root that every host mounts
    tunnel_remote_port: int | None = None
    rdzv_host: str | None = None
    rdzv_port: int | None = None  # None: a free port on the rendezvous host, per run
    max_restarts: int = 0
    ship: str = "auto"
    wait: bool = True
    stream: bool = True
    reconnect_timeout: int = 300

    @property
    def node_count(self) -> int:
        return len(self.hosts)

    @property
    def access(self) -> SshAccess:
        return SshAccess(self.strict_host_key_checking, self.known_hosts_file,
                         self.connect_timeout, self.ssh_options)


def split_mlflow_keys(backend_config: dict | str | None) -> tuple[MlflowKeys, dict]:
    """Remove MLflow's own keys; return them and the user's keys.

    Args:
        backend_config: the dict MLflow passes (or a path to a ``.json`` file, or None).

    Returns:
        ``(MlflowKeys, user_dict)``.

    Raises:
        ConfigError: the config is not a JSON object.
    """
    if backend_config is None:
        backend_config = {}
    if isinstance(backend_config, str):
        try:
            with open(backend_config) as fh:
                backend_config = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"backend config {backend_config!r} could not be read as JSON: "
                              f"{exc}; pass -c with a JSON object or a .json file") from exc
    if not isinstance(backend_config, dict):
        raise ConfigError(f"backend config must be a JSON object, got {backend_config!r}")
    user = dict(backend_config)
    got = {k: user.pop(k) for k in MLFLOW_KEYS if k in user}
    env_manager = got.get("ENV_MANAGER")
    if env_manager is not None and env_manager not in ENV_MANAGERS:
        raise ConfigError(f"--env-manager {env_manager!r} is not one of {ENV_MANAGERS}")
    return MlflowKeys(env_manager=env_manager, synchronous=bool(got.get("SYNCHRONOUS")),
                      storage_dir=got.get("STORAGE_DIR"),
                      run_id=got.get("_mlflow_local_backend_run_id")), user


def _check_keys(user: dict, cls, backend: str, extra: tuple[str, ...] = ()) -> None:
    valid = sorted({f.name for f in dataclasses.fields(cls)} | set(extra))
    unknown = sorted(set(user) - set(valid))
    if unknown:
        raise ConfigError(f"unknown {backend} backend config key(s) {unknown}; "
                          f"valid keys are: {', '.join(valid)}")


def _bool(user: dict, key: str, default: bool) -> bool:
    value = user.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _int(user: dict, key: str, default, minimum: int = 0):
    value = user.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _nproc(user: dict) -> NprocSpec:
    value = user.get("process_count_per_node", "all")
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ConfigError(f"process_count_per_node must be a positive integer or \"all\", "
                      f"got {value!r}")


def _env(user: dict) -> dict:
    env = user.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) for k in env):
        raise ConfigError(f"env must be an object of NAME: value, got {env!r}")
    return {k: str(v) for k, v in env.items()}


def parse_torchrun_config(user: dict) -> TorchrunConfig:
    """Validate the torchrun backend's keys (MLflow's already removed).

    Raises:
        ConfigError: unknown key or bad value; the message names the valid keys or values.
    """
    _check_keys(user, TorchrunConfig, "torchrun")
    gpus = user.get("gpus")
    if gpus is not None:
        if not isinstance(gpus, list) or not gpus or not all(
                isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus):
            raise ConfigError(f"gpus must be a non-empty list of GPU indices like [0, 1], "
                              f"got {gpus!r}")
        gpus = tuple(gpus)
    free = _int(user, "free_gpus", None, minimum=1)
    if gpus is not None and free is not None:
        raise ConfigError("give either gpus (which GPUs) or free_gpus (how many idle ones), "
                          "not both")
    run_dir = user.get("run_dir", TorchrunConfig.run_dir)
    if not isinstance(run_dir, str) or not run_dir:
        raise ConfigError(f"run_dir must be a folder path, got {run_dir!r}")
    return TorchrunConfig(process_count_per_node=_nproc(user), gpus=gpus, free_gpus=free,
                          max_restarts=_int(user, "max_restarts", 0),
                          wait=_bool(user, "wait", True), stream=_bool(user, "stream", True),
                          run_dir=run_dir, env=_env(user))


def _host(item: Any, defaults: dict) -> HostSpec:
    if isinstance(item, str) and item.strip():
        item = {"host": item.strip()}
    if not isinstance(item, dict) or not isinstance(item.get("host"), str):
        raise ConfigError(f"each entry of hosts must be a host name or an object with "
                          f"\"host\" (and optional user, port, identity_file), got {item!r}")
    unknown = set(item) - {"host", "user", "port", "identity_file"}
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in host {item!r}; valid keys are: "
                          "host, identity_file, port, user")
    merged = {**defaults, **{k: v for k, v in item.items() if v is not None}}
    port = _int(merged, "port", None, minimum=1)
    identity = merged.get("identity_file")
    if identity is not None:
        identity = os.path.expanduser(str(identity))
        if not os.path.isfile(identity):
            raise ConfigError(f"identity_file {identity!r} does not exist; give the path of a "
                              "private key (ssh-keygen -t ed25519 creates one)")
    return HostSpec(host=merged["host"], user=merged.get("user"), port=port,
                    identity_file=identity)


def parse_ssh_config(user: dict) -> SshConfig:
    """Validate the ssh backend's keys (MLflow's already removed).

    Raises:
        ConfigError: unknown key or bad value; the message names the valid keys or values.
    """
    _check_keys(user, SshConfig, "ssh", extra=("user", "port", "identity_file", "node_count"))
    raw_hosts = user.get("hosts")
    if isinstance(raw_hosts, str):
        raw_hosts = [raw_hosts]
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise ConfigError("the ssh backend needs \"hosts\": a list of host names (aliases from "
                          "~/.ssh/config work), e.g. {\"hosts\": [\"gpu-box\"]}")
    defaults = {k: user[k] for k in ("user", "port", "identity_file") if user.get(k) is not None}
    hosts = tuple(_host(h, defaults) for h in raw_hosts)
    node_count = _int(user, "node_count", None, minimum=1)
    if node_count is not None and node_count != len(hosts):
        raise ConfigError(f"node_count is {node_count} but {len(hosts)} host(s) are listed; "
                          "list one host per node (node_count may be left out)")
    forward = user.get("forward_env", [])
    if not isinstance(forward, list) or not all(isinstance(v, str) for v in forward):
        raise ConfigError(f"forward_env must be a list of variable names, got {forward!r}")
    ssh_options = user.get("ssh_options", [])
    if not isinstance(ssh_options, list) or not all(isinstance(v, str) for v in ssh_options):
        raise ConfigError(f"ssh_options must be a list like [\"-o\", \"Compression=yes\"], "
                          f"got {ssh_options!r}")
    ship = user.get("ship", "auto")
    if ship not in ("auto", "rsync", "tar"):
        raise ConfigError(f"ship must be \"auto\", \"rsync\" or \"tar\", got {ship!r}")
    for key in ("python", "remote_dir"):
        if key in user and (not isinstance(user[key], str) or not user[key]):
            raise ConfigError(f"{key} must be a non-empty string, got {user[key]!r}")
    rdzv_host = user.get("rdzv_host")
    if rdzv_host is not None and not isinstance(rdzv_host, str):
        raise ConfigError(f"rdzv_host must be a host name or address, got {rdzv_host!r}")
    known = user.get("known_hosts_file")
    if known is not None:
        known = os.path.expanduser(str(known))
    return SshConfig(
        hosts=hosts, process_count_per_node=_nproc(user),
        python=user.get("python", SshConfig.python),
        remote_dir=user.get("remote_dir", SshConfig.remote_dir),
        strict_host_key_checking=_bool(user, "strict_host_key_checking", True),
        known_hosts_file=known,
        connect_timeout=_int(user, "connect_timeout", 10, minimum=1),
        ssh_options=tuple(ssh_options), env=_env(user), forward_env=tuple(forward),
        tunnel=_bool(user, "tunnel", False),
        shared_artifact_root=_bool(user, "shared_artifact_root", False),
        tunnel_remote_port=_int(user, "tunnel_remote_port", None, minimum=1),
        rdzv_host=rdzv_host, rdzv_port=_int(user, "rdzv_port", None, minimum=1),
        max_restarts=_int(user, "max_restarts", 0), ship=ship,
        wait=_bool(user, "wait", True), stream=_bool(user, "stream", True),
        reconnect_timeout=_int(user, "reconnect_timeout", 300, minimum=0))
