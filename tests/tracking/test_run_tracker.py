"""The run tracker against a real ``mlflow server`` whose artifact store is down."""

from __future__ import annotations

import os

import mlflow
import pytest
from mlflow.tracking._tracking_service import utils

from fowlflow.errors import ServerError
from fowlflow.tracking import RunTracker
from tests.mlflow_server import mlflow_server
from tests.net import free_port


@pytest.fixture
def server_with_dead_s3(tmp_path):
    """mlflow server (SQLite) proxying artifacts to an S3 endpoint where nothing listens."""
    env = {"MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_MAX_ATTEMPTS": "1"}
    with mlflow_server(tmp_path, artifacts="s3://bucket/artifacts", env=env) as server:
        yield server.uri


def test_failed_artifact_upload_says_where_to_look(server_with_dead_s3, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_with_dead_s3)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    # Our own experiment on this server (setenv is undone after the test, unlike set_experiment).
    exp_id = mlflow.MlflowClient(server_with_dead_s3).create_experiment("dead-s3")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp_id)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    # MLflow's module-level URI wins over the variable: one left set must not win here.
    monkeypatch.setattr(utils, "_tracking_uri", None)
    tracker = RunTracker()
    run_id = tracker.start()
    try:
        tracker.log_epoch({"val_acc": 0.5}, 1)  # metrics still work: only artifacts are down
        with pytest.raises(ServerError) as info:
            tracker.log_dict({"a": 1}, "data/skipped_files.json")
        message = str(info.value)
        assert "'data/skipped_files.json'" in message and server_with_dead_s3 in message
        assert "artifact store (S3)" in message and "server log" in message
    finally:
        # No retries made the failing upload fail at once; the rest may retry. The server
        # may close a kept-alive connection after that failed upload, and a reused one then
        # reads "connection reset" (seen once in CI) although the server is fine.
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        tracker.finish("FAILED")
    run = mlflow.MlflowClient(server_with_dead_s3).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.metrics["val_acc"] == 0.5
