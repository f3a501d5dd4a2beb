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
``fowlflow attach|status|cancel RUN_ID`` works from any terminal.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shlex
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

from mlflow.projects.backend.abstract_backend import AbstractBackend

from fowlflow.errors import ConfigError, RemoteError
from fowlflow.projects import common, envs
from fowlflow.projects.config import (CREDENTIAL_VARS, SshConfig, parse_ssh_config,
                                      split_mlflow_keys)
from fowlflow.projects.launch import Rendezvous, node_argv, resolve_nproc
from fowlflow.projects.runners import SshRunner, ship_project
from fowlflow.projects.submitted import Node, RunState, SupervisedRun

_logger = logging.getLogger(__name__)
SUPERVISOR_SRC = Path(__file__).with_name("supervise.py")
LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
        if not _is_loopback(parsed.hostname or ""):
            raise ConfigError(f"\"tunnel\": true forwards a tracking server on this machine, "
                              f"but {tracking_uri!r} is not on localhost; remove \"tunnel\"")
        port = cfg.tunnel_remote_port or parsed.port or (443 if parsed.scheme == "https" else 80)
        return parsed._replace(netloc=f"127.0.0.1:{port}").geturl()
    if _is_loopback(parsed.hostname or "") and not all(_is_loopback(a) for a in host_addrs):
        raise ConfigError(f"the tracking server {tracking_uri!r} is on this machine's loopback "
                          f"address, which the hosts can't reach. Fix: add \"tunnel\": true, or "
                          f"serve on an address they can reach (mlflow server --host 0.0.0.0)")
    return tracking_uri


class Tunnels:
    """``ssh -N -R`` per host: the hosts reach the local tracking server on 127.0.0.1."""

    def __init__(self, runners: list[SshRunner], tracking_uri: str, remote_port: int):
        parsed = urlparse(tracking_uri)
        local = f"{parsed.hostname}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"
        self.procs = []
        for runner in runners:
            argv = ["ssh", *runner.options, "-N", "-o", "ExitOnForwardFailure=yes",
                    "-R", f"127.0.0.1:{remote_port}:{local}", runner.host.destination]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            self.procs.append(proc)
            time.sleep(1.0)
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


class SshBackend(AbstractBackend):
    """MLflow project backend plugin ``ssh``."""

    def run(self, project_uri, entry_point, params, version, backend_config, tracking_uri,
            experiment_id):
        common.console_logging()
        mlflow_keys, user = split_mlflow_keys(backend_config)
        cfg = parse_ssh_config(user)
        if cfg.tunnel and not cfg.wait and not mlflow_keys.synchronous:
            raise ConfigError("\"tunnel\": true needs this client attached for the whole run "
                              "(the tunnel ends with it); remove \"wait\": false or the tunnel")
        manager = mlflow_keys.env_manager or "local"
        runners = [SshRunner(h, strict_host_key_checking=cfg.strict_host_key_checking,
                             known_hosts_file=cfg.known_hosts_file,
                             connect_timeout=cfg.connect_timeout, extra_options=cfg.ssh_options)
                   for h in cfg.hosts]
        addrs = [r.resolved().get("hostname", r.host.host) for r in runners]
        host_uri = remote_tracking_uri(tracking_uri, cfg, addrs)
        infos = [self._preflight(r, cfg) for r in runners]  # before any run exists
        _, work_dir, command = common.fetch_command(project_uri, entry_point, params,
                                                          version, mlflow_keys.storage_dir)
        specs = [envs.env_spec(Path(work_dir), manager, i["python_version"])
                 if manager != "local" else None for i in infos]

        active_run = common.create_run(mlflow_keys.run_id, project_uri, experiment_id,
                                       work_dir, version, entry_point, params)
        run_id = active_run.info.run_id
        tunnels = None
        nodes: list[Node] = []  # filled as nodes start, so a failed launch can stop them
        try:
            if cfg.tunnel:
                tunnels = Tunnels(runners, tracking_uri, int(urlparse(host_uri).port))
            tags = self._launch(cfg, runners, infos, specs, addrs, work_dir, command,
                                run_id, experiment_id, host_uri, nodes)
            common.set_tags(run_id, tags)
        except BaseException as exc:
            if nodes:
                _logger.error("launch failed (%s); stopping the nodes already started", exc)
                state = RunState.KILLED if isinstance(exc, KeyboardInterrupt) else \
                    RunState.FAILED
                started = SupervisedRun(run_id, nodes)
                for node in nodes:
                    try:
                        started.cancel_node(node, state)
                    except Exception as cancel_exc:  # keep the launch error; log this one
                        _logger.error("%s", cancel_exc)
            if tunnels:
                tunnels.close()
            common.fail_run(run_id, exc)
            raise
        submitted = SupervisedRun(run_id, nodes, stream=cfg.stream,
                                  reconnect_timeout=cfg.reconnect_timeout,
                                  on_end=tunnels.close if tunnels else None)
        return common.finish_submit(submitted, cfg.wait, mlflow_keys.synchronous)

    @staticmethod
    def _preflight(runner: SshRunner, cfg: SshConfig) -> dict:
        """One bounded round trip: reachable, key accepted, Python + MLflow present."""
        info = runner.probe(cfg.python)
        if not info.get("mlflow"):
            raise RemoteError(f"{runner.name}: {cfg.python} ({info['python']}) has no mlflow; "
                              f"fix: install it there (pip install 'mlflow==3.17.*') or point "
                              f"\"python\" at a Python that has it")
        return info

    def _launch(self, cfg, runners, infos, specs, addrs, work_dir, command, run_id,
                experiment_id, host_uri, nodes: list):
        nnodes = cfg.node_count
        rdzv_host = cfg.rdzv_host or addrs[0]
        base_env = {**common.run_env(run_id, experiment_id, host_uri), "SHELL": "/bin/sh"}
        for name in (*CREDENTIAL_VARS, *cfg.forward_env):
            if name in os.environ:
                base_env[name] = os.environ[name]
        base_env.update(cfg.env)
        per_node = []
        for rank, (runner, info, spec) in enumerate(zip(runners, infos, specs)):
            root = cfg.remote_dir if cfg.remote_dir.startswith("/") else \
                f"{info['home']}/{cfg.remote_dir}"
            run_dir = f"{root}/runs/{run_id}"
            project_dir = f"{run_dir}/project"
            runner.run(["mkdir", "-p", "-m", "700", run_dir])
            method = ship_project(Path(work_dir), runner, project_dir, cfg.ship,
                                  remote_rsync=info["rsync"])
            supervisor = f"{run_dir}/fowlflow-supervise.py"
            runner.run(["sh", "-c", 'cat > "$1"', "sh", supervisor],
                       input=SUPERVISOR_SRC.read_bytes())
            env_info = {"python": info["python"], "bin": str(Path(info["python"]).parent),
                        "reused": None, "path": "local"}
            if spec is not None:
                _logger.info("preparing the %s environment on %s", spec.manager, runner.name)
                env_info = envs.prepare(runner, spec, cfg.python, f"{root}/envs", project_dir,
                                        run_dir)
            nproc = resolve_nproc(cfg.process_count_per_node, len(info["gpus"]))
            rdzv = Rendezvous(nnodes, rank, rdzv_host, cfg.rdzv_port, run_id, addrs[rank]) \
                if nnodes > 1 else None
            argv = node_argv(command, env_info["python"], nproc, cfg.max_restarts, rdzv)
            script = f"fowlflow-node{rank}.sh"
            runner.run(["sh", "-c", 'cat > "$1"', "sh", f"{project_dir}/{script}"],
                       input=f"#!/bin/sh\nexec {shlex.join(argv)}\n".encode())
            if rank == 0:  # MLflow's own runner on the host: it ends the run, as on Databricks
                launch = [cfg.python, "-m", "mlflow", "run", project_dir, "-e", script,
                          "--run-id", run_id, "--env-manager", "local",
                          "--experiment-id", str(experiment_id)]
            else:
                launch = ["/bin/sh", script]
            node = Node(runner, run_dir, f"node{rank}", cfg.python, supervisor)
            common.write_env_file(runner, node, base_env)
            out = runner.run(node.sup("start", "--run-id", run_id, "--cwd", project_dir,
                                      "--path-prepend", env_info["bin"],
                                      "--finalize" if rank == 0 else "--upload-log",
                                      "--", *launch), timeout=60).stdout
            pid = json.loads(out)["pid"]
            nodes.append(node)
            per_node.append({"host": runner.host.__dict__, "address": addrs[rank],
                             "hostname": info["hostname"], "run_dir": run_dir,
                             "log_path": node.log_path, "pid": pid, "nproc": nproc,
                             "gpus": [g["name"] for g in info["gpus"]], "ship": method,
                             "env": env_info["path"], "env_reused": env_info["reused"]})
            _logger.info("node%d on %s: pid %s, %d process(es), log %s", rank, runner.name, pid,
                         nproc, node.log_path)
        for node in nodes:
            common.wait_started(node.runner, node)
        gpus = sorted({g for n in per_node for g in n["gpus"]})
        launch_record = {"backend": "ssh", "nodes": [
            {"host": n["host"], "run_dir": n["run_dir"], "name": f"node{i}",
             "python": cfg.python, "supervisor": f"{n['run_dir']}/fowlflow-supervise.py"}
            for i, n in enumerate(per_node)],
            "ssh": {"strict_host_key_checking": cfg.strict_host_key_checking,
                    "known_hosts_file": cfg.known_hosts_file,
                    "connect_timeout": cfg.connect_timeout,
                    "ssh_options": list(cfg.ssh_options)}}
        tags = {"backend": "ssh", "host": runners[0].name,
                "hosts": json.dumps([r.name for r in runners]), "nodes": str(nnodes),
                "process_count_per_node": str(per_node[0]["nproc"]),
                "gpus": ", ".join(gpus) or "none (CPU, gloo)",
                "pid": str(per_node[0]["pid"]), "log_path": per_node[0]["log_path"],
                "run_dir": per_node[0]["run_dir"], "env": per_node[0]["env"],
                "env_reused": str(per_node[0]["env_reused"]).lower(),
                "ship": per_node[0]["ship"], "node_details": json.dumps(per_node)[:7900],
                "launch": json.dumps(launch_record)}
        if nnodes > 1:
            tags["rdzv_endpoint"] = f"{rdzv_host}:{cfg.rdzv_port}"
        return tags
