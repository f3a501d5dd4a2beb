"""``-b ec2``: rent GPU machines on AWS EC2 for one run (or keep a named cluster warm).

    mlflow run . -b ec2 -c '{"instance_type": "g6e.xlarge", "node_count": 2, "spot": true}'
    mlflow run . -b ec2 -c '{"cluster_name": "gpu-cluster", "idle_minutes": 30}'   # kept warm
    fowlflow ec2 ls | fowlflow ec2 down NAME | fowlflow ec2 gc [--yes]

The config is checked (:mod:`.ec2_config`), then AWS (:mod:`.ec2_cloud`), before anything is
created; :class:`fowlflow.projects.ec2_launch.Ec2Run` provisions the instances and hands them
to the ssh backend's launch path. See docs/ec2.md.
"""

from __future__ import annotations

from mlflow.projects.backend.abstract_backend import AbstractBackend

from fowlflow.projects.config import split_mlflow_keys
from fowlflow.projects.ec2_config import parse_ec2_config
from fowlflow.projects.ec2_launch import Ec2Run
from fowlflow.projects.run_lifecycle import Submission, console_logging


class Ec2Backend(AbstractBackend):
    """MLflow project backend plugin ``ec2``."""

    def run(self, project_uri, entry_point, params, version, backend_config, tracking_uri,
            experiment_id):
        console_logging()
        mlflow_keys, user = split_mlflow_keys(backend_config)
        cfg = parse_ec2_config(user)
        sub = Submission(project_uri, entry_point, params or {}, version, experiment_id,
                         tracking_uri, mlflow_keys)
        return Ec2Run(sub, cfg).run()
