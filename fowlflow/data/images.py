"""Decoding and preprocessing images: the one geometric preprocessing both model formats share.

    prep = Preprocessing.from_metadata(mlflow.models.get_model_info(uri).metadata)
    pixels = preprocess("turkey.jpg", prep)        # uint8 (S, S, 3); also bytes, base64, PIL

The pipeline is torchvision's validation transform written with PIL only, so that the served
ONNX model needs neither torch nor torchvision: :func:`to_rgb` (EXIF orientation applied,
16-bit grayscale scaled to 8 bits, decoded pixels bounded by :func:`max_image_pixels`) → resize
the shorter side to
``resize_size`` (bilinear, antialiased: PIL always filters when shrinking) → center crop
``image_size`` → uint8 HWC. Scaling to [0, 1] and the mean/std normalization are *not* done
here: they are a layer of the exported ONNX graph and of the PyTorch wrapper
(``fowlflow.registry.export.PixelClassifier``), so any client that can produce RGB bytes gets
the same numbers. The trainer decodes with the same :func:`to_rgb`, so validation pixels and
served pixels agree. This module imports no torch and no fowlflow module but
``fowlflow.errors``: it is copied into every ONNX model's ``code/`` folder
(``fowlflow.registry.image_pyfunc``).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fowlflow.errors import ConfigError, RegistryError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# Signatures of the formats PIL reads that we accept; anything else is tried as base64 text.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*", b"P6")
MAX_PIXELS_ENV = "FOWLFLOW_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 64_000_000  # ~200 MB of decoded RGB; a 48-megapixel photo fits
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(RegistryError):
    """An input is not a readable image, or a request holds no images at all.

    A bad image is that image's problem only: predict (the pyfunc's and the entry point's)
    returns the message as the item's ``error`` and classifies the others, so the scoring
    server still answers HTTP 200; the trainer and the parity check skip the image. The scoring
    server answers HTTP 400 only for a request with no images (see ``image_pyfunc``).
    """

    def __init__(self, message: str):
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class Preprocessing:
    """What the model expects, as logged in its MLmodel ``metadata``."""

    image_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any] | None) -> Preprocessing:
        """Build from a model's metadata dict (``image_size``, ``resize_size``, ``mean``, ``std``).

        Raises:
            RegistryError: ``image_size`` is missing (the model was not logged by fowlflow).
        """
        metadata = metadata or {}
        if "image_size" not in metadata:
            raise RegistryError(
                f"the model's MLmodel metadata has no 'image_size' (keys: {sorted(metadata)}); "
                "log it with fowlflow's trainer, or pass metadata={'image_size': ..., "
                "'class_names': [...]} to mlflow.pytorch.log_model")
        size = int(metadata["image_size"])
        return cls(
            image_size=size,
            resize_size=int(metadata.get("resize_size") or round(size * 256 / 224)),
            mean=tuple(float(v) for v in metadata.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in metadata.get("std", IMAGENET_STD)),
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def max_image_pixels() -> int:
    """The most pixels one image may decode to: ``$FOWLFLOW_MAX_IMAGE_PIXELS`` or 64 million.

    Raises:
        ConfigError: the variable is set but is not a positive whole number.
    """
    text = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_PIXELS
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r} is invalid: set it to "
                          f"a whole number of pixels such as {DEFAULT_MAX_PIXELS}, or unset it.")
    return int(text)


def to_rgb(img, *, fit: tuple[int, int] | None = None, max_pixels: int | None = None):
    """Decode an opened PIL image into upright 8-bit RGB, with bounded memory.

    EXIF orientation is applied; 16-bit (and 32-bit integer) grayscale is scaled to 8 bits
    instead of being clipped to white. An image whose size exceeds ``max_pixels``
    (default :func:`max_image_pixels`) is refused before decoding, unless it is a JPEG, which
    is then decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``, in the DCT domain) to fit.
    ``fit`` asks JPEGs to be decoded at the smallest such scale that still covers ``fit`` (the
    trainer's draft mode). With ``fit=None``, images under the limit get exactly the pixels of
    ``img.convert("RGB")``.
    ``img`` is modified (decoded, transposed) in place.

    Raises:
        ImageDecodeError: the image is over the pixel limit and can't be decoded smaller.
    """
    from PIL import ImageOps

    limit = max_pixels or max_image_pixels()
    w, h = img.size
    if fit or w * h > limit:  # only JPEGs can decode smaller; draft() is a no-op for others
        scale = 1
        while scale < 8 and -(-w // scale) * -(-h // scale) > limit:
            scale *= 2
        fit_w, fit_h = fit or (w, h)
        img.draft("RGB", (max(1, min(fit_w, w // scale)), max(1, min(fit_h, h // scale))))
    if img.size[0] * img.size[1] > limit:
        raise ImageDecodeError(
            f"{w}x{h} = {w * h:,} pixels, over the decode limit of {limit:,} pixels; "
            f"downscale the image, or raise {MAX_PIXELS_ENV}")
    ImageOps.exif_transpose(img, in_place=True)
    if img.mode in _16BIT_MODES:
        from PIL import Image

        pixels = np.asarray(img)
        if img.mode == "I":
            pixels = np.clip(pixels, 0, 65535)
        img = Image.fromarray((pixels >> 8).astype(np.uint8))  # mode L
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(source: Any, *, allow_paths: bool = True):
    """Open one image as a PIL RGB image (see :func:`to_rgb`).

    Args:
        source: a path (str or ``os.PathLike``), raw encoded bytes, base64 text (str or bytes,
            optionally a ``data:image/...;base64,`` URI), a binary file object, or a PIL image.
        allow_paths: read str sources as local paths first. The image pyfunc turns this off
            inside ``mlflow models serve`` so that a request can't read the server's files.

    Raises:
        ImageDecodeError: the source can't be read or decoded as an image.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, np.ndarray) and source.ndim == 0:
        source = source.item()
    if isinstance(source, (bytearray, memoryview)):
        source = bytes(source)
    what = _describe(source)
    if isinstance(source, Image.Image):
        stream = source.copy()  # to_rgb works in place; the caller's image stays as it is
    elif isinstance(source, os.PathLike) or (
            isinstance(source, str) and allow_paths and _is_file(source)):
        stream = _open_file(Path(source), what)  # PIL reads only what it decodes
    elif isinstance(source, str):
        stream = io.BytesIO(_from_base64(source, what, maybe_path=allow_paths))
    elif isinstance(source, bytes):
        stream = io.BytesIO(source if source.startswith(_MAGIC) else _from_base64(source, what))
    elif hasattr(source, "read"):
        stream = io.BytesIO(source.read())
    else:
        raise ImageDecodeError(
            f"{what}: unsupported input type {type(source).__name__}; give a path, image bytes, "
            "base64 text or a PIL image")
    try:
        if isinstance(stream, Image.Image):
            return to_rgb(stream)
        with stream, Image.open(stream) as img:
            return to_rgb(img)  # decoded before the file closes
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{what}: {exc.message}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(
            f"{what} is not a readable image ({type(exc).__name__}: {exc}); "
            "send a JPEG/PNG/BMP/GIF/WebP/TIFF file") from None


def _is_file(text: str) -> bool:
    if len(text) > 4096 or text.startswith("data:"):
        return False
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # name too long, NUL byte: not a path
        return False


def _open_file(path: Path, what: str):
    try:
        return path.open("rb")
    except OSError as exc:
        raise ImageDecodeError(f"{what}: can't read the file ({exc.strerror}); "
                               "give an existing, readable image path") from None


def _from_base64(text: str | bytes, what: str, maybe_path: bool = False) -> bytes:
    if isinstance(text, str):
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        text = text.encode("ascii", errors="replace")
    try:
        return base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        if maybe_path:
            raise ImageDecodeError(f"{what}: no such image file (and not base64 image bytes); "
                                   "give an existing path") from None
        raise ImageDecodeError(
            f"{what} is neither image bytes nor base64-encoded image bytes; send the "
            "file's bytes base64-encoded (see docs/registry.md, 'Serving')") from None


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        return repr(text if len(text) <= 60 else text[:57] + "...")
    if isinstance(source, bytes):
        return f"{len(source)} bytes {source[:12]!r}"
    return type(source).__name__


def resize_and_crop(img, prep: Preprocessing) -> np.ndarray:
    """Shorter side to ``resize_size``, then the central ``image_size`` square, as uint8 HWC.

    Same arithmetic as ``torchvision.transforms.Resize(resize_size)`` followed by
    ``CenterCrop(image_size)`` on a PIL image (tests compare the two).
    """
    from PIL import Image

    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = prep.resize_size, int(prep.resize_size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    s = prep.image_size
    if new_w < s or new_h < s:  # torchvision pads before cropping; so do we
        canvas = Image.new("RGB", (max(new_w, s), max(new_h, s)))
        canvas.paste(img, ((max(new_w, s) - new_w) // 2, (max(new_h, s) - new_h) // 2))
        img, (new_w, new_h) = canvas, canvas.size
    top = int(round((new_h - s) / 2.0))
    left = int(round((new_w - s) / 2.0))
    return np.asarray(img.crop((left, top, left + s, top + s)), dtype=np.uint8)


def preprocess(source: Any, prep: Preprocessing, *, allow_paths: bool = True) -> np.ndarray:
    """Decode one image and return the model's pixels: uint8 ``(image_size, image_size, 3)``.

    Raises:
        ImageDecodeError: the source is not a readable image.
    """
    return resize_and_crop(load_image(source, allow_paths=allow_paths), prep)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted, by extension."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
