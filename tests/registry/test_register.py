"""Registration against a real SQLite registry: versions, model cards, ONNX, parity, pyfunc."""

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import pytest

from fowlflow.errors import RegistryError
from tests.conftest import TURKEY
from tests.registry.conftest import MODEL_NAME, hymenoptera_images

ONNX_NAME = MODEL_NAME + "-onnx"


def test_both_versions_carry_the_model_card_and_point_at_each_other(registered, use_store):
    import mlflow

    client = mlflow.MlflowClient(use_store)
    assert registered.parity.passed and registered.parity.max_abs_prob_diff <= 1e-4
    torch_mv = client.get_model_version(MODEL_NAME, registered.version)
    onnx_mv = client.get_model_version(ONNX_NAME, registered.onnx_version)
    assert torch_mv.tags["onnx_model"] == f"{ONNX_NAME}/{registered.onnx_version}"
    assert onnx_mv.tags["pytorch_model"] == f"{MODEL_NAME}/{registered.version}"
    for mv, fmt in ((torch_mv, "pytorch"), (onnx_mv, "onnx")):
        t = mv.tags
        assert t["format"] == fmt and t["val_acc"] == "0.7500"
        assert json.loads(t["class_names"]) == ["ants", "bees"]
        assert (t["image_size"], t["resize_size"]) == ("32", "37")
        assert json.loads(t["mean"]) == [0.485, 0.456, 0.406]
        assert t["data_digest"] == "d1g3st" and t["source_run_id"] == mv.run_id
        assert t["parity_passed"] == "true" and t["parity_top1_agreement"] == "1.000000"
        assert float(t["parity_max_abs_prob_diff"]) <= 1e-4
        assert {"torch_version", "onnx_version", "onnxruntime_version"} <= set(t)
        assert int(t["onnx_opset"]) >= 18
        assert "Validation accuracy: 0.7500" in mv.description and "parity passed" in mv.description
        assert registered.aliases[mv.name] == {"candidate": str(mv.version)}
    # The parity figures are also in the training run.
    run = client.get_run(torch_mv.run_id)
    assert run.data.metrics["parity_top1_agreement"] == 1.0
    assert run.data.metrics["parity_max_abs_prob_diff"] <= 1e-4
    report = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/registry/parity.json")
    assert report["passed"] and len(report["images"]) == 8


def test_onnx_model_is_plain_onnx_for_other_languages(registered, use_store):
    import mlflow.onnx
    import onnxruntime as ort

    uri = f"models:/{ONNX_NAME}/{registered.onnx_version}"
    info = mlflow.models.get_model_info(uri)
    assert {"onnx", "python_function"} <= set(info.flavors)
    assert info.flavors["python_function"]["loader_module"] == "fowlflow.registry.image_pyfunc"
    proto = mlflow.onnx.load_model(uri)
    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "pixels" and dims[1:] == [32, 32, 3] and isinstance(dims[0], str)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (1, 3):  # dynamic batch
        pixels = np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        logits, probs = session.run(None, {"pixels": pixels})
        assert logits.shape == probs.shape == (n, 2)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def test_pyfunc_takes_paths_bytes_base64_and_batches(registered, use_store):
    import mlflow

    from fowlflow.registry.classifier import TorchClassifier
    from fowlflow.data.images import preprocess

    model = mlflow.pyfunc.load_model(f"models:/{ONNX_NAME}/{registered.onnx_version}")
    photos = [TURKEY, *hymenoptera_images(2)]
    batch = model.predict([str(p) for p in photos])
    assert list(batch.columns) == ["label", "score", "probabilities", "error"] and len(batch) == 5
    assert batch["error"].isna().all()
    assert set(batch["label"]) <= {"ants", "bees"}
    probs = np.array([[r["ants"], r["bees"]] for r in batch["probabilities"]])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batch["score"].astype(float), probs.max(1))
    # One image as bytes, as base64 text, in a DataFrame column: the same answer.
    raw = TURKEY.read_bytes()
    for single in (raw, base64.b64encode(raw).decode(), pd.DataFrame({"image": [raw]})):
        out = model.predict(single)
        assert len(out) == 1 and out["probabilities"][0] == batch["probabilities"][0]
    # Same images through the PyTorch version: same probabilities (parity, on photos).
    torch_clf = TorchClassifier(f"models:/{MODEL_NAME}/{registered.version}")
    expected = torch_clf.predict_pixels(np.stack([preprocess(p, torch_clf.prep) for p in photos]))
    np.testing.assert_allclose(probs, expected, atol=1e-4)


def test_pyfunc_answers_per_item_so_one_bad_image_does_not_fail_the_batch(registered, use_store):
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{ONNX_NAME}/{registered.onnx_version}")
    out = model.predict([TURKEY.read_bytes(), b"GIF89a but not really", str(TURKEY)])
    assert len(out) == 3
    assert out["label"][0] in {"ants", "bees"} and out["error"][0] is None
    assert out["label"][1] is None and out["score"][1] is None
    assert out["error"][1].startswith("item 1: ") and "is not a readable image" in out["error"][1]
    assert out["probabilities"][2] == out["probabilities"][0]
    empty = model.predict([])
    assert len(empty) == 0 and list(empty.columns) == list(out.columns)


def test_registering_the_same_model_again_reuses_its_versions(registered, use_store, val_dir,
                                                              capsys):
    """Issue 8.12: the same run registered twice gave identical new versions."""
    import mlflow

    from fowlflow.registry import register_trained_model
    from fowlflow.registry.register import main

    client = mlflow.MlflowClient(use_store)
    run_id = client.get_model_version(MODEL_NAME, registered.version).run_id
    before = {n: len(client.search_model_versions(f"name='{n}'")) for n in (MODEL_NAME, ONNX_NAME)}
    aliases = {n: dict(client.get_registered_model(n).aliases) for n in (MODEL_NAME, ONNX_NAME)}
    again = register_trained_model(run_id=run_id, name=MODEL_NAME, val_dir=val_dir)
    assert again.reused and (again.version, again.onnx_version) == (registered.version,
                                                                    registered.onnx_version)
    assert again.parity.as_tags() == registered.parity.as_tags()
    # The entry point's module, with the model named by its run id: the same, and says so.
    assert main(["--model_uri", run_id, "--name", MODEL_NAME]) == 0
    out = capsys.readouterr().out
    assert (f"already registered: runs:/{run_id}/model is {MODEL_NAME} version "
            f"{registered.version} and {ONNX_NAME} version {registered.onnx_version}; nothing "
            "new registered") in out
    after = {n: len(client.search_model_versions(f"name='{n}'")) for n in (MODEL_NAME, ONNX_NAME)}
    assert after == before
    assert {n: dict(client.get_registered_model(n).aliases) for n in after} == aliases


def test_parity_failure_refuses_the_onnx_model(registered, use_store, val_dir, monkeypatch):
    """A deliberately perturbed ONNX graph: registration must refuse it and say why."""
    import mlflow
    import onnx
    from onnx import numpy_helper

    import fowlflow.registry.export as export

    real_export = export.export_onnx

    def perturbed_export(classifier, path, prep, **kw):
        proto = real_export(classifier, path, prep, **kw)
        # Shift the last Gemm's bias (the classifier head): logits change, probabilities too.
        head = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
        init = {i.name: i for i in proto.graph.initializer}[head.input[2]]
        bias = numpy_helper.to_array(init).copy()
        bias[0] += 3.0
        init.CopyFrom(numpy_helper.from_array(bias, init.name))
        onnx.save(proto, str(path))
        return proto

    monkeypatch.setattr(export, "export_onnx", perturbed_export)
    client = mlflow.MlflowClient(use_store)
    run_id = client.get_model_version(MODEL_NAME, registered.version).run_id
    with pytest.raises(RegistryError) as err:
        from fowlflow.registry import register_trained_model

        register_trained_model(run_id=run_id, name="fowl-perturbed", val_dir=val_dir)
    msg = err.value.message
    assert "parity FAILED" in msg and "nothing was registered under 'fowl-perturbed-onnx'" in msg
    mv = client.get_model_version("fowl-perturbed", "1")
    assert mv.tags["parity_passed"] == "false" and mv.tags["onnx_model"] == "none: parity failed"
    assert float(mv.tags["parity_max_abs_prob_diff"]) > 1e-4
    assert not client.search_model_versions("name='fowl-perturbed-onnx'")
    assert not client.get_registered_model("fowl-perturbed").aliases  # not a candidate


def test_export_failure_still_registers_the_pytorch_model_unpromotable(registered, use_store,
                                                                       val_dir, monkeypatch):
    import mlflow

    import fowlflow.registry.export as export

    def failing_export(*args, **kwargs):
        raise RegistryError("exporting the model to ONNX (opset 20) failed: Unsupported op")

    monkeypatch.setattr(export, "export_onnx", failing_export)
    client = mlflow.MlflowClient(use_store)
    run_id = client.get_model_version(MODEL_NAME, registered.version).run_id
    from fowlflow.registry import register_trained_model

    with pytest.raises(RegistryError, match="fowl-noexport version 1 is registered, but "
                                            "exporting the model to ONNX"):
        register_trained_model(run_id=run_id, name="fowl-noexport", val_dir=val_dir)
    mv = client.get_model_version("fowl-noexport", "1")
    assert mv.tags["parity_passed"] == "false" and mv.tags["onnx_model"] == "none: export failed"
    assert "parity not checked: exporting the model to ONNX" in mv.description


def test_a_model_without_fowlflow_metadata_is_refused(use_store, val_dir):
    import mlflow
    import torch

    from fowlflow.registry.register import register_model_uri

    with mlflow.start_run():
        info = mlflow.pytorch.log_model(torch.nn.Linear(2, 2), name="model",
                                        serialization_format="pickle",
                                        pip_requirements=["torch"])
    with pytest.raises(RegistryError, match="no 'class_names' in its MLmodel metadata"):
        register_model_uri(info.model_uri, "fowl-plain", val_dir)


def test_downloaded_onnx_model_is_self_contained_and_torch_free(registered, use_store,
                                                                 tmp_path):
    """The one-liner download works, and the model runs from its own code/ without torch."""
    import os
    import subprocess
    import sys

    from tests.conftest import BIN

    env = {**os.environ, "MLFLOW_TRACKING_URI": use_store}
    subprocess.run([str(BIN / "mlflow"), "artifacts", "download", "-u",
                    f"models:/{ONNX_NAME}/{registered.onnx_version}", "-d", str(tmp_path / "m")],
                   env=env, check=True, capture_output=True, timeout=120)
    code = ("import sys, mlflow; m = mlflow.pyfunc.load_model(sys.argv[1]); "
            "out = m.predict([sys.argv[2]]); "
            "import fowlflow.registry.image_pyfunc as f; "
            "print(f.__file__, 'torch' in sys.modules, out['label'][0])")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), str(TURKEY)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    module_file, torch_loaded, label = proc.stdout.split()
    assert module_file.startswith(str(tmp_path / "m" / "code" / "fowlflow"))
    assert torch_loaded == "False" and label in {"ants", "bees"}


def test_val_dir_defaults_to_the_training_data(tmp_path, monkeypatch):
    from fowlflow.data.images import list_images
    from fowlflow.registry.register import training_val_dir

    monkeypatch.setenv("FOWLFLOW_CACHE_DIR", str(tmp_path))
    with training_val_dir({"data_uri": "synthetic"}, "runs:/x/model") as val:
        assert val.name == "val" and list_images(val)
    with pytest.raises(RegistryError, match="no data_uri in its metadata"):
        with training_val_dir({}, "runs:/x/model"):
            pass


def test_a_relative_val_dir_follows_the_one_rule_for_local_paths(registered, use_store,
                                                                 tmp_path, monkeypatch):
    """val_dir is looked up like -P data= (fowlflow.local_paths); the error names where."""
    import mlflow

    from fowlflow.registry.register import register_model_uri

    monkeypatch.chdir(tmp_path)  # outside `mlflow run`, the process's folder is the user's
    client = mlflow.MlflowClient(use_store)
    source = client.get_model_version(MODEL_NAME, registered.version).run_id
    with pytest.raises(RegistryError, match=f"register: val_dir 'no/val' does not exist: "
                                            f"not found as {tmp_path}/no/val"):
        register_model_uri(f"runs:/{source}/model", "fowl-test-relative", "no/val")
