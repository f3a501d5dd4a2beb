"""What every model version carries: tags a reviewer can filter on, and a short model card.

    tags = version_tags(facts, fmt="pytorch", paired="fowl-classifier-onnx/3")
    client.update_model_version(name, version, description=model_card(facts, "pytorch", ...))

Pure functions over a :class:`VersionFacts`, so the registry shows the same facts for the
PyTorch and the ONNX version of one training run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fowlflow.data.images import Preprocessing
from fowlflow.registry.parity import ParityReport

_MAX_TAG = 4000  # below MLflow's smallest tag value limit (5000 for model version tags)

# Tags that say which version of the other format belongs to this one.
PAIRED_ONNX = "onnx_model"
PAIRED_PYTORCH = "pytorch_model"


@dataclass(frozen=True)
class VersionFacts:
    """Everything known about one trained model at registration time."""

    source_run_id: str
    model_uri: str
    class_names: list[str]
    prep: Preprocessing
    val_acc: float | None
    parity: ParityReport
    metadata: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)  # torch, onnx, onnxruntime, opset


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_TAG else text[:_MAX_TAG - 40] + f"... ({len(text)} chars)"


def version_tags(facts: VersionFacts, fmt: str, paired: str | None = None) -> dict[str, str]:
    """Tags for the ``fmt`` ("pytorch" or "onnx") version; ``paired`` is "name/version"."""
    md = facts.metadata
    tags = {
        "format": fmt,
        "source_run_id": facts.source_run_id,
        "source_model_uri": facts.model_uri,
        "val_acc": "" if facts.val_acc is None else f"{facts.val_acc:.4f}",
        "class_names": _clip(json.dumps(facts.class_names)),
        "num_classes": str(len(facts.class_names)),
        "image_size": str(facts.prep.image_size),
        "resize_size": str(facts.prep.resize_size),
        "mean": json.dumps(list(facts.prep.mean)),
        "std": json.dumps(list(facts.prep.std)),
        "arch": str(md.get("arch", "")),
        "data_uri": _clip(str(md.get("data_uri", ""))),
        "data_digest": str(md.get("data_digest", "")),
        **{f"{k}_version" if k != "opset" else "onnx_opset": v
           for k, v in facts.versions.items()},
        **facts.parity.as_tags(),
    }
    if fmt == "onnx":
        tags["onnx_input"] = "pixels: uint8 [N, image_size, image_size, 3] RGB"
        tags["onnx_outputs"] = "logits, probabilities: float32 [N, num_classes]"
    if paired:
        tags[PAIRED_ONNX if fmt == "pytorch" else PAIRED_PYTORCH] = paired
    return tags


def model_card(facts: VersionFacts, fmt: str, paired: str | None = None) -> str:
    """A short markdown model card for the version's description."""
    p, md = facts.prep, facts.metadata
    acc = "unknown" if facts.val_acc is None else f"{facts.val_acc:.4f}"
    classes = ", ".join(facts.class_names[:20]) + (" …" if len(facts.class_names) > 20 else "")
    lines = [
        f"**{md.get('arch', 'image')} classifier** ({fmt}), {len(facts.class_names)} classes: "
        f"{classes}.",
        "",
        f"- Source run: `{facts.source_run_id}` (`{facts.model_uri}`)",
        f"- Validation accuracy: {acc}",
        f"- Data: `{md.get('data_uri', '?')}` (digest `{md.get('data_digest', '?')}`)",
        f"- Preprocessing: RGB, resize shorter side to {p.resize_size} (bilinear), center crop "
        f"{p.image_size}, scale to [0, 1], normalize mean {list(p.mean)} std {list(p.std)}",
        f"- ONNX parity: {facts.parity.summary()}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in facts.versions.items()),
    ]
    if fmt == "onnx":
        lines += [
            "- Inputs: `pixels` uint8 [N, S, S, 3] RGB after resize + center crop "
            "(normalization is inside the graph); outputs `logits`, `probabilities` "
            "float32 [N, classes] in `class_names` order",
            "- Python / REST: `mlflow.pyfunc.load_model(uri).predict([path_or_bytes, ...])` → "
            "label, score, probabilities",
        ]
    else:
        lines.append("- Input: normalized float32 [N, 3, S, S]; output: logits [N, classes]")
    if paired:
        lines.append(f"- Paired {'ONNX' if fmt == 'pytorch' else 'PyTorch'} version: `{paired}`")
    return "\n".join(lines)
