"""fowlflow.registry: every trained model versioned, exported to ONNX, parity-checked, servable.

    from fowlflow.registry import register_trained_model
    reg = register_trained_model(run_id=run_id, name="fowl-classifier", val_dir=Path("data/val"))
    reg.version, reg.onnx_version, reg.parity.max_abs_prob_diff

Entry points (MLproject): ``register``, ``promote``, ``predict``, ``evaluate``; see
docs/registry.md. Modules: ``image_pyfunc`` (the ONNX model's python_function flavor,
torch-free: it is copied into every ONNX model, with the decode + preprocess of
:mod:`fowlflow.data.images` it uses), ``export`` (pt2 → ONNX), ``parity``, ``card`` (tags +
model card), ``register``, ``promote``, ``classifier`` (one interface over both formats),
``predict``, ``evaluate``. The training entry point (``python -m fowlflow.train``) calls
:func:`register_trained_model` after training; the trainer itself never imports the registry.

Importing this package imports neither torch nor onnxruntime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fowlflow.registry.register import Registration

__all__ = ["register_trained_model"]


def register_trained_model(run_id: str, name: str, val_dir, **options) -> "Registration":
    """Register a training run's model; see :func:`fowlflow.registry.register.register_trained_model`."""
    from fowlflow.registry.register import register_trained_model as _register

    return _register(run_id=run_id, name=name, val_dir=val_dir, **options)
