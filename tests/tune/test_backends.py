"""Trials through fowlflow's backends: ``-P backend=torchrun|ssh -P backend_config=...``.

The config checks run in-process; the sweep is the real ``mlflow run . -e tune`` CLI with
``-P backend=torchrun`` (CPU processes, gloo, the synthetic set at 32 px), run once for the
module: one trial completes, one with a learning rate of 50 is pruned by the bandit pruner
(the sweep reads its per-epoch metric from the tracking store and cancels its run).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from fowlflow.errors import ConfigError
from fowlflow.tune.backends import parse_backend
from tests.conftest import BIN, ROOT
from tests.test_docs_commands import documented
from tests.tune.test_sweep import TINY

EPOCHS = 20  # docs/tune.md's: long enough that the pruned trial is cancelled before its last
RUN_DIRS = Path("~/.fowlflow/runs").expanduser()


# --- the backend config, checked before any trial ---------------------------------------------

def test_torchrun_gpus_are_split_between_parallel_trials():
    spec = parse_backend("torchrun", '{"gpus": [0, 1, 2, 3], "max_restarts": 1}', parallel=2)
    assert [s["gpus"] for s in spec.slots] == [[0, 1], [2, 3]]
    assert {s["max_restarts"] for s in spec.slots} == {1}
    this_machine = parse_backend("torchrun", "none", parallel=4, gpu_count=8)
    assert [s["gpus"] for s in this_machine.slots] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    cpu = parse_backend("torchrun", '{"process_count_per_node": 2}', parallel=2, gpu_count=0)
    assert cpu.slots == ({"process_count_per_node": 2},) * 2  # CPU processes for each trial


def test_ssh_hosts_are_split_between_parallel_trials(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    config = tmp_path / "hosts.json"
    config.write_text(json.dumps({"hosts": ["a", "b", "c", "d", "e"], "user": "alice"}))
    spec = parse_backend("ssh", str(config), parallel=2)
    assert [s["hosts"] for s in spec.slots] == [["a", "b"], ["c", "d"]]
    assert {s["user"] for s in spec.slots} == {"alice"}
    assert spec.notes == ("hosts ['e'] are not used: 5 hosts do not split evenly into 2 trials "
                          "at once",)


@pytest.mark.parametrize("backend, config, parallel, message", [
    ("slurm", "none", 1, "-P backend=slurm is unknown; use one of local, torchrun, ssh, ec2"),
    ("none", '{"gpus": [0]}', 1, "-P backend_config is given but -P backend is local"),
    ("torchrun", '{"gpus": [0], "wait": true}', 1, "the sweep sets wait for each trial"),
    ("torchrun", '{"gpus": "0,1"}', 1, "gpus must be a non-empty list of GPU indices"),
    ("torchrun", '{"gpus": [0, 1]}', 3, "-P parallel=3 needs at least 3 GPUs"),
    ("torchrun", '{"free_gpus": 1}', 2, 'list them instead, e.g. "gpus": [0, 1, 2, 3]'),
    ("torchrun", "{not json", 1, "-P backend_config is not valid JSON"),
    ("torchrun", "nowhere.json", 1, "nowhere.json"),
    ("ssh", '{"hosts": ["a"]}', 2, "-P parallel=2 needs at least 2 hosts"),
    ("ssh", '{"hosts": ["a"], "tunnel": true}', 1, '"tunnel" needs a client attached'),
    ("ssh", '{"process_count_per_node": 2}', 1,
     '-P backend_config: the ssh backend refuses it: the ssh backend needs "hosts"'),
    ("torchrun", '{"gpu": [0]}', 1, "-P backend_config: the torchrun backend refuses it: "
                                    "unknown torchrun backend config key(s) ['gpu']"),
    ("ssh", '{"hosts": ["a"], "identity_file": "/nonexistent/key"}', 1,
     "the ssh backend refuses it: identity_file '/nonexistent/key' does not exist"),
    ("ec2", '{"instance_type": "g6e.xlarge", "spot": "yes"}', 1,
     "the ec2 backend refuses it: spot must be true or false, got 'yes'"),
    ("ec2", '{"cluster_name": "a-cluster-name-of-forty-characters-long"}', 2,
     "the ec2 backend refuses it (as trial slot 0 gets it: {\"cluster_name\": "
     "\"a-cluster-name-of-forty-characters-long-0\"}): cluster_name "),
    ("ec2", '{"idle_minutes": 0}', 1, '"wait": false with "idle_minutes": 0'),
    ("ec2", '{"tunnel": true}', 1, '"tunnel" needs a client attached'),
    ("ec2", '{"wait": true}', 1, "the sweep sets wait for each trial"),
])
def test_a_bad_backend_config_is_refused(monkeypatch, backend, config, parallel, message):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    with pytest.raises(ConfigError) as err:
        parse_backend(backend, config, parallel, gpu_count=0)
    assert message in str(err.value)


def test_ssh_trials_need_a_tracking_server_the_hosts_reach(tracking_uri, client, tmp_path):
    """Refused before any run or trial: the sweep's store is a SQLite file on this machine."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = subprocess.run([sys.executable, "-m", "fowlflow.tune", *TINY, "--backend", "ssh",
                           "--backend_config", '{"hosts": ["gpu-a"]}', "--parallel", "1",
                           "--storage", storage], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "-P backend=ssh: the hosts log to the tracking server, but MLFLOW_TRACKING_URI is " \
           "'sqlite:///" in proc.stderr
    assert client.search_runs(["0"]) == []
    assert optuna.get_all_study_names(storage) == []


def test_a_config_the_backend_refuses_is_refused_before_any_run_or_trial(tracking_uri, client,
                                                                          tmp_path):
    """The backend's own config parser runs before the sweep starts: a key only the torchrun
    backend knows is wrong ends the sweep with exit 2 and the backend's message, and no parent
    run, trial run or study exists."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = subprocess.run([sys.executable, "-m", "fowlflow.tune", *TINY, "--backend", "torchrun",
                           "--backend_config", '{"gpu": [0]}', "--n_trials", "3",
                           "--parallel", "1", "--storage", storage, "--study_name", "bad"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "-P backend_config: the torchrun backend refuses it: unknown torchrun backend " \
           "config key(s) ['gpu']; valid keys are: env, free_gpus, gpus" in proc.stderr
    assert client.search_runs(["0"]) == []
    assert optuna.get_all_study_names(storage) == []


def test_ec2_trials_get_instances_of_their_own(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    named = parse_backend("ec2", '{"cluster_name": "sweep", "node_count": 2}', parallel=2)
    assert [s["cluster_name"] for s in named.slots] == ["sweep-0", "sweep-1"]
    assert {s["node_count"] for s in named.slots} == {2}  # instances per trial
    assert not named.down_after_trial(0)  # kept: the slot's next trial reuses it
    assert "sweep-0, sweep-1: one per trial slot, reused by its next trial and kept" \
        in named.notes[0]
    down = parse_backend("ec2", '{"cluster_name": "sweep", "down": true}', parallel=2)
    assert down.down_after_trial(1)
    fresh = parse_backend("ec2", '{"spot": true}', parallel=3)
    assert fresh.slots == ({"spot": True},) * 3 and fresh.down_after_trial(2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///here.db")
    with pytest.raises(ConfigError, match="-P backend=ec2: the instances log to the tracking "
                                          "server, but MLFLOW_TRACKING_URI is 'sqlite:///"):
        parse_backend("ec2", "none", parallel=1)


# --- a real sweep through -P backend=torchrun -------------------------------------------------

@pytest.fixture(scope="module")
def torchrun_sweep(tmp_path_factory):
    """docs/tune.md's ``mlflow run . -e tune ... -P backend=torchrun`` sweep, on a study that
    already holds a reference trial (0.9 at epoch 3) and two enqueued trials: learning rate
    0.001 (completes) and 50 (pruned at epoch 3 by the bandit: 0.5 < 0.9 / 1.15)."""
    from mlflow import MlflowClient

    command = documented(
        "mlflow run . -e tune --env-manager local -P data=synthetic -P weights=none "
        "-P image_size=32 -P batch_size=8 -P workers=0 -P num_epochs=20 -P n_trials=3 "
        "-P parallel=2 -P delay_evaluation=3 -P backend=torchrun "
        "-P backend_config='{\"process_count_per_node\": 1}'")
    folder = tmp_path_factory.mktemp("tune-torchrun")
    uri, storage = f"sqlite:///{folder / 'mlflow.db'}", f"sqlite:///{folder / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="torchrun", direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.6, intermediate_values={3: 0.9}))
    study.enqueue_trial({"learning_rate": 0.001})
    study.enqueue_trial({"learning_rate": 50})
    space = json.dumps({"learning_rate": {"type": "categorical", "choices": [0.001, 50]}})
    extra = {"search_space": space, "storage": storage, "study_name": "torchrun",
             "output_dir": str(folder / "out")}
    command = command.replace("mlflow run . ", f"mlflow run {ROOT} ", 1) + "".join(
        f" -P {shlex.quote(f'{k}={v}')}" for k, v in extra.items())
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        env.pop(name, None)
    proc = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)
    client = MlflowClient(uri)
    trials = optuna.load_study(study_name="torchrun", storage=storage).trials
    run_dirs = [RUN_DIRS / t.user_attrs["mlflow_run_id"] for t in trials if t.user_attrs]
    yield proc, client, trials, run_dirs
    for run_dir in run_dirs:  # the torchrun backend's default run_dir
        shutil.rmtree(run_dir, ignore_errors=True)


def _run(client, trial):
    return client.get_run(trial.user_attrs["mlflow_run_id"])


def test_torchrun_trials_are_nested_child_runs_and_the_best_is_registered(torchrun_sweep):
    proc, client, trials, run_dirs = torchrun_sweep
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert [t.params.get("learning_rate") for t in trials] == [None, 0.001, 50]
    (parent,) = client.search_runs(["0"], "tags.`fowlflow.kind` = 'tune'")
    assert parent.data.params["backend"] == "torchrun"
    good = _run(client, trials[1])
    assert good.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert good.info.run_name == "trial-1"
    assert good.info.status == "FINISHED"
    assert good.data.tags["fowlflow.trial_state"] == "COMPLETE"
    assert good.data.tags["fowlflow.backend"] == "torchrun"  # launched by the backend
    assert good.data.params["backend"] == "torchrun"
    assert good.data.params["image_size"] == "32"  # every trainer setting reached the trial
    assert float(good.data.params["learning_rate"]) == 0.001
    history = client.get_metric_history(good.info.run_id, "best_val_acc")
    assert [m.step for m in history] == list(range(1, EPOCHS + 1))
    assert trials[1].value == history[-1].value  # what the sweep read from the store
    assert trials[1].intermediate_values == {m.step: m.value for m in history}
    assert "fowlflow-logs/node0.log" in {a.path for a in client.list_artifacts(
        good.info.run_id, "fowlflow-logs")}
    assert (run_dirs[0] / "node0.log").is_file()  # the torchrun backend's default run_dir
    assert parent.data.metrics["trials_complete"] == 2
    assert parent.data.metrics["trials_pruned"] == 1
    assert parent.data.tags["best_trial_run_id"] == good.info.run_id
    version = client.get_model_version_by_alias("fowl-classifier", "candidate")
    assert version.run_id == good.info.run_id


def test_a_pruned_torchrun_trial_is_cancelled_and_marked_as_local_ones(torchrun_sweep,
                                                                       monkeypatch):
    from fowlflow.projects.commands import run_from_tags
    from fowlflow.projects.ssh_connections import SharedConnections
    from fowlflow.projects.submitted import combine

    proc, client, trials, _ = torchrun_sweep
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    pruned = _run(client, trials[2])
    assert "fowlflow: trial 2 pruned after epoch 3" in proc.stdout
    assert pruned.info.status == "KILLED"
    assert pruned.data.tags["fowlflow.trial_state"] == "PRUNED"
    assert "pruned by the sweep (BanditPruner: best_val_acc 0.5 at epoch 3)" in \
        pruned.data.tags["fowlflow.stopped_early"]
    assert trials[2].last_step == 3
    steps = [m.step for m in client.get_metric_history(pruned.info.run_id, "val_acc")]
    assert 3 <= len(steps) < EPOCHS, steps  # cancelled before its last epoch; metrics kept
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    with SharedConnections() as shared:  # as `fowlflow status` sees it: nothing runs
        assert combine(run_from_tags(pruned.info.run_id, shared).states()).value == "KILLED"
    found = client.search_runs(["0"], "attributes.status = 'KILLED' and "
                                      "tags.`fowlflow.trial_state` = 'PRUNED'")
    assert [r.info.run_id for r in found] == [pruned.info.run_id]


def test_a_stopped_sweep_cancels_its_running_torchrun_trials(tracking_uri, client, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "fowlflow.tune", *TINY, "--num_epochs", "200", "--n_trials", "1",
         "--parallel", "1", "--pruner", "none", "--storage", storage, "--study_name", "stop",
         "--registered_model_name", "none", "--output_dir", str(tmp_path / "out"),
         "--backend", "torchrun", "--backend_config", json.dumps({"run_dir": str(tmp_path)})],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in sweep.stdout:  # stop it once its trial runs through the backend
        lines.append(line)
        if "started through torchrun" in line:
            run_id = line.split("(run ")[1].split(")")[0]
            break
    import time

    deadline = time.monotonic() + 240
    while not client.get_metric_history(run_id, "val_acc") and time.monotonic() < deadline:
        time.sleep(1)  # the trainer runs its epochs
    sweep.send_signal(signal.SIGTERM)
    out = "".join(lines) + sweep.communicate(timeout=120)[0]
    assert sweep.returncode == 128 + signal.SIGTERM, out[-3000:]
    trial = _run(client, optuna.load_study(study_name="stop", storage=storage).trials[0])
    assert trial.info.run_id == run_id
    assert trial.info.status == "KILLED"
    assert trial.data.tags["fowlflow.trial_state"] == "FAIL"
    assert 1 <= len(client.get_metric_history(run_id, "val_acc")) < 200
    assert optuna.load_study(study_name="stop", storage=storage).trials[0].state.name == "FAIL"
    log = Path(tmp_path / run_id / "node0.log")
    assert log.is_file()
    from fowlflow.projects.commands import run_from_tags
    from fowlflow.projects.ssh_connections import SharedConnections
    from fowlflow.projects.submitted import combine

    with SharedConnections() as shared:
        assert combine(run_from_tags(run_id, shared).states()).value == "KILLED"


def test_a_failed_torchrun_trial_shows_the_trainers_cause(tracking_uri, client, tmp_path):
    """A trial whose trainer fails on the host (every image unreadable: the sweep's own check
    of the folder's layout passes) is FAIL with the cause the trainer recorded in its run's
    ``error`` tag, in the trial, in the sweep's output and in its final error."""
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / "bad" / split / label
            folder.mkdir(parents=True)
            (folder / "x.jpg").write_bytes(b"not a JPEG" * 30)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "fowlflow.tune", *TINY, "--data", str(tmp_path / "bad"),
         "--num_epochs", "1", "--n_trials", "1", "--parallel", "1", "--pruner", "none",
         "--storage", storage, "--study_name", "bad", "--registered_model_name", "none",
         "--output_dir", str(tmp_path / "out"), "--backend", "torchrun",
         "--backend_config", json.dumps({"process_count_per_node": 1,
                                         "run_dir": str(tmp_path / "runs")})],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (trial,) = optuna.load_study(study_name="bad", storage=storage).trials
    cause = "error: DataError: train/ has no readable image for class(es) ['a', 'b']"
    assert trial.state.name == "FAIL"
    assert trial.user_attrs["error"].startswith(cause), trial.user_attrs
    run_id = trial.user_attrs["mlflow_run_id"]
    assert f"see `fowlflow logs {run_id}`" in trial.user_attrs["error"]
    assert f"fowlflow: trial 0 failed (its run ended FAILED); {cause}" in proc.stderr
    assert "fowlflow: error: No trial of study bad completed (1 failed, 0 pruned)" in proc.stderr
    assert f"trial 0: {cause}" in proc.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["fowlflow.trial_state"] == "FAIL"
