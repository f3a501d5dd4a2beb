"""The real ``mlflow run .`` end to end on the embedded default store, checked via MlflowClient."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import BIN, ROOT, TINY_PARAMS, make_imagefolder, mlflow_run
from tests.net import free_port

EPOCH_METRICS = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "momentum",
                 "best_val_acc", "train_images_per_sec", "epoch_seconds"]


@pytest.fixture
def messy_folder(tmp_path):
    """An ImageFolder with the hymenoptera quirks: a GIF and a corrupt JPEG among the photos."""
    root = make_imagefolder(tmp_path / "imgs", per_class=(8, 4))
    (root / "train" / "ants" / "imageNotFound.gif").write_bytes(b"GIF89a....")
    (root / "train" / "bees" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root


def test_mlflow_run_logs_everything(tracking_uri, messy_folder, tmp_path):
    env = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    proc = mlflow_run("--experiment-name", "e2e", cwd=tmp_path, project=ROOT,
                      params={**TINY_PARAMS, "data": messy_folder, "num_epochs": 2,
                              "registered_model_name": "fowl-classifier",
                              "output_dir": tmp_path / "out"}, env=env)
    assert "Skipped 2 unreadable file(s)" in proc.stderr

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    for name in ["data", "num_epochs", "learning_rate", "momentum", "step_size", "gamma",
                 "batch_size", "image_size", "arch", "weights", "freeze_backbone", "workers",
                 "seed", "output_dir", "registered_model_name", "data_digest"]:
        assert name in params, name
    assert params["data"] == str(messy_folder) and params["num_epochs"] == "2"

    for key in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    assert client.get_metric_history(run.info.run_id, "lr")[0].value == pytest.approx(0.001)
    steps = client.get_metric_history(run.info.run_id, "train_loss_step")
    assert len(steps) >= 2 and sorted(m.step for m in steps) == list(range(len(steps)))
    assert run.data.metrics["skipped_files"] == 2
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)

    tags = run.data.tags
    assert tags["class_names"] == "ants, bees" and tags["torch_version"] == torch.__version__
    assert tags["data_digest"] == params["data_digest"]
    assert len(tags["git_commit"]) == 40 and tags["device"] == "cpu"

    datasets = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(datasets) == {"imgs/train", "imgs/val"}
    assert all(len(d.dataset.digest) == 16 for d in datasets.values())

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "per_class_metrics.json", "misclassified_val_images.png",
            "data"} <= artifacts
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "a"))
    skipped = json.load(open(os.path.join(local, "data", "skipped_files.json")))
    assert sorted(s["path"] for s in skipped) == ["train/ants/imageNotFound.gif",
                                                  "train/bees/truncated.jpg"]
    table = json.load(open(os.path.join(local, "per_class_metrics.json")))
    assert table["columns"][:3] == ["class", "precision", "recall"]
    with open(os.path.join(local, "confusion_matrix.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    (model_info,) = [m for m in client.search_logged_models([exp.experiment_id]) if m.name == "model"]
    assert model_info.source_run_id == run.info.run_id
    model = mlflow.pytorch.load_model(f"models:/{model_info.model_id}")
    out = model(torch.zeros(3, 3, 32, 32))  # a batch size other than the example's 2
    assert tuple(out.shape) == (3, 2)
    meta = mlflow.models.get_model_info(f"models:/{model_info.model_id}").metadata
    assert meta["class_names"] == ["ants", "bees"] and meta["image_size"] == 32
    assert meta["best_val_acc"] == pytest.approx(run.data.metrics["best_val_acc"])
    assert (tmp_path / "out" / "checkpoint.pt").is_file()

    # Registered by default: the PyTorch model and its ONNX twin, both aliased `candidate`.
    for name in ("fowl-classifier", "fowl-classifier-onnx"):
        version = client.get_model_version_by_alias(name, "candidate")
        assert version.run_id == run.info.run_id, name


def trainer(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fowlflow.train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_missing_data_fails_clearly_through_mlflow_run(tracking_uri, tmp_path):
    proc = mlflow_run("--experiment-name", "bad", cwd=tmp_path, project=ROOT, check=False,
                      params={**TINY_PARAMS, "data": tmp_path / "nope"})
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "-P data=" in proc.stderr
    assert "Traceback" not in proc.stderr  # a clear message, not a stack dump
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("bad").experiment_id])
    assert run.info.status == "FAILED"
    assert "does not exist" in run.data.tags["error"]


def test_unreachable_url_exits_nonzero_naming_it(tracking_uri, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/fowl_data.zip"  # nothing listens there
    proc = trainer("--data", url, "--weights", "none",
                   env={"FOWLFLOW_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 2
    assert url in proc.stderr and "-P data=" in proc.stderr


def test_mismatched_classes_exit_nonzero(tracking_uri, tmp_path):
    root = make_imagefolder(tmp_path / "d")
    (root / "val" / "bees").rename(root / "val" / "wasps")
    proc = trainer("--data", str(root), "--weights", "none", "--image_size", "32")
    assert proc.returncode == 2 and "different classes" in proc.stderr


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """Two epochs straight == one epoch, then resume for the second (same weights)."""
    from fowlflow.trainer.config import parse_args
    from fowlflow.trainer.train import run

    root = make_imagefolder(tmp_path / "d", per_class=(6, 3))
    base = ["--data", str(root), "--weights", "none", "--image_size", "32", "--batch_size", "4",
            "--workers", "0", "--step_size", "1", "--gamma", "0.5"]
    run(parse_args(base + ["--num_epochs", "2", "--output_dir", str(tmp_path / "a")]), tracking=False)
    run(parse_args(base + ["--num_epochs", "1", "--output_dir", str(tmp_path / "b")]), tracking=False)
    first = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    # epoch 1 is the best so far: its weights are written once, as "model" and "best_state"
    for key, value in first["model"].items():
        assert first["best_state"][key].untyped_storage().data_ptr() == \
            value.untyped_storage().data_ptr(), key
    run(parse_args(base + ["--num_epochs", "2", "--output_dir", str(tmp_path / "b"),
                           "--resume", str(tmp_path / "b" / "checkpoint.pt")]), tracking=False)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    assert b["scheduler"]["last_epoch"] == 2
    assert a["best_acc"] == b["best_acc"]
    for state in ("model", "best_state"):
        for key, value in a[state].items():
            assert torch.allclose(value.float(), b[state][key].float(), atol=1e-6), (state, key)
    with pytest.raises(Exception, match="arch="):
        run(parse_args(base + ["--arch", "mobilenet_v3_small", "--num_epochs", "3",
                               "--resume", str(tmp_path / "b" / "checkpoint.pt")]), tracking=False)


def test_ddp_two_processes_log_one_run(tracking_uri, tmp_path):
    """torchrun with 2 CPU processes (gloo): rank 0 alone logs, into a single run; node 0's
    system metrics have the names a one-process run gives them (no node id)."""
    mlflow.set_experiment("ddp")
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "fowlflow.train",
         "--data", "synthetic", "--weights", "none", "--image_size", "32", "--batch_size", "8",
         "--num_epochs", "1", "--workers", "0", "--output_dir", str(tmp_path / "out"),
         "--registered_model_name", ""],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_EXPERIMENT_NAME": "ddp",
             "FOWLFLOW_CACHE_DIR": str(tmp_path / "cache"),
             "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["world_size"] == "2"
    # 96 synthetic training images split over 2 ranks, batch 8 each: 6 steps per epoch.
    assert len(client.get_metric_history(run.info.run_id, "train_loss_step")) == 6
    assert np.isfinite(run.data.metrics["val_acc"])
    system = sorted(k for k in run.data.metrics if k.startswith("system/"))
    assert "system/cpu_utilization_percentage" in system, system
    assert not any(k.startswith("system/node") for k in system), system
