"""The predict and evaluate entry points (run in-process through their main())."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from tests.conftest import ROOT, TURKEY, mlflow_run
from tests.registry.conftest import MODEL_NAME, hymenoptera_images

ONNX_URI = f"models:/{MODEL_NAME}-onnx/1"  # the `registered` fixture's version


def test_predict_reports_a_corrupt_image_and_predicts_the_others(registered, use_store,
                                                                tmp_path, capsys):
    from fowlflow.registry import predict

    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this jpeg was cut off")
    (folder / "notes.txt").write_text("not an image, and not listed")
    shutil.copy(TURKEY, folder / "turkey.jpg")
    ant = hymenoptera_images(1)[0]
    csv = tmp_path / "out.csv"
    assert predict.main(["--model_uri", ONNX_URI, "--images", f"{folder},{ant}",
                         "--output_csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "broken.jpg" in out and "is not a readable image" in out
    assert "1 of 3 images could not be read" in out
    table = pd.read_csv(csv, keep_default_na=False)
    assert list(table["path"]) == [str(folder / "broken.jpg"), str(folder / "turkey.jpg"),
                                   str(ant)]
    assert table["error"][0] and not table["error"][1] and not table["error"][2]
    assert set(table["label"][1:]) <= {"ants", "bees"} and table["label"][0] == ""
    assert {"p_ants", "p_bees"} <= set(table.columns)


def test_predict_gives_a_missing_path_its_own_row(registered, use_store, tmp_path, capsys):
    """Issue 8.11: one missing path aborted the whole batch, with no CSV."""
    from fowlflow.errors import RegistryError
    from fowlflow.registry import predict

    csv = tmp_path / "out.csv"
    assert predict.main(["--model_uri", ONNX_URI, "--images", f"{TURKEY},/nope/hen.jpg",
                         "--output_csv", str(csv)]) == 0
    table = pd.read_csv(csv, keep_default_na=False)
    assert list(table["path"]) == [str(TURKEY), "/nope/hen.jpg"]
    assert table["label"][0] in {"ants", "bees"} and not table["error"][0]
    assert table["label"][1] == "" and "can't read the file" in table["error"][1]
    assert "1 of 2 images could not be read" in capsys.readouterr().out
    # Nothing readable at all: an error naming the problem, non-zero exit (see run_main).
    with pytest.raises(RegistryError, match="none of the 1 images could be read"):
        predict.main(["--model_uri", ONNX_URI, "--images", "/nope/hen.jpg"])
    with pytest.raises(RegistryError, match="no image files in ' , '"):
        predict.expand_images(" , ")


@pytest.mark.slow
def test_mlflow_run_typed_elsewhere_reads_relative_paths_from_there(registered, use_store,
                                                                    val_dir, tmp_path):
    """`mlflow run <project>` runs the entry point in the project folder; relative -P paths
    are still looked up where the command was typed (issue 8 item 8)."""
    import mlflow

    user = tmp_path / "user"
    shutil.copytree(val_dir, user / "rel" / "val")
    csv = tmp_path / "preds.csv"
    proc = mlflow_run("-e", "predict", "--experiment-name", "registry-tests", cwd=user,
                      project=ROOT, params={"model_uri": ONNX_URI, "output_csv": csv,
                                            "images": "rel/val/ants,gone.jpg"})
    table = pd.read_csv(csv, keep_default_na=False)
    ants = sorted(str(p) for p in (user / "rel" / "val" / "ants").glob("*.jpg"))
    assert list(table["path"]) == [*ants, "gone.jpg"] and len(ants) == 4
    assert all(table["label"][:4]) and "can't read the file" in table["error"][4]
    assert f"not found as {user}/gone.jpg nor {ROOT}/gone.jpg" in proc.stderr

    mlflow_run("-e", "evaluate", "--experiment-name", "registry-tests", cwd=user,
               project=ROOT, params={"model_uri": ONNX_URI, "data_dir": "rel/val"})
    client = mlflow.MlflowClient(use_store)
    (run,) = client.search_runs([client.get_experiment_by_name("registry-tests").experiment_id],
                                "params.data_dir = 'rel/val'")
    assert run.data.metrics["images"] == 8 and "accuracy" in run.data.metrics

    proc = mlflow_run("-e", "evaluate", "--experiment-name", "registry-tests", cwd=user,
                      project=ROOT, check=False,
                      params={"model_uri": ONNX_URI, "data_dir": "no/val"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (f"evaluate: data_dir 'no/val' does not exist: not found as {user}/no/val nor "
            f"{ROOT}/no/val") in proc.stderr


def test_evaluate_logs_accuracy_and_confusion_matrix_to_a_new_run(registered, use_store,
                                                                  val_dir):
    import mlflow

    from fowlflow.registry.evaluate import evaluate

    onnx = evaluate(ONNX_URI, val_dir)
    torch = evaluate(f"models:/{MODEL_NAME}/{registered.version}", val_dir)
    assert onnx["images"] == 8 and onnx["failed_images"] == 0
    cm = onnx["confusion_matrix"]
    assert sum(map(sum, cm)) == 8 and onnx["accuracy"] == (cm[0][0] + cm[1][1]) / 8
    assert torch["confusion_matrix"] == cm  # both formats agree image by image
    client = mlflow.MlflowClient(use_store)
    run = client.get_run(onnx["run_id"])
    assert run.data.metrics["accuracy"] == onnx["accuracy"]
    assert run.data.params["model_uri"] == ONNX_URI
    assert {"recall_ants", "precision_bees"} <= set(run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "confusion_matrix.json", "predictions.csv"} <= names


def test_evaluate_rejects_unknown_class_folders(registered, use_store, tmp_path):
    from fowlflow.errors import RegistryError
    from fowlflow.registry.evaluate import evaluate

    (tmp_path / "wasps").mkdir()
    with pytest.raises(RegistryError, match=r"unknown folders: \['wasps'\]"):
        evaluate(ONNX_URI, tmp_path)


def test_evaluate_matches_class_folders_stored_in_nfd_unicode(tmp_path):
    """The trainer reads class names in NFC; a val folder written in NFD (macOS, some zips)
    is the same class, not an unknown folder."""
    import unicodedata

    from fowlflow.registry.evaluate import labelled_images

    ant = hymenoptera_images(1)[0]
    for name in (unicodedata.normalize("NFD", "café"), "thé"):
        (tmp_path / name).mkdir()
        shutil.copy(ant, tmp_path / name / "a.jpg")
    paths, labels = labelled_images(tmp_path, ["café", "thé"])
    assert sorted(labels) == [0, 1] and len(paths) == 2


def test_loading_models_leaves_no_download_behind(registered, use_store, tmp_path, monkeypatch):
    """Each load of a model by ``runs:/`` URI downloads it; without a folder of our own MLflow
    left every download (~45 MB for ResNet18) in /tmp for good: 926 of them filled a CI disk."""
    import tempfile

    import mlflow

    from fowlflow.registry.classifier import load_classifier
    from fowlflow.registry.export import load_pytorch

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    client = mlflow.MlflowClient(use_store)
    torch_run = client.get_model_version(MODEL_NAME, "1").run_id
    load_pytorch(f"runs:/{torch_run}/model")
    load_classifier(f"runs:/{torch_run}/model")
    load_classifier(f"models:/{MODEL_NAME}-onnx/1")  # a local store: read in place, no copy
    # MLflow's get_model_info leaves the one small MLmodel it reads; nothing else may stay.
    left = [p for p in scratch.rglob("*") if p.is_file() and p.name != "MLmodel"]
    assert not left, f"downloads left behind: {left}"
