"""docs/tune.md's offline sweep, through the real ``mlflow run`` CLI, as written.

One visible change: ``mlflow run .`` runs on the project from this test's folder (tmp_path)
instead of from the project folder, so the default ``optuna.db`` (made where the command is
typed) and the experiment's artifacts land in tmp_path, not in the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import optuna

from tests.conftest import BIN, ROOT
from tests.test_docs_commands import documented


def test_offline_sweep_nests_trials_summarizes_and_registers_the_best(tracking_uri, client,
                                                                      tmp_path):
    command = documented("mlflow run . -e tune --env-manager local -P data=synthetic "
                         "-P weights=none -P image_size=32 -P batch_size=8 -P workers=0 "
                         "-P num_epochs=2 -P n_trials=2 -P parallel=2")
    assert command.startswith("mlflow run . ")
    command = command.replace("mlflow run . ", f"mlflow run {ROOT} ", 1)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    (parent,) = client.search_runs(["0"], "tags.`fowlflow.kind` = 'tune'")
    children = client.search_runs(["0"], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    shown = [(c.info.run_name, c.info.status, c.data.tags.get("fowlflow.trial_state"))
             for c in children]
    said = f"{shown}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert sorted(c.info.run_name for c in children) == ["trial-0", "trial-1"], said
    assert {c.info.status for c in children} == {"FINISHED"}, said
    assert {c.data.tags["fowlflow.trial_state"] for c in children} == {"COMPLETE"}, said
    # each trial's checkpoint: under the project's outputs/ (mlflow run's folder), as for `main`
    checkpoints = ROOT / "outputs" / parent.data.params["optuna_study"]
    found = sorted(str(p.relative_to(checkpoints)) for p in checkpoints.rglob("*"))
    shutil.rmtree(checkpoints, ignore_errors=True)
    assert {"trial-0/checkpoint.pt", "trial-1/checkpoint.pt"} <= set(found), f"{found}\n{said}"
    for child in children:  # the trainer's full tracking, the trial's own values
        assert len(client.get_metric_history(child.info.run_id, "val_acc")) == 2
        assert 0.0005 <= float(child.data.params["learning_rate"]) <= 0.005
        assert 0.9 <= float(child.data.params["momentum"]) <= 0.99
        assert child.data.params["image_size"] == "32"
    best = max(children, key=lambda c: (c.data.metrics["best_val_acc"], c.info.run_name == "trial-0"))
    assert parent.data.tags["best_trial_run_id"] in {c.info.run_id for c in children
                                                     if c.data.metrics["best_val_acc"] ==
                                                     best.data.metrics["best_val_acc"]}
    chosen = client.get_run(parent.data.tags["best_trial_run_id"])
    assert parent.data.metrics["best_val_acc"] == chosen.data.metrics["best_val_acc"]
    assert float(parent.data.params["best_learning_rate"]) == \
        float(chosen.data.params["learning_rate"])
    assert parent.data.metrics["trials_complete"] == 2
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/trials.json", "tune/trials.csv", "tune/search_space.json",
            "tune/optimization_history.png", "tune/parallel_coordinate.png"} <= artifacts
    # the study is in the default storage, where the command was typed
    study_name = parent.data.params["optuna_study"]
    assert parent.data.params["optuna_storage"] == f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 2
    # the best trial's model, registered as after a training run
    version = client.get_model_version_by_alias("fowl-classifier", "candidate")
    assert version.run_id == chosen.info.run_id
    assert parent.data.tags["registered_model"] == f"fowl-classifier version {version.version}"
    assert client.get_model_version_by_alias("fowl-classifier-onnx", "candidate").run_id == \
        chosen.info.run_id
