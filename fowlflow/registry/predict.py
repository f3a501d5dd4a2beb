"""Classify image files with a registered model: a table on stdout, optionally a CSV.

    mlflow run . -e predict -P model_uri=models:/fowl-classifier-onnx@champion \
        -P images=photos/ -P output_csv=predictions.csv
    python -m fowlflow.registry.predict --model_uri ... --images a.jpg,b.png,folder/

``images`` is a comma-separated list of files and folders (searched recursively for image
extensions); a relative one is relative to the folder the command was typed in
(:mod:`fowlflow.local_paths`), and rows name the images found by absolute path. A file that is
missing or can't be decoded gets its own row with the error; the others are still predicted. The
exit status is 0 unless no image at all could be read. Under ``mlflow run`` the CSV is also
logged to the project run as ``predictions.csv``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from fowlflow.data.images import IMAGE_EXTENSIONS, list_images
from fowlflow.errors import RegistryError
from fowlflow.local_paths import find_local
from fowlflow.registry._cli import given

logger = logging.getLogger(__name__)


def expand_images(spec: str) -> list[Path]:
    """Files and folders (comma-separated) → image paths; folders are searched recursively.

    A relative path is found by :func:`fowlflow.local_paths.find_local`. A path that does not
    exist is kept as given, with a warning naming where it was looked for: its row reports the
    error, the others are predicted.

    Raises:
        RegistryError: ``spec`` names nothing at all.
    """
    paths: list[Path] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            p = find_local(item, "predict: image path", RegistryError)
        except RegistryError as exc:
            logger.warning("%s", exc.message)
            p = Path(item).expanduser()
        found = list_images(p) if p.is_dir() else [p]
        if not found:
            logger.warning("predict: no image files in the folder %s (extensions: %s)", p,
                           " ".join(IMAGE_EXTENSIONS))
        paths += found
    if not paths:
        raise RegistryError(f"predict: no image files in {spec!r}; give image files or folders, "
                            "comma-separated (extensions: .jpg .png ...)")
    return paths


def predict_files(classifier, paths: list[Path], batch_size: int = 32):
    """One row per path: path, label, score, one ``p_<class>`` column per class, error.

    Unreadable or missing files get an ``error`` and empty predictions; the rest are classified.
    """
    import pandas as pd
    from tqdm import tqdm

    from fowlflow.registry.image_pyfunc import decode_each

    pixels, errors = decode_each(tqdm(paths, desc="decode", unit="img", disable=None),
                                 classifier.prep)
    for message in errors.values():
        logger.warning("%s", message)
    names = classifier.class_names
    probs = np.full((len(paths), len(names)), np.nan)
    ok = [i for i in range(len(paths)) if i not in errors]
    if ok:
        out = [classifier.predict_pixels(pixels[j:j + batch_size])
               for j in range(0, len(pixels), batch_size)]
        probs[ok] = np.concatenate(out)
    rows = []
    for i, path in enumerate(paths):
        good = i not in errors
        rows.append({"path": str(path),
                     "label": names[int(np.argmax(probs[i]))] if good else "",
                     "score": float(np.max(probs[i])) if good else np.nan,
                     **{f"p_{c}": probs[i, k] for k, c in enumerate(names)},
                     "error": errors.get(i, "")})
    return pd.DataFrame(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fowlflow.registry.predict",
                                description="Classify image files with a registered model.")
    p.add_argument("--model_uri", required=True,
                   help="e.g. models:/fowl-classifier-onnx@champion (ONNX or PyTorch)")
    p.add_argument("--images", required=True, help="comma-separated image files and folders")
    p.add_argument("--output_csv", default="none", help="also write the table here (none: don't)")
    p.add_argument("--batch_size", type=int, default=32)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    import mlflow
    import pandas as pd

    from fowlflow.registry.classifier import load_classifier

    args = build_parser().parse_args(argv)
    paths = expand_images(args.images)
    table = predict_files(load_classifier(args.model_uri), paths, args.batch_size)
    with pd.option_context("display.max_rows", None, "display.width", 200,
                           "display.max_colwidth", 80):
        print(table[["path", "label", "score", "error"]].to_string(index=False))
    if given(args.output_csv):
        table.to_csv(args.output_csv, index=False)
        print(f"wrote {args.output_csv}")
    if os.environ.get("MLFLOW_RUN_ID"):
        with mlflow.start_run():
            mlflow.log_metric("images", len(table))
            mlflow.log_metric("failed_images", int((table["error"] != "").sum()))
            mlflow.log_text(table.to_csv(index=False), "predictions.csv")
    failed = int((table["error"] != "").sum())
    if failed == len(table):
        raise RegistryError(f"predict: none of the {failed} images could be read; see the "
                            "error column")
    if failed:
        print(f"{failed} of {len(table)} images could not be read (see the error column)")
    return 0


if __name__ == "__main__":
    import sys

    from fowlflow.errors import exit_code
    from fowlflow.registry._cli import LOG_FORMAT

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    sys.exit(exit_code(main))
