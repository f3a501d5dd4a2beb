"""Real sweeps on synthetic data: pruning, nesting, the parent summary, registration, resume.

Each test runs ``python -m fowlflow.tune`` (or the real ``mlflow run . -e tune``) against this
test's SQLite tracking store, with its Optuna study in tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
from mlflow.projects._project_spec import load_project

from fowlflow.tune.__main__ import DEFAULT_MODEL_NAME, build_parser
from fowlflow.tune.pruners import PrunerSpec
from tests.conftest import ROOT

TINY = ["--data", "synthetic", "--weights", "none", "--image_size", "32", "--batch_size", "8",
        "--workers", "0"]


def tune(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "fowlflow.tune", *TINY, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=os.getcwd())
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_every_tune_parameter_is_a_flag_with_the_same_default():
    entry = load_project(str(ROOT)).get_entry_point("tune")
    assert entry.command.startswith("python -m fowlflow.tune ")
    flags = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    assert set(entry.parameters) <= set(flags)
    spec = PrunerSpec()
    assert entry.parameters["pruner"].default == spec.name
    assert float(entry.parameters["slack_factor"].default) == spec.slack_factor == 0.15
    assert int(entry.parameters["delay_evaluation"].default) == spec.delay_evaluation == 10
    assert entry.parameters["registered_model_name"].default == DEFAULT_MODEL_NAME
    for name, param in entry.parameters.items():
        default = flags[name].default
        if name in ("search_space", "storage", "study_name"):
            assert param.default == "none" and default in ("none", ""), name
        elif name != "data":
            assert type(default)(param.default) == default, name


def test_a_bad_learning_rate_is_pruned_and_its_run_says_so(tracking_uri, client, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # An earlier trial of the study reached 0.9 at every epoch: the reference the bandit
    # compares with (it also stands for a finished trial a resumed sweep must not repeat).
    study = optuna.create_study(storage=storage, study_name="lr", direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.9, intermediate_values={1: 0.9, 2: 0.9,
                                                                             3: 0.9}))
    proc = tune("--num_epochs", "3", "--n_trials", "2", "--parallel", "1",
                "--search_space", '{"learning_rate": {"type": "categorical", "choices": [50]}}',
                "--pruner", "bandit", "--delay_evaluation", "1", "--storage", storage,
                "--study_name", "lr", "--registered_model_name", "none",
                "--output_dir", str(tmp_path / "out"))

    assert "resuming study lr: 1 finished trials, 1 to run" in proc.stdout
    trials = optuna.load_study(study_name="lr", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]
    pruned = client.get_run(trials[1].user_attrs["mlflow_run_id"])
    (parent,) = client.search_runs(["0"], "tags.`fowlflow.kind` = 'tune'")
    assert pruned.info.run_name == "trial-1"
    assert pruned.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert pruned.info.status == "KILLED"
    assert pruned.data.tags["fowlflow.trial_state"] == "PRUNED"
    assert "pruned by the bandit pruner" in pruned.data.tags["fowlflow.stopped_early"]
    assert float(pruned.data.params["learning_rate"]) == 50
    assert [m.step for m in client.get_metric_history(pruned.info.run_id, "val_acc")] == [1]
    assert "trial.log" in {a.path for a in client.list_artifacts(pruned.info.run_id)}
    # the filter docs/tune.md gives
    found = client.search_runs(["0"], "attributes.status = 'KILLED' and "
                                      "tags.`fowlflow.trial_state` = 'PRUNED'")
    assert [r.info.run_id for r in found] == [pruned.info.run_id]
    assert parent.data.metrics["trials_pruned"] == 1
    rows = json.loads(Path(client.download_artifacts(parent.info.run_id, "tune/trials.json",
                                                     str(tmp_path))).read_text())
    assert [(r["number"], r["state"], r["epochs"]) for r in rows] == [(0, "COMPLETE", 3),
                                                                    (1, "PRUNED", 1)]


def test_a_stopped_sweep_resumes_without_repeating_finished_trials(tracking_uri, client, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = [*TINY, "--num_epochs", "1", "--n_trials", "3", "--pruner", "none",
            "--storage", storage, "--study_name", "resume", "--registered_model_name", "none",
            "--output_dir", str(tmp_path / "out")]
    first = subprocess.Popen([sys.executable, "-m", "fowlflow.tune", *args, "--parallel", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in first.stdout:  # stop it while its second trial runs
        lines.append(line)
        if "trial 1 started" in line:
            first.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + first.communicate(timeout=120)[0]
    assert first.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "trial 0 complete" in out
    study = optuna.load_study(study_name="resume", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    (stopped_parent,) = client.search_runs(["0"], "tags.`fowlflow.kind` = 'tune'")
    assert stopped_parent.info.status == "KILLED"
    stopped_trial = client.get_run(study.trials[1].user_attrs["mlflow_run_id"])
    assert stopped_trial.info.status == "KILLED"  # stopped, not failed
    assert stopped_trial.data.tags["fowlflow.trial_state"] == "FAIL"

    proc = tune(*args[len(TINY):], "--parallel", "2")
    assert "resuming study resume: 1 finished trials, 2 to run" in proc.stdout
    trials = optuna.load_study(study_name="resume", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    first_run = client.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert first_run.data.tags["mlflow.parentRunId"] == stopped_parent.info.run_id  # not rerun
    parent = client.search_runs(["0"], "tags.`fowlflow.kind` = 'tune' and "
                                       "attributes.status = 'FINISHED'")[0]
    assert parent.data.metrics["trials_complete"] == 3  # the whole study's table
    assert len(client.search_runs(["0"], "attributes.run_name LIKE 'trial-%'")) == 4
