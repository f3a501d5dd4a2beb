"""Evaluate a registered model on an ImageFolder: accuracy and confusion matrix, in a new run.

    mlflow run . -e evaluate -P model_uri=models:/fowl-classifier-onnx@champion \
        -P data_dir=data/val
    python -m fowlflow.registry.evaluate --model_uri ... --data_dir data/val

``data_dir`` holds one sub-folder per class (the ImageFolder's ``val/`` or ``test/``; a relative
one is relative to the folder the command was typed in, see :mod:`fowlflow.local_paths`); folder
names must be among the model's ``class_names``. The run gets params ``model_uri`` and
``data_dir``, metrics ``accuracy``, ``images``, ``failed_images`` and per-class
``recall_<class>``/``precision_<class>``, and artifacts ``confusion_matrix.png``,
``confusion_matrix.json``, ``per_class_metrics.json`` and ``predictions.csv``. Unreadable images
are listed in ``predictions.csv`` and left out of the accuracy.
"""

from __future__ import annotations

import argparse
import logging
import os
import unicodedata
from pathlib import Path

import numpy as np

from fowlflow.data.images import list_images
from fowlflow.errors import RegistryError
from fowlflow.local_paths import find_local
from fowlflow.registry._cli import log_params

logger = logging.getLogger(__name__)


def labelled_images(data_dir: Path, class_names: list[str]) -> tuple[list[Path], list[int]]:
    """Image paths and the model's class index of each, from ``data_dir/<class>/*``.

    Raises:
        RegistryError: not a folder, no class folders, or a folder name the model doesn't know.
    """
    if not data_dir.is_dir():
        raise RegistryError(f"evaluate: {str(data_dir)!r} is not a directory; give an "
                            "ImageFolder split such as <data>/val")
    folders = sorted(d for d in data_dir.iterdir() if d.is_dir())
    # Class names are NFC (as the trainer reads them); a folder may be stored as NFD.
    name = {d: unicodedata.normalize("NFC", d.name) for d in folders}
    unknown = [d.name for d in folders if name[d] not in class_names]
    if not folders or unknown:
        raise RegistryError(
            f"evaluate: {str(data_dir)!r} needs one folder per class among the model's classes "
            f"{class_names}; " + (f"unknown folders: {unknown}" if unknown else "found none")
            + " (give the val/ folder itself, not its parent)")
    paths, labels = [], []
    for d in folders:
        files = list_images(d)
        paths += files
        labels += [class_names.index(name[d])] * len(files)
    if not paths:
        raise RegistryError(f"evaluate: no images under {str(data_dir)!r}")
    return paths, labels


def confusion_matrix(true: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """Counts ``cm[t, p]``: rows are true classes, columns predicted."""
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (true, pred), 1)
    return cm


def evaluate(model_uri: str, data_dir: str | os.PathLike, batch_size: int = 32) -> dict:
    """Predict every image and log the results to the active (or a new) run; returns metrics.

    ``data_dir`` is logged as given (``val/`` stays ``val/``), as ``mlflow run`` logs it.
    """
    import mlflow

    from fowlflow.registry.classifier import load_classifier
    from fowlflow.registry.predict import predict_files
    from fowlflow.tracking import figures

    given_dir = os.fspath(data_dir)
    data_dir = find_local(given_dir, "evaluate: data_dir", RegistryError,
                          "Give an ImageFolder split such as <data>/val.")
    clf = load_classifier(model_uri)
    names = clf.class_names
    paths, labels = labelled_images(data_dir, names)
    table = predict_files(clf, paths, batch_size)
    table.insert(1, "true", [names[i] for i in labels])
    ok = (table["error"] == "").to_numpy()
    true = np.asarray(labels)[ok]
    pred = np.array([names.index(x) for x in table["label"][ok]], dtype=int)
    cm = confusion_matrix(true, pred, len(names))
    accuracy = float(np.trace(cm) / max(cm.sum(), 1))
    per_class = figures.per_class_table(cm, names)
    metrics = {"accuracy": accuracy, "images": int(ok.sum()), "failed_images": int((~ok).sum())}
    with mlflow.start_run() as run:  # under `mlflow run`, the project run
        log_params({"model_uri": model_uri, "data_dir": given_dir})
        mlflow.set_tag("fowlflow.evaluated_model", model_uri)
        mlflow.log_metrics(metrics)
        mlflow.log_metrics({f"{k}_{c}": v for k in ("recall", "precision")
                            for c, v in zip(names, per_class[k])})
        fig = figures.confusion_matrix_figure(cm, names, title=f"{data_dir.name}")
        mlflow.log_figure(fig, "confusion_matrix.png")
        figures.close(fig)
        mlflow.log_dict({"classes": names, "matrix": cm.tolist()}, "confusion_matrix.json")
        mlflow.log_dict(per_class, "per_class_metrics.json")
        mlflow.log_text(table.to_csv(index=False), "predictions.csv")
    return {**metrics, "run_id": run.info.run_id, "confusion_matrix": cm.tolist()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fowlflow.registry.evaluate",
                                description="Accuracy and confusion matrix of a model on an "
                                            "ImageFolder split, logged to a new run.")
    p.add_argument("--model_uri", required=True)
    p.add_argument("--data_dir", required=True, help="folder with one sub-folder per class")
    p.add_argument("--batch_size", type=int, default=32)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = evaluate(args.model_uri, args.data_dir, args.batch_size)
    print(f"accuracy {result['accuracy']:.4f} on {result['images']} images "
          f"({result['failed_images']} unreadable); run {result['run_id']}")
    print("confusion matrix (rows true, columns predicted):")
    for row in result["confusion_matrix"]:
        print("  " + " ".join(f"{v:5d}" for v in row))
    return 0


if __name__ == "__main__":
    import sys

    from fowlflow.errors import exit_code
    from fowlflow.registry._cli import LOG_FORMAT

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    sys.exit(exit_code(main))
