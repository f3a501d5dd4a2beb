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
import subprocess
import sys
from pathlib import Path

from mlflow.projects.backend.abstract_backend import AbstractBackend

from fowlflow.errors import ConfigError, RemoteError
from fowlflow.local_paths import CALLER_DIR_ENV
from fowlflow.projects import common
from fowlflow.projects.config import parse_torchrun_config, split_mlflow_keys
from fowlflow.projects.launch import pick_gpus, torchrun_argv
from fowlflow.projects.runners import LocalRunner
from fowlflow.projects.submitted import Node, SupervisedRun

_logger = logging.getLogger(__name__)
SUPERVISOR = str(Path(__file__).with_name("supervise.py"))


class TorchrunBackend(AbstractBackend):
    """MLflow project backend plugin ``torchrun``."""

    def run(self, project_uri, entry_point, params, version, backend_config, tracking_uri,
            experiment_id):
        common.console_logging()
        mlflow_keys, user = split_mlflow_keys(backend_config)
        cfg = parse_torchrun_config(user)
        if mlflow_keys.env_manager not in (None, "local"):
            raise ConfigError(f"the torchrun backend runs in this Python environment; "
                              f"--env-manager {mlflow_keys.env_manager} is not supported: use "
                              "--env-manager local (or the ssh backend, which prepares "
                              "environments on hosts)")
        runner = LocalRunner()
        info = runner.probe(sys.executable)
        gpu_ids, nproc = pick_gpus(info["gpus"], cfg.gpus, cfg.free_gpus,
                                   cfg.process_count_per_node)
        _, work_dir, command = common.fetch_command(project_uri, entry_point, params,
                                                          version, mlflow_keys.storage_dir)
        argv = torchrun_argv(command, nproc, python=sys.executable,
                             max_restarts=cfg.max_restarts)

        active_run = common.create_run(mlflow_keys.run_id, project_uri, experiment_id,
                                       work_dir, version, entry_point, params)
        run_id = active_run.info.run_id
        try:
            run_dir = Path(os.path.expanduser(cfg.run_dir)) / run_id
            run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # no `mlflow run` is above the supervised processes: tell them where the user is,
            # for relative paths (fowlflow.local_paths)
            env = {**common.run_env(run_id, experiment_id, tracking_uri),
                   CALLER_DIR_ENV: os.getcwd(), **cfg.env}
            if gpu_ids:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
            node = Node(runner, str(run_dir), "node0", sys.executable, SUPERVISOR)
            common.write_env_file(runner, node, env)
            names = [g["name"] for g in info["gpus"] if g["index"] in gpu_ids]
            common.set_tags(run_id, {
                "backend": "torchrun", "host": socket.gethostname(),
                "hosts": json.dumps([socket.gethostname()]), "nodes": "1",
                "process_count_per_node": str(nproc), "gpu_ids": ",".join(map(str, gpu_ids)),
                "gpus": ", ".join(names) or "none (CPU, gloo)",
                "run_dir": str(run_dir), "log_path": node.log_path,
                "command": shlex.join(argv),
                "launch": json.dumps({"backend": "torchrun", "nodes": [
                    {"host": None, "run_dir": str(run_dir), "name": node.name,
                     "python": sys.executable, "supervisor": SUPERVISOR}]})})
            _logger.info("=== torchrun: %d process(es) on %s, run %s, log %s ===", nproc,
                         f"GPUs {gpu_ids}" if gpu_ids else "CPU (gloo)", run_id, node.log_path)
            proc = runner.popen(node.sup("start", "--run-id", run_id, "--cwd", work_dir,
                                         "--finalize", "--", *argv),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise RemoteError(f"could not start the supervisor: {err.decode()[-2000:]}")
            pid = json.loads(out)["pid"]
            common.set_tags(run_id, {"pid": str(pid)})
            common.wait_started(runner, node)
        except BaseException as exc:
            common.fail_run(run_id, exc)
            raise
        submitted = SupervisedRun(run_id, [node], stream=cfg.stream)
        return common.finish_submit(submitted, cfg.wait, mlflow_keys.synchronous)
