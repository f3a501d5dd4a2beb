"""Fixtures shared by the tune tests (CI time: one real run where several tests read it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

TINY = ["--data", "synthetic", "--weights", "none", "--image_size", "32", "--batch_size", "8",
        "--workers", "0"]


@pytest.fixture(scope="package")
def hooked_training(tmp_path_factory):
    """One real training run (synthetic set, 32 px, 4 epochs asked) whose ``on_epoch`` hook
    records each epoch's metrics and stops training after epoch 2 (:class:`StopTraining`), in
    a SQLite store of its own (made from its folder, as the ``tracking_uri`` fixture does).
    ``seen``: ``[(epoch, metrics)]``; ``summary``: ``run()``'s; ``client`` on that store."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    from fowlflow.trainer.config import parse_args
    from fowlflow.trainer.train import StopTraining, run

    folder = tmp_path_factory.mktemp("hooked-training")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    seen: list[tuple[int, dict]] = []

    def on_epoch(epoch: int, metrics: dict) -> None:
        seen.append((epoch, dict(metrics)))
        if epoch == 2:
            raise StopTraining("told to")

    patch = pytest.MonkeyPatch()
    try:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setattr(utils, "_tracking_uri", None)
        for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
            patch.delenv(name, raising=False)
        patch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
        patch.chdir(folder)
        mlflow.MlflowClient(uri).get_experiment("0")  # the tables, artifacts under folder
        cfg = parse_args([*TINY, "--num_epochs", "4", "--output_dir", str(folder / "out")])
        summary = run(cfg, on_epoch=on_epoch)
    finally:
        patch.undo()
    return SimpleNamespace(seen=seen, summary=summary, client=mlflow.MlflowClient(uri))
