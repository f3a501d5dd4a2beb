"""Registry fixtures: one SQLite store for the whole package, models logged per the trainer's
contract, one registered version, one `mlflow models serve` process.

The expensive things (a logged model, a registration, a server) are package-scoped so the whole
folder stays within the CI budget on a 2-core machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest

from fowlflow.registry.register import Registration

from tests.conftest import HYMENOPTERA, make_imagefolder

MODEL_NAME = "fowl-test"
IMAGE_SIZE = 32


def log_contract_model(val_acc: float = 0.75, classes=("ants", "bees"), image_size=IMAGE_SIZE,
                       seed: int = 0, experiment: str = "registry-tests") -> str:
    """Log a model exactly as the trainer does (artifact ``model``, pt2, metadata); return run id.

    A torchvision ResNet18 with random weights and a ``len(classes)``-way head: parity and
    plumbing don't need a trained model, and a 32 px input keeps export and inference fast.
    """
    import mlflow
    import numpy as np
    import torch
    import torchvision
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=len(classes)).eval()
    s = image_size
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, 3, s, s))]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, len(classes)))]))
    example = np.random.default_rng(seed).standard_normal((2, 3, s, s)).astype("float32")
    metadata = {
        "class_names": list(classes), "image_size": s, "resize_size": round(s * 256 / 224),
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "arch": "resnet18",
        "data_uri": "synthetic", "data_digest": "d1g3st", "best_val_acc": val_acc,
    }
    # By id, not mlflow.set_experiment: that leaves MLFLOW_EXPERIMENT_ID in os.environ for every
    # later test of the session (a later `mlflow run --experiment-name` then refuses both).
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_params({"data": "synthetic", "data_digest": "d1g3st"})
        mlflow.log_metric("best_val_acc", val_acc)
        mlflow.pytorch.log_model(model, name="model", serialization_format="pt2",
                                 signature=signature, input_example=example, metadata=metadata,
                                 pip_requirements=["torch", "torchvision"])
    return run.info.run_id


@pytest.fixture(scope="package")
def store(tmp_path_factory) -> str:
    """A SQLite tracking + registry store shared by the registry tests."""
    import mlflow

    root = tmp_path_factory.mktemp("registry-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri  # for the code under test and its subprocesses
    # A SQLite store puts each new experiment's artifacts under ./mlruns of the process that
    # creates it: create this package's experiments here, not in the repository.
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for name in ("registry-tests", "params-tests"):
            mlflow.MlflowClient(uri).create_experiment(name)
    finally:
        os.chdir(cwd)
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture
def use_store(store, monkeypatch) -> str:
    """Point the code under test at the package store (by ``MLFLOW_TRACKING_URI``, which other
    areas' fixtures change); tests name it explicitly: ``MlflowClient(use_store)``."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    # MLflow's module-level URI wins over the variable: one left set must not win here.
    monkeypatch.setattr(utils, "_tracking_uri", None)
    return store


@pytest.fixture(scope="package")
def val_dir(tmp_path_factory) -> Path:
    """A tiny synthetic ImageFolder's val/ (parity images for the contract models)."""
    return make_imagefolder(tmp_path_factory.mktemp("imgs"), per_class=(1, 4)) / "val"


@dataclass(frozen=True)
class Registered(Registration):
    """A registration plus each model's aliases right after it (later tests move them)."""

    aliases: dict = field(default_factory=dict)


@pytest.fixture(scope="package")
def registered(store, val_dir) -> Registered:
    """One model registered as ``fowl-test`` / ``fowl-test-onnx`` (val acc 0.75)."""
    import mlflow

    from fowlflow.registry import register_trained_model

    run_id = log_contract_model(val_acc=0.75)
    reg = register_trained_model(run_id=run_id, name=MODEL_NAME, val_dir=val_dir)
    client = mlflow.MlflowClient(store)
    aliases = {n: {a: str(v) for a, v in client.get_registered_model(n).aliases.items()}
               for n in (reg.name, reg.onnx_name)}
    return Registered(*(getattr(reg, f.name) for f in fields(Registration)), aliases=aliases)


def hymenoptera_images(n_per_class: int = 2) -> list[Path]:
    """A few real photos from the shared hymenoptera val set (read in place)."""
    out = []
    for cls in ("ants", "bees"):
        out += sorted((HYMENOPTERA / "val" / cls).glob("*.jpg"))[:n_per_class]
    return out
