"""Config parsing, the pure argv builders and SSH options: no processes, fast."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fowlflow.errors import ConfigError, FowlflowError
from fowlflow.projects.config import (MLFLOW_KEYS, HostSpec, SshAccess, parse_ssh_config,
                                      parse_torchrun_config, split_mlflow_keys)
from fowlflow.projects.launch import Rendezvous, node_argv, pick_gpus, torchrun_argv
from fowlflow.projects.nodes import RunState
from fowlflow.projects.ssh_connections import ssh_options
from fowlflow.projects.tunnels import remote_tracking_uri

MLFLOW_ADDED = {"ENV_MANAGER": "local", "SYNCHRONOUS": False, "DOCKER_ARGS": {},
                "STORAGE_DIR": None, "build_image": False, "docker_auth": None}


def test_mlflow_keys_are_stripped_before_validation():
    keys, user = split_mlflow_keys({**MLFLOW_ADDED, "process_count_per_node": 2,
                                    "_mlflow_local_backend_run_id": "abc"})
    assert user == {"process_count_per_node": 2}
    assert keys.env_manager == "local" and keys.synchronous is False and keys.run_id == "abc"
    assert set(MLFLOW_ADDED) | {"_mlflow_local_backend_run_id"} == set(MLFLOW_KEYS)
    cfg = parse_torchrun_config(user)
    assert cfg.process_count_per_node == 2 and cfg.wait is True
    with pytest.raises(Exception):  # frozen
        cfg.wait = False


def test_unknown_keys_are_rejected_naming_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        parse_torchrun_config({"proces_count_per_node": 2})
    assert "proces_count_per_node" in err.value.message
    assert "process_count_per_node" in err.value.message and "free_gpus" in err.value.message
    with pytest.raises(ConfigError, match="valid keys are:.*hosts"):
        parse_ssh_config({"hosts": ["a"], "hots": 1})
    assert issubclass(ConfigError, FowlflowError)


@pytest.mark.parametrize("bad, fragment", [
    ({"process_count_per_node": 0}, "positive integer"),
    ({"process_count_per_node": "two"}, "positive integer"),
    ({"gpus": [0, "1"]}, "list of GPU indices"),
    ({"gpus": [0], "free_gpus": 1}, "not both"),
    ({"wait": "no"}, "true or false"),
    ({"env": ["A=1"]}, "NAME: value"),
])
def test_bad_torchrun_values(bad, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_torchrun_config(bad)


def test_ssh_hosts_and_defaults(tmp_path):
    key = tmp_path / "id"
    key.write_text("k")
    cfg = parse_ssh_config({"hosts": ["gpu-box", {"host": "10.0.0.2", "port": 2222}],
                            "user": "alice", "identity_file": str(key)})
    assert cfg.node_count == 2
    assert cfg.hosts[0] == HostSpec("gpu-box", "alice", None, str(key))
    assert cfg.hosts[1].port == 2222 and cfg.hosts[1].destination == "alice@10.0.0.2"
    assert cfg.strict_host_key_checking is True and cfg.tunnel is False
    with pytest.raises(ConfigError, match="needs \"hosts\""):
        parse_ssh_config({})
    with pytest.raises(ConfigError, match="node_count is 3 but 1 host"):
        parse_ssh_config({"hosts": ["a"], "node_count": 3})
    with pytest.raises(ConfigError, match="identity_file .* does not exist"):
        parse_ssh_config({"hosts": ["a"], "identity_file": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="valid keys are: host, identity_file"):
        parse_ssh_config({"hosts": [{"host": "a", "pot": 1}]})


def test_torchrun_argv_module_script_and_other_commands():
    argv = torchrun_argv("python -m fowlflow.train --data 'a b' --num_epochs 1", 2)
    assert argv == ["python", "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--standalone", "--max-restarts", "0", "-m", "fowlflow.train",
                    "--data", "a b", "--num_epochs", "1"]
    assert torchrun_argv("python3 train.py --x 1", 1)[-3:] == ["train.py", "--x", "1"]
    assert torchrun_argv("bash run.sh", 1)[-3:] == ["--no-python", "bash", "run.sh"]
    rdzv = Rendezvous(nnodes=2, node_rank=1, host="10.0.0.1", port=29400, run_id="r1",
                      local_addr="10.0.0.2")
    multi = torchrun_argv("python train.py", 4, python="/env/bin/python", rdzv=rdzv)
    assert multi[0] == "/env/bin/python" and "--standalone" not in multi
    joined = " ".join(multi)
    assert "--nnodes 2 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29400" in joined
    assert "--rdzv-id r1 --rdzv-conf is_host=false --local-addr 10.0.0.2" in joined
    # one process on one node: the entry point itself, with the environment's python
    assert node_argv("python -m m --a 1", "/env/bin/python", 1) == [
        "/env/bin/python", "-m", "m", "--a", "1"]
    with pytest.raises(ConfigError):
        torchrun_argv("python x.py", 0)
    with pytest.raises(ConfigError, match="can't be split"):
        torchrun_argv("python 'unclosed", 1)


def test_pick_gpus():
    gpus = [{"index": 0, "name": "H200", "processes": 1}, {"index": 1, "name": "H200",
                                                          "processes": 0},
            {"index": 2, "name": "H200", "processes": 0}]
    assert pick_gpus([], None, None, "all") == ([], 1)
    assert pick_gpus([], None, None, 3) == ([], 3)  # CPU: 3 gloo processes
    assert pick_gpus(gpus, None, None, "all") == ([0, 1, 2], 3)
    assert pick_gpus(gpus, None, 2, "all") == ([1, 2], 2)
    assert pick_gpus(gpus, (2,), None, "all") == ([2], 1)
    assert pick_gpus(gpus, None, None, 2) == ([0, 1], 2)
    with pytest.raises(ConfigError, match="only 2 GPU"):
        pick_gpus(gpus, None, 3, "all")
    with pytest.raises(ConfigError, match=r"GPU\(s\) \[7\] not found"):
        pick_gpus(gpus, (7,), None, "all")
    with pytest.raises(ConfigError, match="at most one process per GPU"):
        pick_gpus(gpus, (0,), None, 2)


def test_ssh_options_verify_host_keys_unless_told_not_to():
    host = HostSpec("h", "u", 2222, "/k")
    opts = ssh_options(host)
    assert "StrictHostKeyChecking=yes" in opts and "BatchMode=yes" in opts
    assert "ConnectTimeout=10" in opts and opts[opts.index("-p") + 1] == "2222"
    assert "UserKnownHostsFile=/dev/null" not in opts
    off = ssh_options(host, SshAccess(strict_host_key_checking=False))
    assert "StrictHostKeyChecking=no" in off and "UserKnownHostsFile=/dev/null" in off


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "file:///tmp/mlruns", "./mlruns",
                                 "databricks"])
def test_ssh_refuses_tracking_uris_hosts_cannot_reach(uri):
    cfg = parse_ssh_config({"hosts": ["gpu-box"]})
    with pytest.raises(ConfigError, match="http\\(s\\) tracking server"):
        remote_tracking_uri(uri, cfg, ["203.0.113.5"])


def test_ssh_loopback_tracking_server_needs_a_tunnel():
    cfg = parse_ssh_config({"hosts": ["gpu-box"]})
    with pytest.raises(ConfigError, match="tunnel"):
        remote_tracking_uri("http://127.0.0.1:5000", cfg, ["203.0.113.5"])
    assert remote_tracking_uri("http://127.0.0.1:5000", cfg, ["127.0.0.1"]) == \
        "http://127.0.0.1:5000"
    tunnelled = parse_ssh_config({"hosts": ["gpu-box"], "tunnel": True,
                                  "tunnel_remote_port": 15000})
    assert remote_tracking_uri("http://localhost:5000", tunnelled, ["203.0.113.5"]) == \
        "http://127.0.0.1:15000"
    assert remote_tracking_uri("https://mlflow.example.com", cfg, ["203.0.113.5"]) == \
        "https://mlflow.example.com"


def test_run_state_enum():
    assert RunState("FINISHED").is_terminal() and not RunState.RUNNING.is_terminal()
    assert isinstance(RunState.KILLED, str) and RunState.KILLED == "KILLED"
    assert RunState.LOST.is_terminal() and RunState.LOST.mlflow_status == "FAILED"


def test_importing_the_backends_imports_neither_torch_nor_boto3():
    code = ("import sys, fowlflow.projects, fowlflow.projects.torchrun, fowlflow.projects.ssh, "
            "fowlflow.projects.commands, fowlflow.cli; "
            "print(sorted(m for m in ('torch', 'boto3', 'botocore') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_env_file_is_written_0600_through_stdin(tmp_path):
    import json
    import os
    import stat

    from fowlflow.projects.nodes import Node
    from fowlflow.projects.runners import LocalRunner

    node = Node(LocalRunner(), str(tmp_path / "run"), "node0", sys.executable, "unused")
    node.write_env({"MLFLOW_TRACKING_PASSWORD": "p w'\"$x"})
    path = tmp_path / "run" / "node0.env.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
    assert json.loads(path.read_text()) == {"MLFLOW_TRACKING_PASSWORD": "p w'\"$x"}


def test_relative_local_tracking_uris_are_made_absolute(tmp_path, monkeypatch):
    from fowlflow.projects.run_lifecycle import absolute_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_tracking_uri("mlruns") == str(tmp_path / "mlruns")
    assert absolute_tracking_uri("http://h:5000") == "http://h:5000"
    assert absolute_tracking_uri("databricks") == "databricks"
