"""Evaluation figures and tables logged with each run.

    fig = confusion_matrix_figure(cm, classes)
    table = per_class_table(cm, classes)          # {"class": [...], "precision": [...], ...}
    fig = misclassified_grid(images, true, pred, classes)
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_matrix_figure(cm: np.ndarray, classes: list[str], title: str = "Validation"):
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 3), max(3.5, 0.6 * n + 2.5)), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = cm.sum() or 1
    ax.set_title(f"{title} confusion matrix (accuracy {np.trace(cm) / total:.3f})")
    high = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > high else "black")
    fig.tight_layout()
    return fig


def per_class_table(cm: np.ndarray, classes: list[str]) -> dict[str, list]:
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(0).astype(float)
    actual = cm.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                   where=(precision + recall) > 0)
    return {"class": list(classes), "precision": precision.round(4).tolist(),
            "recall": recall.round(4).tolist(), "f1": f1.round(4).tolist(),
            "support": actual.astype(int).tolist()}


def misclassified_grid(images: np.ndarray, true: np.ndarray, pred: np.ndarray,
                       classes: list[str], max_images: int = 16):
    """A grid of misclassified images (uint8 N,3,H,W) titled 'true -> predicted'."""
    wrong = np.flatnonzero(true != pred)[:max_images]
    cols = 4
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.6), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(np.transpose(images[i], (1, 2, 0)))
        ax.set_title(f"{classes[true[i]]} -> {classes[pred[i]]}", fontsize=9, color="crimson")
    if len(wrong) == 0:
        axes.flat[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle(f"Misclassified validation images ({int((true != pred).sum())} of {len(true)})")
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
