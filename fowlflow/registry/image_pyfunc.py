"""The python_function flavor of fowlflow's ONNX models: images in, label and probabilities out.

    model = mlflow.pyfunc.load_model("models:/fowl-classifier-onnx@champion")
    model.predict(["turkey.jpg", "notes.txt"])        # paths, bytes, base64 text, PIL images
    #     label  score  probabilities                          error
    # 0  turkey   0.97  {'chicken': 0.03, 'turkey': 0.97}     None
    # 1    None   None  None                                   item 1: 'notes.txt' is not ...

An ONNX model logged by :func:`save_model` has two flavors: ``onnx`` (MLflow's: the graph,
for any language and for ``mlflow.onnx.load_model``) and ``python_function``, whose loader is
this module instead of ``mlflow.onnx``. The loader decodes and preprocesses images with
``fowlflow.data.images.preprocess`` (the same function parity checks use) and runs the
graph, whose input is raw RGB pixels (uint8 ``[N, S, S, 3]``) with normalization built in.
This module and ``fowlflow/data/images.py`` import no torch and are copied, with the package
files they need (``_CODE_FILES``), into the model's ``code/`` folder, so ``mlflow models
serve`` needs only mlflow, onnxruntime, numpy, pandas and Pillow.
Inside the scoring server, str inputs are read as base64 only (never as server-side paths).
Results are per item: an input that is not a readable image gets a row with ``error`` set
(and no label) while the others are classified, so one bad photo never fails a batch, and the
server answers HTTP 200 with one entry per input (none for an empty input).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fowlflow.data.images import ImageDecodeError, Preprocessing, preprocess

logger = logging.getLogger(__name__)

INPUT_NAME = "pixels"
OUTPUT_NAMES = ("logits", "probabilities")
# What predict() takes; the model's signature declares the outputs only (see register.py).
PYFUNC_INPUT = ("images, one per row: a list, or a DataFrame column 'image' (or its only column); "
                "each base64-encoded image bytes, and in Python also a path, bytes or a PIL image")
_CHUNK = 64  # images per onnxruntime call: bounds memory for large predict() batches
# The files a served model imports; everything else in fowlflow may need torch.
_CODE_FILES = ("__init__.py", "errors.py", "data/__init__.py", "data/images.py",
               "registry/__init__.py", "registry/image_pyfunc.py")


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
        """Classify images, each on its own: a bad item gets an error, the others a label.

        Args:
            model_input: one image or a batch: a path, encoded bytes, base64 text, a PIL image,
                a list of those, or a DataFrame whose ``image`` (or only) column holds them.
            params: unused.

        Returns:
            A DataFrame with one row per input, in order: ``label``, ``score`` (its
            probability), ``probabilities`` (a dict class name → probability) and ``error``
            (None; for an input that is not a readable image: the reason, starting
            ``item <i>:``, with ``label``, ``score`` and ``probabilities`` None).
        """
        serving = _in_scoring_server()
        try:
            sources = _as_sources(model_input)
        except ImageDecodeError as exc:  # the request as a whole has no images
            if serving:  # MLflow answers an MlflowException with the whole request echoed
                raise ValueError(exc.message) from None
            raise
        pixels, errors = decode_each(sources, self.prep, allow_paths=not serving)
        return results_frame(self.predict_pixels(pixels), self.class_names, errors)


def _in_scoring_server() -> bool:
    # MLflow's scoring server sets this (internal) variable at start-up. Should MLflow rename
    # it, requests could name server paths again: tests/registry/test_serve.py checks they can't.
    return os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() in ("true", "1")


def decode_each(sources: list, prep: Preprocessing, *, allow_paths: bool = True
                ) -> tuple[np.ndarray, dict[int, str]]:
    """Preprocess every source on its own: pixels of the readable ones, errors of the others.

    Returns:
        uint8 pixels ``(n_ok, S, S, 3)`` in input order, and ``{index: message}`` for the
        inputs that are not readable images.
    """
    pixels, errors = [], {}
    for i, src in enumerate(sources):
        try:
            pixels.append(preprocess(src, prep, allow_paths=allow_paths))
        except ImageDecodeError as exc:
            errors[i] = exc.message
    shape = (0, prep.image_size, prep.image_size, 3)
    return (np.stack(pixels) if pixels else np.zeros(shape, dtype=np.uint8)), errors


def results_frame(probs: np.ndarray, class_names: list[str], errors: dict[int, str] | None = None):
    """The pyfunc output: one row per input; ``probs`` holds the rows without an error."""
    import pandas as pd

    errors = errors or {}
    rows, ok = [], iter(probs)
    for i in range(len(probs) + len(errors)):
        if i in errors:
            rows.append((None, None, None, f"item {i}: {errors[i]}"))
            continue
        p = next(ok)
        top = int(p.argmax())
        rows.append((class_names[top], float(p[top]),
                     {c: float(v) for c, v in zip(class_names, p)}, None))
    # object columns: a failed item's score is None (JSON null), never NaN
    return pd.DataFrame(rows, columns=["label", "score", "probabilities", "error"], dtype=object)


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
    if isinstance(model_input, np.ndarray):  # the server's parse of {"inputs": [...]}
        if model_input.size == 0:
            return []
        return [x.item() if isinstance(x, np.generic) else x for x in model_input.ravel()] \
            if model_input.dtype.kind in "OSUV" else [model_input]
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
