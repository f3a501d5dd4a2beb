"""Where the hosts' artifacts go: refuse a launch whose artifacts would stay on the hosts.

MLflow clients write artifacts themselves to the experiment's artifact root. When that root is
a plain path (``/srv/mlruns``, ``file:///srv/mlruns``: a server started with
``--no-serve-artifacts`` and a local ``--default-artifact-root``, or an experiment created with
such a location), each host writes the model, checkpoints and logs to that path *on its own
disk*, where nobody looks, and the run in the UI has none. A tunnel does not change that: the
path is still written on the host. So the ssh launch checks it before any run exists::

    check_artifact_root(client, experiment_id, ["10.0.0.5"], shared=False)   # ConfigError

Fine: proxied artifacts (``mlflow-artifacts:``, the default of ``mlflow server``), object
storage and other remote schemes; a plain path when every host is this machine (loopback
addresses), or with ``"shared_artifact_root": true`` (the same path is a shared file system,
e.g. NFS, mounted on every host and on the server).
"""

from __future__ import annotations

from urllib.parse import urlparse

from fowlflow.errors import ConfigError
from fowlflow.projects.tunnels import is_loopback


def is_local_path(uri: str) -> bool:
    """``/srv/mlruns``, ``./mlruns``, ``file:///srv/mlruns``: written by whoever logs."""
    return urlparse(uri).scheme in ("", "file")


def check_artifact_root(client, experiment_id: str, host_addrs: list[str],
                        shared: bool) -> None:
    """Raise ConfigError when the experiment's artifacts would land on the hosts' disks."""
    location = client.get_experiment(experiment_id).artifact_location
    if shared or not is_local_path(location) or all(is_loopback(a) for a in host_addrs):
        return
    raise ConfigError(
        f"the experiment's artifact root is {location!r}, a path on whichever machine logs: "
        f"the hosts would write the model, checkpoints and logs to their own disks, not where "
        f"the tracking server keeps them. Fix: let the server store artifacts (`mlflow server "
        f"--artifacts-destination <path or s3://bucket>`; serving is the default, so remove "
        f"--no-serve-artifacts / --default-artifact-root), or use object storage (s3://...); "
        f"an experiment created with a local artifact_location needs a new experiment. If "
        f"that path is a shared file system mounted on every host, set "
        f"\"shared_artifact_root\": true")
