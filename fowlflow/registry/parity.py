"""Does the ONNX graph answer like the PyTorch model? Checked on real validation images.

    pixels, paths = load_parity_images(Path("data/val"), prep, max_images=128)
    report = check_parity(PixelClassifier(module, prep), Path("model.onnx"), pixels, atol=1e-4)
    report.passed, report.top1_agreement, report.max_abs_prob_diff

Both sides get the same uint8 pixels from :func:`fowlflow.data.images.preprocess`; the
PyTorch side runs the wrapper that the ONNX graph was exported from, in float32 eager mode.
Passing means every image gets the same top-1 class and no class probability differs by more
than ``atol`` (default 1e-4).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fowlflow.data.images import ImageDecodeError, Preprocessing, list_images, preprocess
from fowlflow.errors import RegistryError

logger = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-4
DEFAULT_MAX_IMAGES = 128


@dataclass(frozen=True)
class ParityReport:
    """The outcome of one parity check."""

    images: int
    top1_agreement: float
    max_abs_prob_diff: float
    atol: float
    error: str = ""  # set when there was nothing to compare: the export itself failed

    @classmethod
    def export_failed(cls, error: str, atol: float = DEFAULT_ATOL) -> ParityReport:
        return cls(images=0, top1_agreement=0.0, max_abs_prob_diff=float("nan"), atol=atol,
                   error=error)

    @property
    def passed(self) -> bool:
        return (not self.error and self.images > 0 and self.top1_agreement == 1.0
                and self.max_abs_prob_diff <= self.atol)

    def summary(self) -> str:
        if self.error:
            return f"parity not checked: {self.error}"
        verdict = "passed" if self.passed else "FAILED"
        return (f"parity {verdict} on {self.images} validation images: top-1 agreement "
                f"{self.top1_agreement:.2%} (need 100%), max |p_onnx - p_torch| "
                f"{self.max_abs_prob_diff:.2e} (need <= {self.atol:.0e})")

    def as_tags(self) -> dict[str, str]:
        return {"parity_passed": str(self.passed).lower(),
                "parity_images": str(self.images),
                "parity_top1_agreement": f"{self.top1_agreement:.6f}",
                "parity_max_abs_prob_diff": f"{self.max_abs_prob_diff:.3e}",
                "parity_atol": f"{self.atol:g}"}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> ParityReport:
        """The report a registered version's tags (:meth:`as_tags`) describe."""
        return cls(images=int(tags["parity_images"]),
                   top1_agreement=float(tags["parity_top1_agreement"]),
                   max_abs_prob_diff=float(tags["parity_max_abs_prob_diff"]),
                   atol=float(tags["parity_atol"]))

    def as_metrics(self) -> dict[str, float]:
        return {"parity_top1_agreement": self.top1_agreement,
                "parity_max_abs_prob_diff": self.max_abs_prob_diff}


def load_parity_images(val_dir: Path, prep: Preprocessing,
                       max_images: int = DEFAULT_MAX_IMAGES) -> tuple[np.ndarray, list[Path]]:
    """Up to ``max_images`` validation images, preprocessed, taken evenly from every class folder.

    Images that fail to decode are skipped with a warning (they are per-item problems, not a
    reason to refuse a model).

    Raises:
        RegistryError: ``val_dir`` has no readable image.
    """
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise RegistryError(f"parity images: {str(val_dir)!r} is not a directory; give the "
                            "ImageFolder's val/ folder (-P val_dir=...)")
    by_class: dict[Path, list[Path]] = {}
    for p in list_images(val_dir):
        by_class.setdefault(p.parent, []).append(p)
    # Round-robin over class folders so a cap still covers every class.
    ordered = [p for group in _interleave(list(by_class.values())) for p in group]
    pixels, used = [], []
    with tqdm(total=min(max_images, len(ordered)), desc="parity images", unit="img",
              disable=None) as bar:
        for path in ordered:
            if len(used) >= max_images:
                break
            try:
                pixels.append(preprocess(path, prep))
                used.append(path)
                bar.update()
            except ImageDecodeError as exc:
                logger.warning("parity: skipping %s", exc.message)
    if not used:
        raise RegistryError(f"parity images: no readable image under {str(val_dir)!r}; give a "
                            "folder of real validation images (e.g. <data>/val)")
    return np.stack(pixels), used


def _interleave(groups: list[list[Path]]):
    for i in range(max((len(g) for g in groups), default=0)):
        yield [g[i] for g in groups if i < len(g)]


def torch_probabilities(classifier, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Probabilities from a :class:`~fowlflow.registry.export.PixelClassifier`, float32 eager."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            out.append(classifier(torch.from_numpy(pixels[i:i + batch_size]))[1].numpy())
    return np.concatenate(out)


def onnx_probabilities(onnx_path: Path, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Probabilities from the exported graph in onnxruntime (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["probabilities"], {"pixels": pixels[i:i + batch_size]})[0]
                           for i in range(0, len(pixels), batch_size)])


def compare(p_torch: np.ndarray, p_onnx: np.ndarray, atol: float = DEFAULT_ATOL) -> ParityReport:
    """Top-1 agreement and the largest absolute probability difference of two ``(N, C)``."""
    if p_torch.shape != p_onnx.shape:
        raise RegistryError(f"parity: output shapes differ: torch {p_torch.shape} vs onnx "
                            f"{p_onnx.shape}; the export changed the model's head")
    agree = float(np.mean(p_torch.argmax(1) == p_onnx.argmax(1))) if len(p_torch) else 0.0
    diff = float(np.max(np.abs(p_torch.astype(np.float64) - p_onnx))) if len(p_torch) else 0.0
    return ParityReport(images=len(p_torch), top1_agreement=agree, max_abs_prob_diff=diff,
                        atol=atol)


def check_parity(classifier, onnx_path: Path, pixels: np.ndarray,
                 atol: float = DEFAULT_ATOL) -> ParityReport:
    """Run both formats on ``pixels`` and compare; see :func:`compare`."""
    report = compare(torch_probabilities(classifier, pixels),
                     onnx_probabilities(onnx_path, pixels), atol)
    logger.info(report.summary())
    return report
