"""A sweep on a shard set (issue 14), tiny settings. (pack -> SeaweedFS S3 -> a streamed,
registered training run is tests/trainer/test_data_paths.py's
``test_pack_to_s3_then_train_and_register_from_the_shards``.)"""

from __future__ import annotations

from mlflow import MlflowClient

from fowlflow.data.pack import pack
from tests.conftest import make_imagefolder


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
