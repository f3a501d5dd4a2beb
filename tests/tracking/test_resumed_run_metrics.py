"""A run started again in the same MLflow run (the ssh/ec2 backends after a lost node) from an
older checkpoint ends with one value per step of each metric, on a real SQLite store.

The trainer logs an epoch's metrics before its checkpoint is uploaded (in the background), so a
node lost in between leaves the run with epoch k's metrics and epoch k-1's checkpoint: the
replacement trains epoch k again.
"""

from __future__ import annotations

import shutil

from mlflow import MlflowClient

from fowlflow.tracking import RunTracker
from tests.conftest import TINY_PARAMS

EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "momentum",
              "best_val_acc", "train_images_per_sec", "epoch_seconds")


def _history(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
            for k in keys}


def _one_value_per_step(history: dict[str, list[tuple[int, float]]]) -> None:
    for key, points in history.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), (key, steps)


def test_a_tracker_attached_again_logs_no_step_twice(tracking_uri, monkeypatch):
    """Epochs 1-2 and steps 0-9 logged, the run ended by a lost node; a tracker attached to the
    same run then logs epochs 1-3 and steps 0-14: the store has each step once, the first
    values kept."""
    first = RunTracker()
    run_id = first.start()
    for epoch in (1, 2):
        first.log_epoch({"val_acc": epoch / 10, "train_loss": 1.0 / epoch}, epoch)
    first.log_steps(0, [float(i) for i in range(10)], 50.0)
    first.flush()
    first.finish("FAILED")

    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)  # how the backend starts it in the same run
    again = RunTracker()
    assert again.start() == run_id
    for epoch in (1, 2, 3):
        again.log_epoch({"val_acc": epoch / 10 + 0.5, "train_loss": 1.0 / epoch}, epoch)
    again.log_steps(0, [100.0 + i for i in range(8)], 60.0)  # all stored: nothing logged
    again.log_steps(8, [100.0 + i for i in range(8, 15)], 70.0)  # steps 10-14 are new
    again.flush()
    again.finish()

    history = _history(MlflowClient(tracking_uri), run_id)
    _one_value_per_step(history)
    assert history["val_acc"] == [(1, 0.1), (2, 0.2), (3, 3 / 10 + 0.5)]
    assert [s for s, _ in history["train_loss_step"]] == list(range(15))
    assert history["train_loss_step"][9:11] == [(9, 9.0), (10, 110.0)]
    assert history["train_images_per_sec_step"] == [(9, 50.0), (14, 70.0)]


def _args(**values) -> list[str]:
    merged = {k: v for k, v in TINY_PARAMS.items() if k != "registered_model_name"}
    merged.update(data="synthetic", step_size="1", gamma="0.5", **values)
    return [part for k, v in merged.items() for part in (f"--{k}", str(v))]


def test_a_run_resumed_from_an_older_checkpoint_logs_each_epoch_once(tracking_uri, tmp_path,
                                                                     monkeypatch):
    """2 epochs logged, but only epoch 1's checkpoint kept (epoch 2's upload never landed);
    the same run resumed from it for 3 epochs: epoch 2 is trained again, with the same values,
    and every metric (epoch and step) has one value per step."""
    from fowlflow.trainer.config import parse_args
    from fowlflow.trainer.train import run

    monkeypatch.setenv("FOWLFLOW_CACHE_DIR", str(tmp_path / "cache"))
    seen: dict[str, dict[int, dict]] = {"first": {}, "again": {}}

    def keep_epoch_1(epoch, metrics):
        seen["first"][epoch] = metrics
        if epoch == 1:
            shutil.copyfile(tmp_path / "a" / "checkpoint.pt", tmp_path / "epoch1.pt")

    first = run(parse_args(_args(num_epochs=2, output_dir=tmp_path / "a")), on_epoch=keep_epoch_1)
    client = MlflowClient(tracking_uri)
    run_id = first["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1, 2]

    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    again = run(parse_args(_args(num_epochs=3, output_dir=tmp_path / "c",
                                 resume=tmp_path / "epoch1.pt")),
                on_epoch=lambda epoch, metrics: seen["again"].__setitem__(epoch, metrics))
    assert again["run_id"] == run_id and sorted(seen["again"]) == [2, 3]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc"):  # exact
        assert seen["again"][2][key] == seen["first"][2][key], key

    history = _history(client, run_id)
    _one_value_per_step(history)
    for key in EPOCH_KEYS:
        assert [s for s, _ in history[key]] == [1, 2, 3], (key, history[key])
    assert history["val_acc"][1][1] == seen["first"][2]["val_acc"]
    loss_steps = [s for s, _ in history["train_loss_step"]]
    assert loss_steps == list(range(len(loss_steps))) and len(loss_steps) % 3 == 0
    assert client.get_run(run_id).info.status == "FINISHED"
