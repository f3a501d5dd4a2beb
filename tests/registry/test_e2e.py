"""End to end through the real `mlflow run` CLI: train → register → promote → predict → evaluate."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import BIN, HYMENOPTERA, TINY_PARAMS, TURKEY, mlflow_run


@pytest.mark.slow
def test_train_registers_then_promote_and_predict_entry_points(tmp_path, tracking_uri,
                                                               monkeypatch):
    import mlflow

    monkeypatch.setenv("PATH", f"{BIN}:{__import__('os').environ['PATH']}")
    name = "fowl-e2e"
    mlflow_run(params={**TINY_PARAMS, "data": "synthetic", "registered_model_name": name})
    client = mlflow.MlflowClient(tracking_uri)
    (mv,) = client.search_model_versions(f"name='{name}'")
    (onnx_mv,) = client.search_model_versions(f"name='{name}-onnx'")
    assert mv.tags["onnx_model"] == f"{name}-onnx/{onnx_mv.version}"
    assert mv.tags["parity_passed"] == "true" and float(mv.tags["val_acc"]) >= 0
    params = client.get_run(mv.run_id).data.params
    assert mv.tags["data_digest"] == params["data_digest"]  # the trainer's resolved config
    assert params["resume"] == "none" and "''" not in params.values()  # issue 8.9
    assert client.get_run(mv.run_id).data.metrics["parity_top1_agreement"] == 1.0

    # The register entry point on the same run's model: already registered, nothing new (8.12).
    proc = mlflow_run("-e", "register", params={
        "model_uri": f"runs:/{mv.run_id}/model", "val_dir": str(HYMENOPTERA / "val"),
        "name": name, "max_images": "8"})
    assert (f"already registered: runs:/{mv.run_id}/model is {name} version 1 and {name}-onnx "
            "version 1; nothing new registered") in proc.stdout
    assert len(client.search_model_versions(f"name='{name}'")) == 1

    mlflow_run("-e", "promote", params={"name": name})  # @candidate = version 1
    for model in (name, f"{name}-onnx"):
        assert str(client.get_model_version_by_alias(model, "champion").version) == "1"

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(TURKEY, photos / "turkey.jpg")
    (photos / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is missing")
    csv = tmp_path / "predictions.csv"
    proc = mlflow_run("-e", "predict", params={"model_uri": f"models:/{name}-onnx@champion",
                                               "images": str(photos), "output_csv": str(csv)})
    assert "corrupt.png" in proc.stdout and "is not a readable image" in proc.stdout
    assert "turkey.jpg" in proc.stdout and csv.exists()

    # Issue 8.9: a trailing slash made evaluate crash after predicting every image.
    for cls in json.loads(mv.tags["class_names"]):
        (tmp_path / "val" / cls).mkdir(parents=True)
        shutil.copy(TURKEY, tmp_path / "val" / cls / "turkey.jpg")
    given = f"{tmp_path / 'val'}/"
    mlflow_run("-e", "evaluate", params={"model_uri": f"models:/{name}-onnx@champion",
                                         "data_dir": given})
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "params.data_dir != ''")
    assert run.data.params["data_dir"] == given and run.data.metrics["images"] == 2
