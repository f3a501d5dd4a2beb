"""Choosing the objective: ``-P metric=`` (a metric the trainer logs each epoch) and
``-P direction=``; a metric it does not log is refused before any run or trial."""

from __future__ import annotations

import subprocess
import sys

import optuna

from fowlflow.tune import EPOCH_METRICS
from tests.tune.test_sweep import TINY, tune


def test_the_metrics_a_sweep_can_optimize_are_those_the_trainer_reports(hooked_training):
    """Each epoch the hook of the shared run (tests/tune/conftest.py) saw."""
    assert [set(metrics) for _, metrics in hooked_training.seen] == [set(EPOCH_METRICS)] * 2


def test_a_metric_the_trainer_does_not_log_is_refused_before_any_run(tracking_uri, client,
                                                                     tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = subprocess.run([sys.executable, "-m", "fowlflow.tune", *TINY, "--metric", "val_f1",
                           "--storage", storage], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "-P metric=val_f1: the trainer does not log that metric" in proc.stderr
    assert "best_val_acc, val_acc, val_loss" in proc.stderr
    assert client.search_runs(["0"]) == []
    assert optuna.get_all_study_names(storage) == []


def test_a_sweep_minimizes_the_validation_loss(tracking_uri, client, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = tune("--num_epochs", "1", "--n_trials", "2", "--parallel", "1", "--pruner", "none",
                "--metric", "val_loss", "--direction", "minimize", "--storage", storage,
                "--study_name", "loss", "--registered_model_name", "none",
                "--output_dir", str(tmp_path / "out"))
    assert "complete: val_loss" in proc.stdout
    study = optuna.load_study(study_name="loss", storage=storage)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    (parent,) = client.search_runs(["0"], "tags.`fowlflow.kind` = 'tune'")
    children = client.search_runs(["0"], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    losses = {c.info.run_id: c.data.metrics["val_loss"] for c in children}
    assert len(losses) == 2
    for t in study.trials:  # each trial's value: its run's last val_loss
        assert t.value == losses[t.user_attrs["mlflow_run_id"]]
    assert parent.data.tags["best_trial_run_id"] == min(losses, key=losses.get)
    assert parent.data.metrics["val_loss"] == min(losses.values())
    # the study optimizes val_loss: the same study with another objective is refused
    again = subprocess.run([sys.executable, "-m", "fowlflow.tune", *TINY, "--storage", storage,
                            "--study_name", "loss"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "optimizes val_loss (minimize)" in again.stderr
