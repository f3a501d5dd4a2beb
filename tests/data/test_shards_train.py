"""pack -> S3 (SeaweedFS) -> ``mlflow run . -P data=s3://...``: a training run reads the shards
(issue 14), tiny settings (the ``s3`` fixture of tests/data/conftest.py)."""

from __future__ import annotations

from mlflow import MlflowClient

from fowlflow.data.pack import pack
from tests.conftest import TINY_PARAMS, make_imagefolder, mlflow_run


def test_pack_to_s3_then_train_streaming_from_the_shards(s3, s3_env, tracking_uri, tmp_path):
    index = pack(str(make_imagefolder(tmp_path / "src")), "s3://data/sets/train", shard_size=3,
                 progress=False)
    mlflow_run(params={**TINY_PARAMS, "data": "s3://data/sets/train", "data_path": "stream",
                       "num_epochs": "2", "output_dir": tmp_path / "out"},
               env={**s3.s3_env(), "FOWLFLOW_CACHE_DIR": str(s3_env)})
    (run,) = MlflowClient(tracking_uri).search_runs(["0"])
    assert run.info.status == "FINISHED"
    assert run.data.params["data_digest"] == index.digest  # as a run on the folder logs it
    assert (run.data.params["train_images"], run.data.params["val_images"]) == ("12", "8")
    assert run.data.tags["class_names"] == "ants, bees"
    assert run.data.tags["data_path"] == "stream"
    assert "shards at s3://data/sets/train" in run.data.tags["data_path_reason"]
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]


def test_a_sweep_on_a_shard_set_registers_its_best_model_checked_on_the_val_split(
        tracking_uri, tmp_path):
    """``-e tune -P data=<shards>``: the trials read the shards, and the best trial's model is
    registered with its ONNX twin checked on the set's val split (written out for the check)."""
    import subprocess
    import sys

    pack(str(make_imagefolder(tmp_path / "src", per_class=(8, 4))), str(tmp_path / "shards"),
         shard_size=4, progress=False)
    proc = subprocess.run(
        [sys.executable, "-m", "fowlflow.tune", "--data", str(tmp_path / "shards"),
         "--weights", "none", "--image_size", "32", "--batch_size", "4", "--workers", "0",
         "--num_epochs", "1", "--n_trials", "1", "--parallel", "1",
         "--storage", f"sqlite:///{tmp_path / 'study.db'}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parity passed on 8 validation images" in proc.stderr
    client = MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias("fowl-classifier-onnx", "candidate")
    (trial,) = client.search_runs(["0"], "tags.`fowlflow.trial_state` = 'COMPLETE'")
    assert version.run_id == trial.info.run_id
    assert trial.data.params["data"] == str(tmp_path / "shards")
