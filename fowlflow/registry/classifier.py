"""One interface over both registered formats, for the predict and evaluate entry points.

    clf = load_classifier("models:/fowl-classifier-onnx@champion")   # or the PyTorch model
    probs = clf.predict_pixels(np.stack([preprocess(p, clf.prep) for p in paths]))   # (N, C)
    clf.class_names

ONNX models (``onnx`` flavor) run in onnxruntime through the image pyfunc's
:class:`~fowlflow.registry.image_pyfunc.OnnxImageClassifier`; PyTorch models run eagerly
through :class:`~fowlflow.registry.export.PixelClassifier`, so both take the same uint8 pixels.
"""

from __future__ import annotations

import tempfile

from pathlib import Path
from typing import Protocol

import numpy as np

from fowlflow.data.images import Preprocessing
from fowlflow.errors import RegistryError


class Classifier(Protocol):
    class_names: list[str]
    prep: Preprocessing

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray: ...


class TorchClassifier:
    """A logged PyTorch model behind the same interface as the ONNX one."""

    def __init__(self, model_uri: str):
        from fowlflow.registry.export import PixelClassifier, load_pytorch

        module, metadata = load_pytorch(model_uri)
        self.class_names = [str(c) for c in metadata["class_names"]]
        self.prep = Preprocessing.from_metadata(metadata)
        self.module = PixelClassifier(module, self.prep)

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        from fowlflow.registry.parity import torch_probabilities

        if not len(pixels):
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return torch_probabilities(self.module, pixels)


def load_classifier(model_uri: str) -> Classifier:
    """Load a fowlflow model (ONNX or PyTorch) by URI.

    Raises:
        RegistryError: the URI can't be resolved or holds neither flavor.
    """
    import mlflow

    try:
        info = mlflow.models.get_model_info(model_uri)
    except Exception as exc:
        raise RegistryError(f"can't load {model_uri!r}: {exc}; give e.g. "
                            "models:/fowl-classifier-onnx@champion or runs:/<id>/model") from exc
    if "onnx" in info.flavors:
        from fowlflow.registry.image_pyfunc import OnnxImageClassifier

        # The session reads the graph at once; the download goes with the folder.
        with tempfile.TemporaryDirectory(prefix="fowlflow-model-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
            return OnnxImageClassifier(local / info.flavors["onnx"]["data"], info.metadata or {})
    if "pytorch" in info.flavors:
        return TorchClassifier(model_uri)
    raise RegistryError(f"{model_uri!r} has flavors {sorted(info.flavors)}; fowlflow predicts "
                        "with its own 'onnx' or 'pytorch' models")
