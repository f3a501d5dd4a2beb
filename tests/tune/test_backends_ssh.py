"""A sweep whose trials run through ``-P backend=ssh`` on two real sshd hosts, 2 at once.

The hosts are two OpenSSH servers on loopback addresses of this machine (127.0.0.1 and
127.0.0.2, started with tests/projects/conftest.py's ``start_sshd`` and a key pair of this
module), so the tracking server (a real ``mlflow server`` with served artifacts) may stay on
127.0.0.1: every host is loopback. Each trial is shipped to its host and runs under the
backend's supervisor; the parallel trials get one host each.
"""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest

from tests.mlflow_server import mlflow_server
from tests.net import free_port
from tests.projects.conftest import Keys, start_sshd, stop
from tests.tune.test_sweep import TINY

ADDRESSES = ("127.0.0.1", "127.0.0.2")


@pytest.fixture(scope="module")
def ssh_hosts(tmp_path_factory):
    """Two sshd hosts and the backend config (as users write it) that reaches both."""
    d = tmp_path_factory.mktemp("tune-ssh-keys")
    d.chmod(0o700)
    for name in ("id_ed25519", "host_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True, capture_output=True, timeout=60)
    auth = d / "authorized_keys"
    auth.write_text((d / "id_ed25519.pub").read_text())
    auth.chmod(0o600)
    keys = Keys(d, d / "id_ed25519", d / "host_ed25519", d / "known_hosts", auth)
    sshds = []
    try:
        for i, address in enumerate(ADDRESSES):
            sshds.append(start_sshd(keys, address, free_port(address),
                                    tmp_path_factory.mktemp(f"tune-sshd{i}")))
        remote = tmp_path_factory.mktemp("tune-ssh-remote")
        yield {"hosts": [{"host": s.address, "port": s.port} for s in sshds], "user": "root",
               "identity_file": str(keys.identity), "known_hosts_file": str(keys.known_hosts),
               "python": sys.executable, "remote_dir": str(remote), "connect_timeout": 5}
    finally:
        for sshd in sshds:
            stop(sshd.proc)


@pytest.fixture(scope="module")
def loopback_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite, artifacts served)."""
    with mlflow_server(tmp_path_factory.mktemp("tune-ssh-server")) as server:
        yield server.uri


def test_parallel_ssh_trials_run_on_hosts_of_their_own(ssh_hosts, loopback_server, tmp_path,
                                                        monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", loopback_server)
    client = MlflowClient(loopback_server)
    experiment_id = client.create_experiment(f"tune-ssh-{tmp_path.name}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    config = tmp_path / "hosts.json"
    config.write_text(json.dumps(ssh_hosts))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "fowlflow.tune", *TINY, "--num_epochs", "2", "--n_trials", "2",
         "--parallel", "2", "--pruner", "none", "--storage", storage, "--study_name", "ssh",
         "--registered_model_name", "none", "--backend", "ssh",
         "--backend_config", str(config)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    trials = optuna.load_study(study_name="ssh", storage=storage).trials
    shown = (f"{[(t.state.name, t.user_attrs) for t in trials]}\n{proc.stdout[-3000:]}\n"
             f"{proc.stderr[-6000:]}")
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"], shown
    (parent,) = client.search_runs([experiment_id], "tags.`fowlflow.kind` = 'tune'")
    runs = [client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials]
    hosts = []
    for trial, run in zip(trials, runs):
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["fowlflow.trial_state"] == "COMPLETE"
        assert run.data.tags["fowlflow.backend"] == "ssh"
        hosts.append(json.loads(run.data.tags["fowlflow.hosts"]))
        history = client.get_metric_history(run.info.run_id, "best_val_acc")
        assert [m.step for m in history] == [1, 2]
        assert trial.value == history[-1].value
    assert sorted(h for (h,) in hosts) == [f"root@{a}" for a in ADDRESSES]  # one host each
    first, second = sorted(runs, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time  # at the same time
    assert parent.data.metrics["trials_complete"] == 2
