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
