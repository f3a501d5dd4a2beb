"""``-b ssh``: run an entry point on remote machines over SSH, one torchrun per host.

    mlflow run . -b ssh -c '{"hosts": ["gpu-box"]}'                       # ~/.ssh/config alias
    mlflow run . -b ssh -c '{"hosts": ["10.0.0.5", "10.0.0.6"], "user": "alice",
                             "process_count_per_node": 8}'                 # 2 nodes x 8 GPUs
    mlflow run . -b ssh -c '{"hosts": ["gpu-box"], "tunnel": true}'        # server on laptop

MLflow's Databricks pattern: the run is created here; the project (tracked files) is copied to
``<remote_dir>/runs/<run id>/project`` on each host; the environment is prepared there (and
reused); node 0 runs ``python -m mlflow run <project> --run-id <id> -e fowlflow-node0.sh``
with the tracking URI set, the other nodes run their launch script directly; every node runs
under ``supervise.py``, detached from SSH. Tags record hosts, pids, log paths and GPUs so
``fowlflow attach|status|cancel RUN_ID`` works from any terminal. The launch itself is
:class:`fowlflow.projects.ssh_launch.SshLaunch`, which other backends reuse with hosts of
their own.
"""

from __future__ import annotations

from mlflow.projects.backend.abstract_backend import AbstractBackend

from fowlflow.projects.config import parse_ssh_config, split_mlflow_keys
from fowlflow.projects.run_lifecycle import Submission, console_logging
from fowlflow.projects.ssh_launch import SshLaunch


class SshBackend(AbstractBackend):
    """MLflow project backend plugin ``ssh``."""

    def run(self, project_uri, entry_point, params, version, backend_config, tracking_uri,
            experiment_id):
        console_logging()
        mlflow_keys, user = split_mlflow_keys(backend_config)
        cfg = parse_ssh_config(user)
        sub = Submission(project_uri, entry_point, params or {}, version, experiment_id,
                         tracking_uri, mlflow_keys)
        return SshLaunch(sub, cfg).run()
