"""``mlflow run -b ssh`` against real sshd servers, a real ``mlflow server`` and real DDP.

Hosts: ``loopback_sshd`` (127.0.0.1) and two network namespaces (10.77.<slot>.2, .3), each
with its own sshd, all started by fixtures in conftest.py. The namespaces share this
machine's filesystem and process table, so tests can check files and processes directly; each
run ships into its own ``remote_dir`` under tmp_path.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from fowlflow.errors import ConfigError, RemoteError
from fowlflow.projects.ssh import SshBackend
from tests.conftest import ROOT, TINY_PARAMS
from tests.net import free_port, wait_until
from tests.projects.conftest import NAMESPACES, NS_IFACE, SUBNET, Relay, ssh_config
from tests.projects.helpers import STANDIN, finish, fowlflow, marked_processes, mlflow_cli

pytestmark = pytest.mark.slow


def _shared_connection_masters(sshd) -> list[str]:
    """fowlflow's ControlMaster processes connected to ``sshd`` (ssh renames itself "ssh: PATH
    [mux]"); masters of other tests' sshds (another xdist worker's) don't count."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if "/tmp/fowlflow-ssh-" in line and "[mux]" in line:
            try:
                conns = getattr(p, "net_connections", None) or p.connections  # psutil < 6
                ports = {c.raddr.port for c in conns("tcp") if c.raddr}
            except psutil.Error:
                continue
            if sshd.port in ports:
                found.append(line)
    return found


def test_one_host_streams_logs_and_keeps_credentials_off_command_lines(
        server_store, loopback_sshd, keys, tmp_path, monkeypatch):
    secret = f"token-{uuid.uuid4().hex}"
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret)  # the server ignores it; we trace it
    # the host is named through an ssh_config alias, as users do with ~/.ssh/config
    alias_file = tmp_path / "ssh_config"
    alias_file.write_text(f"Host ffbox\n  HostName {loopback_sshd.address}\n"
                          f"  Port {loopback_sshd.port}\n  User root\n"
                          f"  IdentityFile {keys.identity}\n"
                          f"  UserKnownHostsFile {keys.known_hosts}\n")
    cfg = {"hosts": ["ffbox"], "ssh_options": ["-F", str(alias_file)],
           "python": sys.executable, "remote_dir": str(tmp_path / "remote"),
           "process_count_per_node": 2}
    logins = loopback_sshd.log.read_text().count("Accepted publickey")
    proc = mlflow_cli(STANDIN, "ssh", cfg, {"steps": 6, "sleep": 0.5})
    run = server_store.wait_for_run(proc)
    run_id = run.info.run_id
    server_store.wait_for_metric(run_id, "allreduce_sum", 1)
    workers = marked_processes(run_id)
    assert workers and all(p.environ().get("MLFLOW_TRACKING_TOKEN") == secret for p in workers)
    for p in psutil.process_iter(["cmdline"]):
        assert secret not in " ".join(p.info["cmdline"] or []), p.info["cmdline"]
    code, out, err = finish(proc)
    assert code == 0, err[-4000:]
    assert "rank 0 done" in out and "rank 1 done" in out  # streamed here
    run = server_store.only_run()
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["fowlflow.backend"] == tags["mlflow.project.backend"] == "ssh"
    assert tags["fowlflow.host"] == "ffbox" and json.loads(tags["fowlflow.hosts"]) == ["ffbox"]
    assert tags["fowlflow.ship"] == "rsync"
    run_dir = tags["fowlflow.run_dir"]
    assert run_dir.startswith(str(tmp_path / "remote" / "runs"))
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    assert not os.path.exists(f"{run_dir}/node0.env.json")  # credentials file removed
    assert os.path.exists(f"{run_dir}/project/MLproject")
    assert len(server_store.client.get_metric_history(run_id, "allreduce_sum")) == 6
    assert run.data.params["world_size"] == "2"
    assert "rank 0 done" in server_store.artifact_text(run_id, "fowlflow-logs/node0.log")
    assert not marked_processes(run_id)
    # probe, copy, start, streaming and every status poll shared one SSH connection (without
    # sharing: one connection per command, a dozen and more)
    assert loopback_sshd.log.read_text().count("Accepted publickey") - logins == 1
    wait_until(lambda: not _shared_connection_masters(loopback_sshd),
               what="the shared SSH connection to "
               "close when `mlflow run` ended", timeout=30)


def test_two_hosts_train_one_ddp_run(server_store, hosts, keys, tmp_path):
    """Real trainer, 2 nodes x 1 CPU process, gloo across namespaces, c10d on the first."""
    cfg = {"hosts": [{"host": s.address} for s in hosts.sshds], "user": "root",
           "identity_file": str(keys.identity), "known_hosts_file": str(keys.known_hosts),
           "python": sys.executable, "remote_dir": str(tmp_path / "remote"),
           "process_count_per_node": 1, "connect_timeout": 5,
           "env": {"GLOO_SOCKET_IFNAME": NS_IFACE, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}}
    params = {**TINY_PARAMS, "data": "synthetic", "output_dir": "outputs"}
    code, out, err = finish(mlflow_cli(ROOT, "ssh", cfg, params), timeout=500)
    assert code == 0, out[-3000:] + err[-4000:]
    run = server_store.only_run()
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["fowlflow.nodes"] == "2"
    host, port = tags["fowlflow.rdzv_endpoint"].rsplit(":", 1)
    assert host == hosts.sshds[0].address and int(port) > 0
    details = json.loads(tags["fowlflow.node_details"])
    assert [d["address"] for d in details] == [s.address for s in hosts.sshds]
    assert "Epoch 1/1" in server_store.artifact_text(run.info.run_id, "fowlflow-logs/node0.log")
    node1 = server_store.artifact_text(run.info.run_id, "fowlflow-logs/node1.log")
    assert "Traceback" not in node1
    assert run.data.metrics and any(not k.startswith("system/") for k in run.data.metrics)
    # each node's system metrics: node 0's under MLflow's own names, as in a one-node run,
    # node 1's with its node id
    assert "system/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)
    assert any(k.startswith("system/node1/") for k in run.data.metrics), sorted(run.data.metrics)
    assert not any(k.startswith("system/node0/") for k in run.data.metrics)
    # checkpoint_artifact=auto: the checkpoint outlives the host's run folder (`fowlflow gc`)
    assert [a.path for a in server_store.client.list_artifacts(run.info.run_id, "checkpoints")] \
        == ["checkpoints/checkpoint.pt"]
    assert not marked_processes(run.info.run_id)


def test_two_concurrent_two_node_runs_on_loopback_named_hosts_both_finish(server_store, hosts,
                                                                          keys, tmp_path):
    """Two 2-node runs at once on the same two hosts, without any user ``env``. Each host's
    name resolves to 127.0.1.1 (Debian's /etc/hosts, see conftest), so gloo left to itself
    connects to 127.0.0.1 (``Gloo connectFullMesh failed``); and with one fixed rendezvous
    port the second run dies with EADDRINUSE. Each run gets its own free port, probed on the
    first host, and each node the interface that reaches the other (``ffeth``)."""
    name = socket.gethostname()
    resolved = subprocess.run(
        ["ip", "netns", "exec", NAMESPACES[0][0], "getent", "hosts", name],
        capture_output=True, text=True, check=True).stdout
    assert resolved.split()[0] == "127.0.1.1", resolved  # the condition under test
    cfg = {"hosts": [{"host": s.address} for s in hosts.sshds], "user": "root",
           "identity_file": str(keys.identity), "known_hosts_file": str(keys.known_hosts),
           "python": sys.executable, "process_count_per_node": 1, "connect_timeout": 5}
    procs = [mlflow_cli(STANDIN, "ssh", {**cfg, "remote_dir": str(tmp_path / f"remote{k}")},
                        {"steps": 8, "sleep": 0.5}) for k in range(2)]
    wait_until(lambda: len([r for r in server_store.runs()
                            if "fowlflow.rdzv_endpoint" in r.data.tags]) == 2,
               what="both runs launched", timeout=300, interval=1)
    results = [finish(p, timeout=400) for p in procs]
    for code, out, err in results:
        assert code == 0, out[-2000:] + err[-4000:]
    runs = server_store.runs()
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    endpoints = {r.data.tags["fowlflow.rdzv_endpoint"] for r in runs}
    assert len(endpoints) == 2 and all(e.startswith(f"{hosts.sshds[0].address}:")
                                       for e in endpoints)
    for run in runs:
        record = json.loads(run.data.tags["fowlflow.launch"])
        assert record["rdzv_endpoint"] == run.data.tags["fowlflow.rdzv_endpoint"]
        details = json.loads(run.data.tags["fowlflow.node_details"])
        assert [d["iface"] for d in details] == [NS_IFACE, NS_IFACE]
        assert run.data.params["world_size"] == "2"
        assert not marked_processes(run.info.run_id)


def test_dropped_connection_reattaches_and_the_run_finishes(server_store, loopback_sshd, keys,
                                                             tmp_path):
    cfg = ssh_config(keys, loopback_sshd, remote_dir=str(tmp_path / "remote"),
                     process_count_per_node=1)
    proc = mlflow_cli(STANDIN, "ssh", cfg, {"steps": 14, "sleep": 0.5})
    run_id = server_store.wait_for_run(proc).info.run_id
    server_store.wait_for_metric(run_id, "allreduce_sum", 2)
    assert loopback_sshd.drop_connections() >= 1  # every SSH connection dies at once
    code, out, err = finish(proc)
    assert code == 0, err[-4000:]
    assert "re-attaching" in err
    for step in range(14):  # nothing lost, nothing repeated across the re-attach
        assert out.count(f"rank 0 step {step} sum") == 1, step
    assert server_store.only_run().info.status == "FINISHED"


def test_killed_remote_trainer_fails_the_run_and_keeps_its_output(server_store, loopback_sshd,
                                                                   keys, tmp_path):
    cfg = ssh_config(keys, loopback_sshd, remote_dir=str(tmp_path / "remote"),
                     process_count_per_node=1, ship="tar")  # the no-rsync path
    proc = mlflow_cli(STANDIN, "ssh", cfg, {"steps": 400, "sleep": 0.3})
    run_id = server_store.wait_for_run(proc).info.run_id
    server_store.wait_for_metric(run_id, "allreduce_sum", 2)
    trainer = int(server_store.client.get_run(run_id).data.tags["standin.pid"])
    psutil.Process(trainer).kill()
    code, out, err = finish(proc)
    assert code == 1 and "ended FAILED" in err
    assert server_store.only_run().info.status == "FAILED"
    assert server_store.only_run().data.tags["fowlflow.ship"] == "tar"
    assert "rank 0 step 1 sum" in err  # the error carries the end of the output
    log = server_store.artifact_text(run_id, "fowlflow-logs/node0.log")
    assert "rank 0 step 1 sum" in log
    assert not marked_processes(run_id)


def test_killed_supervisor_of_node1_ends_the_whole_run_failed_everywhere(server_store, hosts,
                                                                        keys, tmp_path):
    """``kill -9`` of node 1's supervisor on its host, mid-run (issue 11.3): its reaper kills
    that node's torchrun and workers and records FAILED; the attached ``mlflow run`` stops
    node 0 (blocked in the all-reduce otherwise) and fails; ``fowlflow status``, each node and
    MLflow then say FAILED, and no process of the run is left on either host."""
    cfg = {"hosts": [{"host": s.address} for s in hosts.sshds], "user": "root",
           "identity_file": str(keys.identity), "known_hosts_file": str(keys.known_hosts),
           "python": sys.executable, "remote_dir": str(tmp_path / "remote"),
           "process_count_per_node": 1, "connect_timeout": 5}
    proc = mlflow_cli(STANDIN, "ssh", cfg, {"steps": 400, "sleep": 0.3})
    run_id = server_store.wait_for_run(proc).info.run_id
    server_store.wait_for_metric(run_id, "allreduce_sum", 2)
    details = json.loads(server_store.client.get_run(run_id).data.tags["fowlflow.node_details"])
    supervisor = psutil.Process(int(details[1]["pid"]))  # the hosts share this process table
    assert run_id in " ".join(supervisor.cmdline())
    supervisor.kill()
    code, _, err = finish(proc, timeout=240)
    assert code == 1 and "FAILED" in err, err[-3000:]
    wait_until(lambda: not marked_processes(run_id), what="no process of the run left",
               timeout=60)
    assert server_store.only_run().info.status == "FAILED"
    status = fowlflow("status", run_id)
    assert "node1: FAILED" in status.stdout, status.stdout + status.stderr
    assert f"run {run_id}: FAILED; MLflow status FAILED" in status.stdout, status.stdout


def test_cancel_from_another_terminal_stops_every_remote_process(server_store, hosts, keys,
                                                                 tmp_path):
    sshd = hosts.sshds[1]
    cfg = ssh_config(keys, sshd, remote_dir=str(tmp_path / "remote"), process_count_per_node=2)
    proc = mlflow_cli(STANDIN, "ssh", cfg, {"steps": 400, "sleep": 0.3})
    run_id = server_store.wait_for_run(proc).info.run_id
    server_store.wait_for_metric(run_id, "allreduce_sum", 2)
    before = marked_processes(run_id)
    assert len(before) >= 4  # mlflow run, sh/torchrun, 2 workers
    assert "node0: RUNNING" in fowlflow("status", run_id).stdout
    cancel = fowlflow("cancel", run_id)
    assert cancel.returncode == 0, cancel.stderr
    code, _, err = finish(proc)  # the attached `mlflow run` sees the end and fails
    assert code == 1 and "ended KILLED" in err
    assert not marked_processes(run_id)
    assert all(not p.is_running() or p.status() == "zombie" for p in before)
    assert server_store.only_run().info.status == "KILLED"


def test_unreachable_host_bad_key_unknown_host_key_fail_fast_without_a_run(
        server_store, network, loopback_sshd, keys, tmp_path):
    # through the real CLI: an address on the bridge where nothing answers
    started = time.monotonic()
    code, _, err = finish(mlflow_cli(STANDIN, "ssh", {
        "hosts": [f"{SUBNET}.250"], "identity_file": str(keys.identity),
        "known_hosts_file": str(keys.known_hosts), "connect_timeout": 3,
        "python": sys.executable}), timeout=120)
    assert code == 1 and f"ssh to {SUBNET}.250 failed" in err and "fix:" in err, err[-3000:]
    assert time.monotonic() - started < 90  # bounded by connect_timeout, not TCP's minutes
    assert not server_store.runs()

    backend = SshBackend()
    experiment = server_store.experiment_id
    other_key = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)],
                   check=True)
    changed = tmp_path / "changed_known_hosts"  # the host's name with another host's key
    changed.write_text(f"[{loopback_sshd.address}]:{loopback_sshd.port} "
                       + " ".join(other_key.with_suffix(".pub").read_text().split()[:2]) + "\n")
    cases = [({"identity_file": str(other_key)}, "key was rejected"),
             ({"known_hosts_file": str(tmp_path / "empty_known_hosts")}, "not in known_hosts"),
             ({"known_hosts_file": str(changed)},
              r"CHANGED.*ssh-keyscan -p \d+ 127\.0\.0\.1.*ssh-keygen -R '\[127\.0\.0\.1\]:\d+' -f ")]
    for override, fragment in cases:
        cfg = {**ssh_config(keys, loopback_sshd), **override}
        started = time.monotonic()
        with pytest.raises(RemoteError, match=fragment):
            backend.run(str(STANDIN), "main", {}, None, cfg, server_store.uri, experiment)
        assert time.monotonic() - started < 60
    with pytest.raises(ConfigError, match="http\\(s\\) tracking server"):
        backend.run(str(STANDIN), "main", {}, None, ssh_config(keys, loopback_sshd),
                    f"sqlite:///{tmp_path / 'm.db'}", experiment)
    assert not server_store.runs()


def test_a_local_artifact_root_is_refused_unless_shared(server_store, hosts, keys, tmp_path):
    """An experiment whose artifact root is a plain path (a server with
    --no-serve-artifacts, or an explicit artifact_location): each host would keep its
    artifacts on its own disk. Refused before a run exists, with the fix; a shared file
    system (the namespaces share this machine's) is declared with "shared_artifact_root"."""
    client = server_store.client
    cfg = ssh_config(keys, hosts.sshds[0], remote_dir=str(tmp_path / "remote"),
                     process_count_per_node=1)
    for location in (str(tmp_path / "art"), f"file://{tmp_path / 'art'}"):
        experiment = client.create_experiment(f"local-root-{uuid.uuid4().hex[:8]}",
                                              artifact_location=location)
        with pytest.raises(ConfigError, match="artifact root.*--artifacts-destination"):
            SshBackend().run(str(STANDIN), "main", {}, None, cfg, server_store.uri, experiment)
        assert not client.search_runs([experiment])
    submitted = SshBackend().run(str(STANDIN), "main", {"steps": "1", "sleep": "0"}, None,
                                 {**cfg, "shared_artifact_root": True}, server_store.uri,
                                 experiment)
    run = client.get_run(submitted.run_id)
    assert run.info.status == "FINISHED"
    assert (tmp_path / "art" / run.info.run_id / "artifacts" / "fowlflow-logs" /
            "node0.log").exists()


def test_environment_is_prepared_once_and_reused(server_store, loopback_sshd, keys, tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "MLproject").write_text(
        "name: envcheck\npython_env: python_env.yaml\nentry_points:\n"
        "  main:\n    command: python report.py\n")
    (project / "python_env.yaml").write_text(
        f"python: \"{sys.version_info.major}.{sys.version_info.minor}\"\n"
        "build_dependencies: []\ndependencies: []\n")
    (project / "report.py").write_text("import sys\nprint('prefix', sys.prefix)\n")
    cfg = ssh_config(keys, loopback_sshd, remote_dir=str(tmp_path / "remote"))
    seen = []
    for _ in range(2):
        proc = mlflow_cli(project, "ssh", cfg, env_manager="virtualenv")
        code, out, err = finish(proc)
        assert code == 0, err[-3000:]
        run = server_store.runs()[0]
        seen.append((run.data.tags["fowlflow.env"], run.data.tags["fowlflow.env_reused"], out))
    (env1, reused1, out1), (env2, reused2, out2) = seen
    assert env1 == env2 and env1.startswith(str(tmp_path / "remote" / "envs" / "virtualenv-"))
    assert (reused1, reused2) == ("false", "true")
    assert f"prefix {env1}" in out1 and f"prefix {env1}" in out2


def test_reverse_tunnel_reaches_a_tracking_server_on_this_machines_localhost(
        server_store, tracking_server, hosts, keys, tmp_path):
    """The host (a namespace) can't reach our 127.0.0.1; ``"tunnel": true`` carries it."""
    host, port = tracking_server.uri.rsplit("/", 1)[-1].split(":")
    relay = Relay((host, int(port)))  # "mlflow server" listening on this machine's localhost
    try:
        remote_port = free_port()
        cfg = ssh_config(keys, hosts.sshds[0], remote_dir=str(tmp_path / "remote"),
                         process_count_per_node=1, tunnel=True, tunnel_remote_port=remote_port)
        code, out, err = finish(mlflow_cli(STANDIN, "ssh", cfg, {"steps": 3, "sleep": 0.2},
                                           env={"MLFLOW_TRACKING_URI":
                                                f"http://127.0.0.1:{relay.port}"}))
        assert code == 0, err[-4000:]
    finally:
        relay.close()
    run = server_store.only_run()
    assert run.info.status == "FINISHED"
    assert len(server_store.client.get_metric_history(run.info.run_id, "allreduce_sum")) == 3
    assert not any(p.info["name"] == "ssh" and "-R" in (p.info["cmdline"] or [])
                   for p in psutil.process_iter(["name", "cmdline"])
                   if f"127.0.0.1:{remote_port}:" in " ".join(p.info["cmdline"] or []))


def test_another_backend_reuses_the_ssh_launch_with_its_own_hosts(server_store, loopback_sshd,
                                                                 keys, tmp_path):
    """What a provisioning backend does: hand known addresses to SshLaunch; its ``on_end``
    runs once, after the run ended and the shared SSH connections closed."""
    import dataclasses

    from fowlflow.projects.config import HostSpec, MlflowKeys, parse_ssh_config
    from fowlflow.projects.launch_record import LaunchRecord
    from fowlflow.projects.run_lifecycle import Submission
    from fowlflow.projects.ssh_launch import SshLaunch

    cfg = parse_ssh_config({**ssh_config(keys, loopback_sshd), "hosts": ["placeholder"],
                            "remote_dir": str(tmp_path / "remote"),
                            "process_count_per_node": 1})
    cfg = dataclasses.replace(cfg, hosts=(HostSpec(loopback_sshd.address, "root",
                                                   loopback_sshd.port, str(keys.identity)),))
    sub = Submission(str(STANDIN), "main", {"steps": "2", "sleep": "0.1"}, None,
                     server_store.experiment_id, server_store.uri, MlflowKeys())
    ended = []
    launch = SshLaunch(sub, cfg, backend="provisioned",
                       on_end=lambda: ended.append(launch.shared.closed))
    submitted = launch.run()
    assert ended == [True]  # called once, after the shared connections were closed
    wait_until(lambda: not _shared_connection_masters(loopback_sshd),
               what="no shared connection left", timeout=30)
    run = server_store.client.get_run(submitted.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["fowlflow.backend"] == "provisioned"
    record = LaunchRecord.load(server_store.client, submitted.run_id)
    assert record.backend == "provisioned" and record.nodes[0].host.port == loopback_sshd.port
