"""The trainer's per-epoch hook: ``run(cfg, on_epoch=...)`` and :class:`StopTraining`."""

from __future__ import annotations

from fowlflow.trainer.config import parse_args
from fowlflow.trainer.train import StopTraining, run

TINY = ["--data", "synthetic", "--weights", "none", "--image_size", "32", "--batch_size", "8",
        "--workers", "0"]


def test_on_epoch_sees_each_epoch_and_can_stop_training(tracking_uri, client, tmp_path):
    seen = []

    def on_epoch(epoch, metrics):
        seen.append((epoch, set(metrics)))
        if epoch == 2:
            raise StopTraining("told to")

    cfg = parse_args([*TINY, "--num_epochs", "4", "--output_dir", str(tmp_path / "out")])
    summary = run(cfg, on_epoch=on_epoch)

    assert [e for e, _ in seen] == [1, 2]
    assert {"val_acc", "best_val_acc"} <= seen[0][1]
    assert summary["stopped_at_epoch"] == 2
    stopped = client.get_run(summary["run_id"])
    assert stopped.info.status == "FINISHED"
    assert stopped.data.tags["fowlflow.stopped_early"] == "after epoch 2: told to"
    assert [m.step for m in client.get_metric_history(stopped.info.run_id, "val_acc")] == [1, 2]
    # the best weights so far were evaluated and logged as after a last epoch
    artifacts = {a.path for a in client.list_artifacts(stopped.info.run_id)}
    assert {"confusion_matrix.png", "per_class_metrics.json"} <= artifacts
    assert client.search_logged_models([stopped.info.experiment_id])
