"""``-b torchrun``: run an entry point with DDP on this machine's GPUs (CPU + gloo without).

    mlflow run . -b torchrun --env-manager local -c '{"process_count_per_node": 4}'
    mlflow run . -b torchrun -c '{"free_gpus": 2}'            # the two idle GPUs
    mlflow run . -b torchrun -c '{"gpus": [1, 3], "wait": false}'   # returns at once

The run is created here, then ``supervise.py`` starts ``python -m torch.distributed.run ...``
in its own session and process group; this process streams the log until the run ends
(``mlflow run -b PLUGIN`` never waits by itself). The processes get ``$FOWLFLOW_CALLER_DIR``, the
folder ``mlflow run`` was typed in, so a relative ``-P data=`` (``images=``...) is found there
(:mod:`fowlflow.local_paths`). The supervisor ends the MLflow run and uploads the output as
``fowlflow-logs/node0.log``; cancel (Ctrl-C, ``fowlflow cancel``) kills every process of the run.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
from pathlib import Path

from mlflow.projects.backend.abstract_backend import AbstractBackend

from fowlflow.errors import ConfigError
from fowlflow.local_paths import CALLER_DIR_ENV
from fowlflow.projects import run_lifecycle
from fowlflow.projects.config import TorchrunConfig, parse_torchrun_config, split_mlflow_keys
from fowlflow.projects.launch import pick_gpus, torchrun_argv
from fowlflow.projects.launch_record import LaunchRecord, NodeRecord
from fowlflow.projects.nodes import Node
from fowlflow.projects.run_lifecycle import Submission
from fowlflow.projects.runners import LocalRunner
from fowlflow.projects.submitted import SupervisedRun, finish_submit

_logger = logging.getLogger(__name__)
SUPERVISOR = str(Path(__file__).with_name("supervise.py"))


class TorchrunBackend(AbstractBackend):
    """MLflow project backend plugin ``torchrun``."""

    def run(self, project_uri, entry_point, params, version, backend_config, tracking_uri,
            experiment_id):
        run_lifecycle.console_logging()
        mlflow_keys, user = split_mlflow_keys(backend_config)
        cfg = parse_torchrun_config(user)
        if mlflow_keys.env_manager not in (None, "local"):
            raise ConfigError(f"the torchrun backend runs in this Python environment; "
                              f"--env-manager {mlflow_keys.env_manager} is not supported: use "
                              "--env-manager local (or the ssh backend, which prepares "
                              "environments on hosts)")
        sub = Submission(project_uri, entry_point, params or {}, version, experiment_id,
                         tracking_uri, mlflow_keys)
        run_lifecycle.check_tracking_server(tracking_uri)
        runner = LocalRunner()
        info = runner.probe(sys.executable)
        gpu_ids, nproc = pick_gpus(info["gpus"], cfg.gpus, cfg.free_gpus,
                                   cfg.process_count_per_node)
        work_dir, command = run_lifecycle.fetch_command(sub)
        argv = torchrun_argv(command, nproc, python=sys.executable,
                             max_restarts=cfg.max_restarts)
        run_id = run_lifecycle.create_run(sub, work_dir)
        try:
            names = [g["name"] for g in info["gpus"] if g["index"] in gpu_ids]
            node = _start(sub, cfg, run_id, runner, work_dir, argv, gpu_ids, {
                "process_count_per_node": str(nproc), "gpu_ids": ",".join(map(str, gpu_ids)),
                "gpus": ", ".join(names) or "none (CPU, gloo)", "command": shlex.join(argv)})
        except BaseException as exc:
            run_lifecycle.fail_run(tracking_uri, run_id, exc)
            raise
        submitted = SupervisedRun(run_id, [node], tracking_uri, stream=cfg.stream)
        return finish_submit(submitted, cfg.wait, mlflow_keys.synchronous)


def _start(sub: Submission, cfg: TorchrunConfig, run_id: str, runner: LocalRunner,
           work_dir: str, argv: list[str], gpu_ids: list[int], tags: dict) -> Node:
    """Record where the run lives (``tags`` too), start it under the supervisor, wait until
    it runs."""
    run_dir = Path(os.path.expanduser(cfg.run_dir)) / run_id
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # no `mlflow run` is above the supervised processes: tell them where the user is,
    # for relative paths (fowlflow.local_paths)
    env = {**run_lifecycle.run_env(run_id, sub.experiment_id, sub.tracking_uri),
           CALLER_DIR_ENV: os.getcwd(), **cfg.env}
    if gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
    node = Node(runner, str(run_dir), "node0", sys.executable, SUPERVISOR)
    node.write_env(env)
    LaunchRecord("torchrun", (NodeRecord(None, node.run_dir, node.name, node.python,
                                         node.supervisor),)
                 ).save(run_lifecycle.client(sub.tracking_uri), run_id)
    host = socket.gethostname()
    run_lifecycle.set_tags(sub.tracking_uri, run_id, {
        "backend": "torchrun", "host": host, "hosts": json.dumps([host]), "nodes": "1",
        "run_dir": str(run_dir), "log_path": node.log_path, **tags})
    _logger.info("=== torchrun: %s process(es) on %s, run %s, log %s ===",
                 tags["process_count_per_node"],
                 f"GPUs {gpu_ids}" if gpu_ids else "CPU (gloo)", run_id, node.log_path)
    pid = node.start(run_id, argv, cwd=work_dir, finalize=True)
    run_lifecycle.set_tags(sub.tracking_uri, run_id, {"pid": str(pid)})
    node.wait_started()
    return node
