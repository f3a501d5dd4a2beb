"""Launch an entry point on hosts whose addresses are known, over SSH: the ssh backend's path.

Any backend that first gets hosts (the ssh backend: from its config; a cloud backend: by
provisioning them) hands them over here as ``cfg.hosts``::

    sub = Submission(project_uri, "main", params, None, experiment_id, tracking_uri, keys)
    cfg = dataclasses.replace(ssh_cfg, hosts=(HostSpec("10.0.0.5", user="ubuntu"), ...))
    submitted = SshLaunch(sub, cfg, backend="ec2", on_end=terminate_instances).run()

Steps: reach every host once and check its Python has MLflow (before any run exists); create
the run; per host, copy the project to ``<remote_dir>/runs/<run id>/project``, install the
supervisor, prepare the environment (:mod:`.envs`), write the node's launch script and
environment file and start it under the supervisor (node 0 runs ``python -m mlflow run
<project> -e fowlflow-node0.sh --run-id <id>``, the other nodes their script directly); save
the launch record and tags. A failure at any step after the run exists stops the nodes already
started and ends the run FAILED (KILLED for Ctrl-C).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path
from urllib.parse import urlparse

from fowlflow.errors import ConfigError, RemoteError
from fowlflow.projects import envs, run_lifecycle
from fowlflow.projects.artifact_root import check_artifact_root
from fowlflow.projects.config import CREDENTIAL_VARS, SshConfig
from fowlflow.projects.launch import Rendezvous, node_argv, resolve_nproc
from fowlflow.projects.launch_record import LaunchRecord, NodeRecord
from fowlflow.projects.node_network import peer_of, rendezvous_port, route_interface, socket_env
from fowlflow.projects.nodes import Node, RunState
from fowlflow.projects.run_lifecycle import Submission
from fowlflow.projects.runners import SshRunner
from fowlflow.projects.shipping import ship_project
from fowlflow.projects.ssh_connections import SharedConnections
from fowlflow.projects.submitted import SupervisedRun, finish_submit
from fowlflow.projects.tunnels import Tunnels, remote_tracking_uri

_logger = logging.getLogger(__name__)
SUPERVISOR_SRC = Path(__file__).with_name("supervise.py")
SUPERVISOR_NAME = "fowlflow-supervise.py"


class SshLaunch:
    """One launch of ``sub`` on ``cfg.hosts``; :meth:`run` returns the ``SubmittedRun``.

    ``backend`` names the launching backend in the tags and the launch record; ``on_end`` is
    called once the client is done with the run (after waiting, or at once with ``"wait":
    false``), after the SSH connections and tunnels are closed.
    """

    def __init__(self, sub: Submission, cfg: SshConfig, *, backend: str = "ssh",
                 on_end=None):
        if cfg.tunnel and not cfg.wait and not sub.mlflow_keys.synchronous:
            raise ConfigError("\"tunnel\": true needs this client attached for the whole run "
                              "(the tunnel ends with it); remove \"wait\": false or the tunnel")
        self.sub, self.cfg, self.backend, self.on_end = sub, cfg, backend, on_end
        self.shared = SharedConnections()
        self.runners = [SshRunner(h, cfg.access, shared=self.shared) for h in cfg.hosts]
        self.nodes: list[Node] = []  # filled as nodes start, so a failed launch can stop them
        self.tunnels: Tunnels | None = None
        self.rdzv: tuple[str, int] | None = None  # (host, port) for several nodes
        self.ifaces: list[str | None] = []  # per node: the interface that reaches the others

    def run(self) -> SupervisedRun:
        try:
            addrs = [r.address() for r in self.runners]
            host_uri = remote_tracking_uri(self.sub.tracking_uri, self.cfg, addrs)
            run_lifecycle.check_tracking_server(self.sub.tracking_uri)
            check_artifact_root(run_lifecycle.client(self.sub.tracking_uri),
                                self.sub.experiment_id, addrs, self.cfg.shared_artifact_root)
            infos = [self._preflight(r) for r in self.runners]  # before any run exists
            if self.cfg.node_count > 1:
                self._plan_network(addrs)
            work_dir, command = run_lifecycle.fetch_command(self.sub)
            manager = self.sub.mlflow_keys.env_manager or "local"
            specs = [envs.env_spec(Path(work_dir), manager, i["python_version"])
                     if manager != "local" else None for i in infos]
        except BaseException:
            self.shared.close()
            raise
        run_id = run_lifecycle.create_run(self.sub, work_dir)
        try:
            if self.cfg.tunnel:
                self.tunnels = Tunnels(self.runners, self.sub.tracking_uri,
                                       int(urlparse(host_uri).port))
            env = self._base_env(run_id, host_uri)
            details = [self._start_node(rank, info, spec, work_dir, command, run_id, env, addrs)
                       for rank, (info, spec) in enumerate(zip(infos, specs))]
            for node in self.nodes:
                node.wait_started()
            self._record(run_id, details)
        except BaseException as exc:
            self._abort(run_id, exc)
            raise
        submitted = SupervisedRun(run_id, self.nodes, self.sub.tracking_uri,
                                  stream=self.cfg.stream,
                                  reconnect_timeout=self.cfg.reconnect_timeout,
                                  on_end=self._end)
        return finish_submit(submitted, self.cfg.wait, self.sub.mlflow_keys.synchronous)

    def _preflight(self, runner: SshRunner) -> dict:
        """One bounded round trip: reachable, key accepted, Python + MLflow present."""
        info = runner.probe(self.cfg.python)
        if not info.get("mlflow"):
            raise RemoteError(f"{runner.name}: {self.cfg.python} ({info['python']}) has no "
                              f"mlflow; fix: install it there (pip install 'mlflow==3.17.*') "
                              f"or point \"python\" at a Python that has it")
        return info

    def _plan_network(self, addrs: list[str]) -> None:
        """This run's rendezvous port (free on the rendezvous host) and, per node, the
        interface that reaches the other nodes (for gloo/NCCL)."""
        host = self.cfg.rdzv_host or addrs[0]
        on_host = next((r for r, a in zip(self.runners, addrs) if host in (a, r.name)), None)
        self.rdzv = (host, rendezvous_port(self.cfg.rdzv_port, on_host, self.cfg.python))
        self.ifaces = [route_interface(r, peer_of(rank, addrs))
                       for rank, r in enumerate(self.runners)]

    def _base_env(self, run_id: str, host_uri: str) -> dict:
        """Every node's environment: the run, credentials set here, the config's ``env``.

        ``FOWLFLOW_LAUNCHED_BY`` tells the trainer that it runs in a folder on a host that
        ``fowlflow gc`` empties: with ``-P checkpoint_artifact=auto`` it then keeps its
        checkpoint in the run's artifacts as well."""
        env = {**run_lifecycle.run_env(run_id, self.sub.experiment_id, host_uri),
               "SHELL": "/bin/sh",  # MLflow runs a .sh entry point with $SHELL
               "FOWLFLOW_LAUNCHED_BY": self.backend}
        for name in (*CREDENTIAL_VARS, *self.cfg.forward_env):
            if name in os.environ:
                env[name] = os.environ[name]
        return {**env, **self.cfg.env}

    def _start_node(self, rank: int, info: dict, spec, work_dir: str, command: str,
                    run_id: str, env: dict, addrs: list[str]) -> dict:
        """Ship, prepare and start node ``rank``; what the tags say about it."""
        runner, cfg = self.runners[rank], self.cfg
        root = cfg.remote_dir if cfg.remote_dir.startswith("/") else \
            f"{info['home']}/{cfg.remote_dir}"
        run_dir = f"{root}/runs/{run_id}"
        project_dir = f"{run_dir}/project"
        runner.run(["mkdir", "-p", "-m", "700", run_dir])
        method = ship_project(Path(work_dir), runner, project_dir, cfg.ship,
                              remote_rsync=info["rsync"])
        supervisor = f"{run_dir}/{SUPERVISOR_NAME}"
        runner.write_file(supervisor, SUPERVISOR_SRC.read_bytes())
        env_info = {"python": info["python"], "bin": str(Path(info["python"]).parent),
                    "reused": None, "path": "local"}
        if spec is not None:
            _logger.info("preparing the %s environment on %s", spec.manager, runner.name)
            env_info = envs.prepare(runner, spec, cfg.python, f"{root}/envs", project_dir,
                                    run_dir)
        nproc = resolve_nproc(cfg.process_count_per_node, len(info["gpus"]))
        rdzv = Rendezvous(cfg.node_count, rank, *self.rdzv, run_id, addrs[rank]) \
            if self.rdzv else None
        iface = self.ifaces[rank] if self.ifaces else None
        script = f"fowlflow-node{rank}.sh"
        argv = node_argv(command, env_info["python"], nproc, cfg.max_restarts, rdzv)
        runner.write_file(f"{project_dir}/{script}",
                          f"#!/bin/sh\nexec {shlex.join(argv)}\n".encode())
        if rank == 0:  # MLflow's own runner on the host: it ends the run, as on Databricks
            launch = [cfg.python, "-m", "mlflow", "run", project_dir, "-e", script,
                      "--run-id", run_id, "--env-manager", "local",
                      "--experiment-id", str(self.sub.experiment_id)]
        else:
            launch = ["/bin/sh", script]
        node = Node(runner, run_dir, f"node{rank}", cfg.python, supervisor)
        node.write_env({**env, **socket_env(iface, cfg.env)})
        pid = node.start(run_id, launch, cwd=project_dir, path_prepend=env_info["bin"],
                         finalize=rank == 0)
        self.nodes.append(node)
        _logger.info("node%d on %s: pid %s, %d process(es), log %s", rank, runner.name, pid,
                     nproc, node.log_path)
        return {"host": runner.host.__dict__, "address": addrs[rank],
                "hostname": info["hostname"], "run_dir": run_dir, "log_path": node.log_path,
                "pid": pid, "nproc": nproc, "gpus": [g["name"] for g in info["gpus"]],
                "ship": method, "env": env_info["path"], "env_reused": env_info["reused"],
                **({"iface": iface} if iface else {})}

    def _record(self, run_id: str, details: list[dict]) -> None:
        """The launch record (what ``fowlflow attach`` needs) and the tags people read."""
        record = LaunchRecord(self.backend, tuple(
            NodeRecord(r.host, n.run_dir, n.name, n.python, n.supervisor)
            for r, n in zip(self.runners, self.nodes)), ssh=self.cfg.access,
            rdzv_endpoint=f"{self.rdzv[0]}:{self.rdzv[1]}" if self.rdzv else None)
        record.save(run_lifecycle.client(self.sub.tracking_uri), run_id, details)
        first = details[0]
        gpus = sorted({g for d in details for g in d["gpus"]})
        tags = {"backend": self.backend, "host": self.runners[0].name,
                "hosts": json.dumps([r.name for r in self.runners]),
                "nodes": str(len(details)), "process_count_per_node": str(first["nproc"]),
                "gpus": ", ".join(gpus) or "none (CPU, gloo)", "pid": str(first["pid"]),
                "log_path": first["log_path"], "run_dir": first["run_dir"],
                "env": first["env"], "env_reused": str(first["env_reused"]).lower(),
                "ship": first["ship"]}
        if record.rdzv_endpoint:
            tags["rdzv_endpoint"] = record.rdzv_endpoint
        run_lifecycle.set_tags(self.sub.tracking_uri, run_id, tags)

    def _abort(self, run_id: str, exc: BaseException) -> None:
        """The launch failed after the run was created: stop what started, end the run."""
        if self.nodes:
            _logger.error("launch failed (%s); stopping the nodes already started", exc)
            state = RunState.KILLED if isinstance(exc, KeyboardInterrupt) else RunState.FAILED
            SupervisedRun(run_id, self.nodes, self.sub.tracking_uri).cancel_nodes(self.nodes,
                                                                                  state)
        run_lifecycle.fail_run(self.sub.tracking_uri, run_id, exc)
        self._end()

    def _end(self) -> None:
        if self.tunnels is not None:
            self.tunnels.close()
        self.shared.close()
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end()
