"""A sweep whose trials run through ``-P backend=ec2``, 2 at once, on the emulated cloud.

moto in server mode stands in for EC2/SSM/STS (no real AWS is reachable from here) and real
sshd hosts, started by :class:`tests.projects.ec2_hosts.FakeCloud` in network namespaces at the
addresses moto assigns, stand in for the instances: the same setup as
tests/projects/test_ec2_hosts.py, whose fixtures this module imports. The tracking server is
tests/projects/conftest.py's ``mlflow server`` on the test bridge, which the "instances" reach.
"""

from __future__ import annotations

import json
import subprocess
import sys

import optuna

from tests.projects.conftest import network, server_store, tracking_server  # noqa: F401
from tests.projects.ec2_moto import aws, moto_url  # noqa: F401
from tests.projects.test_ec2_hosts import cloud, host_config  # noqa: F401
from tests.tune.test_backends_ssh import loopback_server  # noqa: F401
from tests.tune.test_sweep import TINY


def sweep(tmp_path, config: dict, n_trials: int, parallel: int) -> subprocess.CompletedProcess:
    """``python -m fowlflow.tune`` (the tune entry point) with ``-P backend=ec2``."""
    path = tmp_path / "ec2.json"
    path.write_text(json.dumps(config))
    return subprocess.run(
        [sys.executable, "-m", "fowlflow.tune", *TINY, "--num_epochs", "2", "--n_trials",
         str(n_trials), "--parallel", str(parallel), "--pruner", "none", "--storage",
         f"sqlite:///{tmp_path / 'study.db'}", "--study_name", "ec2",
         "--registered_model_name", "none", "--backend", "ec2", "--backend_config", str(path)],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path)


def test_each_ec2_trial_gets_fresh_instances_removed_when_it_ends(server_store, cloud, aws,
                                                                  tmp_path):
    """No ``cluster_name``: 2 trials at once, each on an instance of its own, which the
    sweep removes (``fowlflow ec2 down``) when the trial ends: nothing is left in moto."""
    proc = sweep(tmp_path, host_config(aws, tmp_path), n_trials=2, parallel=2)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    trials = optuna.load_study(study_name="ec2", storage=f"sqlite:///{tmp_path / 'study.db'}"
                               ).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    client = server_store.client
    (parent,) = client.search_runs([server_store.experiment_id],
                                   "tags.`fowlflow.kind` = 'tune'")
    runs = [client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials]
    for trial, run in zip(trials, runs):
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and tags["fowlflow.trial_state"] == "COMPLETE"
        assert tags["fowlflow.backend"] == "ec2"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "best_val_acc")] \
            == [1, 2]
    clusters = {r.data.tags["fowlflow.ec2.cluster"] for r in runs}
    instances = [i for r in runs for i in json.loads(r.data.tags["fowlflow.ec2.instances"])]
    assert len(clusters) == 2 and len(set(instances)) == 2  # a cluster and instance each
    assert sorted(instances) == sorted(cloud.booted)
    first, second = sorted(runs, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time  # 2 at once
    assert aws.leftovers() == {}  # each trial's instance, group and key pair removed
    assert parent.data.metrics["trials_complete"] == 2


def test_a_named_ec2_cluster_becomes_one_cluster_per_slot_reused_between_trials(
        server_store, cloud, aws, tmp_path):
    """``cluster_name`` tune: clusters tune-0 and tune-1, one per trial slot; the third trial
    reuses one of them; both are kept after the sweep, until ``fowlflow ec2 down``."""
    proc = sweep(tmp_path, host_config(aws, tmp_path, cluster_name="tune"), n_trials=3,
                 parallel=2)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "ec2 clusters tune-0, tune-1: one per trial slot, reused by its next trial" \
        in proc.stdout
    runs = [r for r in server_store.runs() if "fowlflow.ec2.cluster" in r.data.tags]
    assert [r.info.status for r in runs] == ["FINISHED"] * 3, proc.stdout[-3000:]
    assert sorted({r.data.tags["fowlflow.ec2.cluster"] for r in runs}) == ["tune-0", "tune-1"]
    # 3 trials on 2 instances: the third reused its slot's; both kept after the sweep
    assert len({i for r in runs for i in json.loads(r.data.tags["fowlflow.ec2.instances"])}) \
        == 2 == len(cloud.booted) == len(aws.instances(("running",)))
    for name in ("tune-0", "tune-1"):
        down = subprocess.run([sys.executable, "-m", "fowlflow.cli", "ec2", "down", name],
                              capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr
    assert aws.leftovers() == {}


def test_what_only_the_launch_finds_wrong_stops_the_sweep_at_its_first_trial(
        aws, loopback_server, tmp_path, monkeypatch):
    """An instance type the region doesn't offer passes the config parser; the ec2 backend's
    AWS checks refuse it when trial 0 launches: that trial fails, the sweep ends (exit 2, the
    backend's message) instead of failing every trial, nothing is left in moto."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", loopback_server)
    client = MlflowClient(loopback_server)
    experiment_id = client.create_experiment(f"tune-ec2-{tmp_path.name}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    proc = sweep(tmp_path, {**host_config(aws, tmp_path), "instance_type": "g9z.nothing"},
                 n_trials=3, parallel=1)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "-P backend_config: the ec2 backend refused it when trial 0 was launched: unknown " \
           "instance type 'g9z.nothing' in us-east-1" in proc.stderr
    (trial,) = optuna.load_study(study_name="ec2",
                                 storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert trial.state.name == "FAIL"
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["fowlflow.trial_state"] == "FAIL"
    (parent,) = client.search_runs([experiment_id], "tags.`fowlflow.kind` = 'tune'")
    assert parent.info.status == "FAILED"
    assert aws.leftovers() == {}
