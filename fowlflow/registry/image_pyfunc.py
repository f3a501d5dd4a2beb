"""The python_function flavor of fowlflow's ONNX models: images in, label and probabilities out.

    model = mlflow.pyfunc.load_model("models:/fowl-classifier-onnx@champion")
    model.predict(["turkey.jpg", "ant.jpg"])          # paths, bytes, base64 text, PIL images
    #    label     score  probabilities
    # 0  turkey    0.97   {'chicken': 0.02, 'turkey': 0.97, ...}

An ONNX model logged by :func:`save_model` has two flavors: ``onnx`` (MLflow's: the graph,
for any language and for ``mlflow.onnx.load_model``) and ``python_function``, whose loader is
this module instead of ``mlflow.onnx``. The loader decodes and preprocesses images with
``fowlflow.registry.images.preprocess`` (the same function parity checks use) and runs the
graph, whose input is raw RGB pixels (uint8 ``[N, S, S, 3]``) with normalization built in.
This module and ``images.py`` import no torch and are copied into the model's ``code/``
folder, so ``mlflow models serve`` needs only mlflow, onnxruntime, numpy, pandas and Pillow.
Inside the scoring server, str inputs are read as base64 only (never as server-side paths),
and an undecodable image raises :class:`~fowlflow.registry.images.ImageDecodeError`, which
the server answers with HTTP 400 and keeps serving.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fowlflow.registry.images import ImageDecodeError, Preprocessing, preprocess_batch

logger = logging.getLogger(__name__)

INPUT_NAME = "pixels"
OUTPUT_NAMES = ("logits", "probabilities")
_CHUNK = 64  # images per onnxruntime call: bounds memory for large predict() batches
# The files a served model imports; everything else in fowlflow may need torch.
_CODE_FILES = ("__init__.py", "errors.py", "registry/__init__.py", "registry/images.py",
               "registry/image_pyfunc.py")


class OnnxImageClassifier:
    """An onnxruntime session plus the class names and preprocessing it was trained with."""

    def __init__(self, onnx_path: str | os.PathLike, metadata: dict[str, Any]):
        import onnxruntime as ort

        self.class_names = [str(c) for c in metadata["class_names"]]
        self.prep = Preprocessing.from_metadata(metadata)
        wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
        providers = [p for p in wanted if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(onnx_path), providers=providers)

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, C)`` for uint8 RGB pixels ``(N, S, S, 3)``."""
        parts = [self.session.run(["probabilities"], {INPUT_NAME: pixels[i:i + _CHUNK]})[0]
                 for i in range(0, len(pixels), _CHUNK)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.class_names)),
                                                            dtype=np.float32)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        """Classify images.

        Args:
            model_input: one image or a batch: a path, encoded bytes, base64 text, a PIL image,
                a list of those, or a DataFrame whose ``image`` (or only) column holds them.
            params: unused.

        Returns:
            A DataFrame with one row per image: ``label``, ``score`` (its probability) and
            ``probabilities`` (a dict class name → probability).

        Raises:
            ImageDecodeError: an item is not a readable image (HTTP 400 when served).
        """
        sources = _as_sources(model_input)
        pixels = preprocess_batch(sources, self.prep, allow_paths=not _in_scoring_server())
        return results_frame(self.predict_pixels(pixels), self.class_names)


def _in_scoring_server() -> bool:
    # MLflow's scoring server sets this (internal) variable at start-up. Should MLflow rename
    # it, requests could name server paths again: tests/registry/test_serve.py checks they can't.
    return os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() in ("true", "1")


def results_frame(probs: np.ndarray, class_names: list[str]):
    """The pyfunc output for a probability matrix: label, score, probabilities per row."""
    import pandas as pd

    top = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    return pd.DataFrame({
        "label": [class_names[i] for i in top],
        "score": [float(p[i]) for p, i in zip(probs, top)],
        "probabilities": [{c: float(v) for c, v in zip(class_names, p)} for p in probs],
    })


def _as_sources(model_input: Any) -> list:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] == 0:
            raise ImageDecodeError("the input DataFrame has no columns; put the images in a "
                                   "column named 'image'")
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, dict):
        if "image" not in model_input:
            raise ImageDecodeError(f"the input dict has keys {sorted(model_input)}; put the "
                                   "images under 'image'")
        return _as_sources(model_input["image"])
    if isinstance(model_input, np.ndarray):
        return list(model_input.ravel()) if model_input.dtype.kind in "OSUV" else [model_input]
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    return [model_input]


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None):
    """Called by ``mlflow.pyfunc.load_model``; ``data_path`` is the model's ``.onnx`` file."""
    from mlflow.models import Model

    root = Path(data_path).parent
    metadata = Model.load(str(root / "MLmodel")).metadata or {}
    return OnnxImageClassifier(data_path, metadata)


def save_model(onnx_model, path: str, mlflow_model=None, **kwargs) -> None:
    """Save with ``mlflow.onnx.save_model``, then point ``python_function`` at this module.

    Used as a flavor module by ``mlflow.models.Model.log(flavor=image_pyfunc, ...)``: the
    ``onnx`` flavor, signature, input example, metadata and requirements are MLflow's own;
    only the pyfunc loader differs, and its code travels in the model's ``code/`` folder.
    """
    import mlflow.onnx
    from mlflow.models import Model
    from mlflow.pyfunc import FLAVOR_NAME as PYFUNC

    mlflow_model = mlflow_model if mlflow_model is not None else Model()
    with tempfile.TemporaryDirectory() as tmp:
        code = _stage_code(Path(tmp))
        mlflow.onnx.save_model(onnx_model, path, mlflow_model=mlflow_model, code_paths=[code],
                               save_as_external_data=False, **kwargs)
    mlflow_model.flavors[PYFUNC]["loader_module"] = __name__
    mlflow_model.save(os.path.join(path, "MLmodel"))


def _stage_code(tmp: Path) -> str:
    import fowlflow

    src = Path(fowlflow.__file__).parent
    dst = tmp / "fowlflow"
    for rel in _CODE_FILES:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)
    return str(dst)


def pip_requirements() -> list[str]:
    """What serving this model needs: no torch."""
    from importlib.metadata import version

    return [f"mlflow=={version('mlflow')}", f"onnx=={version('onnx')}",
            f"onnxruntime=={version('onnxruntime')}", f"pillow=={version('pillow')}",
            f"numpy=={version('numpy')}", f"pandas=={version('pandas')}"]
