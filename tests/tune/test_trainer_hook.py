"""The trainer's per-epoch hook: ``run(cfg, on_epoch=...)`` and :class:`StopTraining`."""

from __future__ import annotations


def test_on_epoch_sees_each_epoch_and_can_stop_training(hooked_training):
    """The run of the ``hooked_training`` fixture (tests/tune/conftest.py): 4 epochs asked, the
    hook raises StopTraining after epoch 2."""
    seen, summary, client = hooked_training.seen, hooked_training.summary, hooked_training.client

    assert [e for e, _ in seen] == [1, 2]
    assert {"val_acc", "best_val_acc"} <= set(seen[0][1])
    assert summary["stopped_at_epoch"] == 2
    stopped = client.get_run(summary["run_id"])
    assert stopped.info.status == "FINISHED"
    assert stopped.data.tags["fowlflow.stopped_early"] == "after epoch 2: told to"
    assert [m.step for m in client.get_metric_history(stopped.info.run_id, "val_acc")] == [1, 2]
    # the best weights so far were evaluated and logged as after a last epoch
    artifacts = {a.path for a in client.list_artifacts(stopped.info.run_id)}
    assert {"confusion_matrix.png", "per_class_metrics.json"} <= artifacts
    assert client.search_logged_models([stopped.info.experiment_id])
