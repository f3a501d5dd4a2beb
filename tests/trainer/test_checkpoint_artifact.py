"""Checkpoints kept in the run's artifacts (``-P checkpoint_artifact``) and resumed from with
``-P resume=runs:/<run_id>/checkpoints/checkpoint.pt``, on a real SQLite store."""

from __future__ import annotations

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from fowlflow.errors import ConfigError
from tests.conftest import TINY_PARAMS

ARTIFACT = "checkpoints/checkpoint.pt"


def _args(**values) -> list[str]:
    merged = {k: v for k, v in TINY_PARAMS.items() if k != "registered_model_name"}
    merged.update(data="synthetic", step_size="1", gamma="0.5", **values)
    return [part for k, v in merged.items() for part in (f"--{k}", str(v))]


def _artifacts(client: MlflowClient, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, "checkpoints")}


def test_checkpoint_artifact_is_kept_and_resumed_from_exactly(tracking_uri, tmp_path, monkeypatch):
    """2 epochs straight == 1 epoch whose checkpoint is a run artifact, then a run resumed from
    that artifact for the second (the same weights); auto follows the ssh backend's mark."""
    from fowlflow.trainer.config import LAUNCHED_BY_VAR, parse_args
    from fowlflow.trainer.train import run

    monkeypatch.setenv("FOWLFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(LAUNCHED_BY_VAR, raising=False)
    client = MlflowClient(tracking_uri)
    straight = run(parse_args(_args(num_epochs=2, output_dir=tmp_path / "a")))  # auto: off here
    assert _artifacts(client, straight["run_id"]) == set()

    monkeypatch.setenv(LAUNCHED_BY_VAR, "ssh")  # what the ssh backend sets on its hosts
    first = run(parse_args(_args(num_epochs=1, output_dir=tmp_path / "b")))
    assert _artifacts(client, first["run_id"]) == {ARTIFACT}
    monkeypatch.delenv(LAUNCHED_BY_VAR)

    uri = f"runs:/{first['run_id']}/{ARTIFACT}"
    resumed = run(parse_args(_args(num_epochs=2, output_dir=tmp_path / "c", resume=uri,
                                   checkpoint_artifact="true")))
    assert client.get_run(resumed["run_id"]).data.tags["resumed_from"] == uri
    kept = mlflow.artifacts.download_artifacts(f"runs:/{resumed['run_id']}/{ARTIFACT}",
                                               dst_path=str(tmp_path / "dl"))
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    c = torch.load(kept, weights_only=True)
    assert a["epoch"] == c["epoch"] == 2 and c["scheduler"]["last_epoch"] == 2
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), c["model"][key].float(), atol=1e-6), key
    local = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(v, local["model"][k]) for k, v in c["model"].items())
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["checkpoint.pt"]  # no snapshots


def test_bad_runs_uri_is_refused_clearly(tracking_uri, tmp_path):
    from fowlflow.trainer.config import parse_args
    from fowlflow.trainer.train import run

    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    notes = tmp_path / "checkpoint.pt"
    notes.write_text("not a checkpoint")
    client.log_artifact(run_id, str(notes), "checkpoints")
    cases = {
        f"runs:/{'0' * 32}/{ARTIFACT}": "could not be downloaded",
        f"runs:/{run_id}/checkpoints/other.pt": "could not be downloaded",
        f"runs:/{run_id}": "not a checkpoint artifact URI",
        f"runs:/{run_id}/checkpoints": "a folder of artifacts",
        f"runs:/{run_id}/{ARTIFACT}": "not a readable PyTorch file",
    }
    for uri, problem in cases.items():
        with pytest.raises(ConfigError, match=problem) as err:
            run(parse_args(_args(num_epochs=1, output_dir=tmp_path / "o", resume=uri)),
                tracking=False)
        assert repr(uri) in str(err.value) and "checkpoint" in str(err.value), uri
