"""Load a logged PyTorch model and export it to ONNX with preprocessing and softmax built in.

    module, metadata = load_pytorch("runs:/<run_id>/model")
    classifier = PixelClassifier(module, Preprocessing.from_metadata(metadata))
    export_onnx(classifier, Path("model.onnx"), opset=DEFAULT_OPSET)

The trainer logs models in MLflow's ``pt2`` format (``torch.export``), whose input is the
normalized float batch. :class:`PixelClassifier` wraps that module so the exported graph takes
what any client has after decoding, resizing and cropping: raw RGB bytes, uint8
``pixels[N, S, S, 3]``; it outputs ``logits[N, C]`` and ``probabilities[N, C]`` (float32).
The export is ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter, since
the loaded model *is* an exported program) with a dynamic batch dimension.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import torch

from fowlflow.data.images import Preprocessing
from fowlflow.errors import RegistryError
from fowlflow.registry.image_pyfunc import INPUT_NAME, OUTPUT_NAMES

logger = logging.getLogger(__name__)

# The opset torch 2.14's exporter emits natively (no version conversion pass).
DEFAULT_OPSET = 20


def load_pytorch(model_uri: str):
    """The logged PyTorch model (eval mode) and its MLflow metadata.

    Args:
        model_uri: ``runs:/<id>/model``, ``models:/<name>/<version>``, ``models:/<name>@alias``…

    Returns:
        ``(module, metadata)``: an ``nn.Module`` mapping normalized float32 ``(N, 3, S, S)``
        to logits ``(N, C)``, and the MLmodel ``metadata`` dict.

    Raises:
        RegistryError: the URI has no PyTorch model or its metadata lacks class names.
    """
    import mlflow

    try:
        info = mlflow.models.get_model_info(model_uri)
    except Exception as exc:
        raise RegistryError(f"can't read the model at {model_uri!r}: {exc}; give a "
                            "runs:/<run_id>/model or models:/<name>/<version> URI") from exc
    if "pytorch" not in info.flavors:
        raise RegistryError(f"{model_uri!r} has flavors {sorted(info.flavors)}, not 'pytorch'; "
                            "give the trainer's PyTorch model (runs:/<run_id>/model)")
    metadata = dict(info.metadata or {})
    if not metadata.get("class_names"):
        raise RegistryError(f"{model_uri!r} has no 'class_names' in its MLmodel metadata; "
                            "log it with fowlflow's trainer (see docs/registry.md)")
    # Into a folder of our own: without dst_path MLflow leaves each download in /tmp for good.
    with tempfile.TemporaryDirectory(prefix="fowlflow-model-") as tmp:
        module = mlflow.pytorch.load_model(model_uri, dst_path=tmp, map_location="cpu")
    try:
        module.eval()
    except NotImplementedError:  # an ExportedProgram's module: traced in eval mode already
        pass
    return module, metadata


class PixelClassifier(torch.nn.Module):
    """uint8 RGB pixels ``(N, S, S, 3)`` → (logits, probabilities), both ``(N, C)``.

    Its normalization is the one definition of ``(x / 255 - mean) / std`` for both formats:
    the PyTorch reference in parity checks runs this module, and the ONNX graph is its export.
    """

    def __init__(self, model, prep: Preprocessing):
        super().__init__()
        self.model = model
        # Fold /255 into mean and std: one subtract and one divide in the graph.
        self.register_buffer("shift", torch.tensor(prep.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("scale", torch.tensor(prep.std).view(1, 3, 1, 1) * 255.0)
        # Inference only. Not self.eval(): it recurses into the loaded model, and an exported
        # program's module refuses train()/eval() (it was traced in eval mode).
        self.training = False

    def forward(self, pixels):
        x = pixels.permute(0, 3, 1, 2).to(torch.float32)
        logits = self.model((x - self.shift) / self.scale)
        return logits, torch.softmax(logits, dim=1)


def export_onnx(classifier, path: Path, prep: Preprocessing, *, opset: int = DEFAULT_OPSET,
                example_batch: int = 2):
    """Export a :class:`PixelClassifier` to ONNX with a dynamic batch dimension.

    Args:
        classifier: the wrapped model.
        path: where to write the ``.onnx`` file.
        prep: its preprocessing (for the example input's size).
        opset: ONNX opset version.
        example_batch: batch size of the tracing example (>1 so the batch stays symbolic).

    Returns:
        The loaded ``onnx.ModelProto``, checked with ``onnx.checker``.

    Raises:
        RegistryError: the exporter failed (its message is included).
    """
    import onnx

    s = prep.image_size
    example = torch.zeros((example_batch, s, s, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    # The exporter's optimizer logs every pass at INFO; keep the caller's log readable.
    for noisy in ("onnxscript", "onnx_ir"):
        if logging.getLogger(noisy).level == logging.NOTSET:
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        program = torch.onnx.export(
            classifier, (example,), dynamo=True, opset_version=opset, verbose=False,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_shapes={INPUT_NAME: {0: batch}},
        )
        program.save(str(path))
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        detail = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(exc).__name__}: {exc}")  # no colours
        if len(detail) > 1500:
            detail = detail[:1500] + " ..."
        raise RegistryError(
            f"exporting the model to ONNX (opset {opset}) failed: {detail}. Fix: a model logged "
            "with a batch-1 input_example has a static batch size (log it with a batch of 2 or "
            "more); otherwise try another -P opset=... or report the model's arch") from exc
    logger.info("exported ONNX opset %d to %s (%.1f MB)", opset, path,
                path.stat().st_size / 1e6)
    return proto

