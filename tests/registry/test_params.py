"""One rule for params (issue 8.9): `mlflow run`'s own values stay, empties are spelled none.

`mlflow run` logs every MLproject parameter itself, shell-quoted (MLflow's
``EntryPoint.compute_parameters``), before the entry point starts; these tests create the run
exactly that way (MLflow's own code on this project's MLproject), then run the entry point in it.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import ROOT
from tests.registry.conftest import MODEL_NAME

ONNX_URI = f"models:/{MODEL_NAME}-onnx/1"


def _project_run(monkeypatch, entry_point: str, values: dict) -> str:
    """A run as `mlflow run . -e <entry_point> -P ...` creates it; MLFLOW_RUN_ID set."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.projects import _project_spec

    final, extra = _project_spec.load_project(str(ROOT)).get_entry_point(
        entry_point).compute_parameters(values, storage_dir=None)
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.create_run(mlflow.set_experiment("params-tests").experiment_id)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in {**final, **extra}.items()])
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    return run.info.run_id


def _params(run_id: str) -> dict:
    import mlflow

    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id).data.params


def test_evaluate_with_a_trailing_slash_under_mlflow_run(registered, use_store, val_dir,
                                                         monkeypatch):
    """Crashed after predicting every image: data_dir 'val/' logged again as 'val'."""
    from fowlflow.registry import evaluate

    given = f"{val_dir}/"
    run_id = _project_run(monkeypatch, "evaluate", {"model_uri": ONNX_URI, "data_dir": given})
    assert evaluate.main(["--model_uri", ONNX_URI, "--data_dir", given]) == 0
    params = _params(run_id)
    assert params["data_dir"] == given and "accuracy" in _metrics(run_id)


def test_register_without_val_dir_under_mlflow_run(registered, use_store, monkeypatch,
                                                   tmp_path, capsys):
    """The README's `-e register -P model_uri=runs:/<id>/model` always failed on val_dir."""
    import mlflow

    from fowlflow.registry import register

    monkeypatch.setenv("FOWLFLOW_CACHE_DIR", str(tmp_path))
    client = mlflow.MlflowClient(use_store)
    source = client.get_model_version(MODEL_NAME, registered.version).run_id
    uri = f"runs:/{source}/model"
    run_id = _project_run(monkeypatch, "register", {"model_uri": uri, "name": MODEL_NAME})
    assert _params(run_id)["val_dir"] == "none"  # MLproject's default, not ''
    assert register.main(["--model_uri", uri, "--val_dir", "none", "--name", MODEL_NAME]) == 0
    assert "already registered" in capsys.readouterr().out
    assert "''" not in _params(run_id).values()


def test_plain_python_m_logs_params_as_given_with_empties_as_none(registered, use_store,
                                                                  val_dir):
    """Without `mlflow run`, the entry point logs its own params: as given, '' -> none."""
    import mlflow

    from fowlflow.registry import register

    client = mlflow.MlflowClient(use_store)
    source = client.get_model_version(MODEL_NAME, registered.version).run_id
    mlflow.set_experiment("params-tests")
    assert register.main(["--model_uri", source, "--val_dir", "", "--name", MODEL_NAME]) == 0
    run = mlflow.last_active_run()
    assert run.data.params["val_dir"] == "none" and run.data.params["model_uri"] == source
    assert run.data.tags["registration"] == "reused"


def test_run_tracker_keeps_mlflow_runs_spelling_and_logs_the_rest(use_store, monkeypatch):
    """The trainer's resolved config: new keys logged, -P keys left as `mlflow run` wrote them."""
    from fowlflow.tracking import RunTracker

    run_id = _project_run(monkeypatch, "main", {"data": "my photos/", "num_epochs": "1"})
    assert _params(run_id)["data"] == "'my photos/'" and _params(run_id)["resume"] == "none"
    tracker = RunTracker()
    assert tracker.start() == run_id
    try:
        tracker.log_params({"data": "my photos/", "resume": "", "registered_model_name": "",
                            "data_digest": "abc", "num_classes": 2})
    finally:
        tracker.finish()
    params = _params(run_id)
    assert params["data"] == "'my photos/'"  # MLflow's spelling stays; no conflict
    assert (params["data_digest"], params["num_classes"]) == ("abc", "2")
    assert params["registered_model_name"] == "fowl-classifier"  # the MLproject default


def test_trainer_flags_take_none_for_unset():
    from fowlflow.train import parse_args

    cfg, name = parse_args(["--resume", "none", "--registered_model_name", "none"])
    assert (cfg.resume, name) == ("", "")
    assert parse_args(["--resume", "out/ck.pt"])[0].resume == "out/ck.pt"


def _metrics(run_id: str) -> dict:
    import mlflow

    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id).data.metrics


@pytest.fixture(autouse=True)
def _no_active_run():
    import mlflow

    yield
    while mlflow.active_run():
        mlflow.end_run()
