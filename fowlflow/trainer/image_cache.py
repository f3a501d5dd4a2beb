"""Decode every image once into a uint8 tensor kept in memory (on the GPU when there is one).

    cache = decode_split(paths, labels, mode="train", image_size=224, workers=2)
    cache.images  # uint8 (N, 3, S, S); cache.aspect (N,) original width/height

Training images are resized ("squashed") to ``S x S`` with ``S = resize_size(image_size)`` and
their original aspect ratio is kept, so the batched random-resized-crop in ``augment`` can
sample crops in the original geometry without losing the image's edges. Validation images get
the classic eval transform once (shorter side to ``S``, centre crop ``image_size``). Both decode
with the served model's :func:`fowlflow.data.images.to_rgb` (EXIF orientation, 16-bit
grayscale, the ``FOWLFLOW_MAX_IMAGE_PIXELS`` decode limit). Decoding runs in ``workers``
processes with a progress bar; files that fail to decode are reported, not fatal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fowlflow.data.images import (ImageDecodeError, Preprocessing, max_image_pixels,
                                      resize_and_crop, to_rgb)

log = logging.getLogger(__name__)


def resize_size(image_size: int) -> int:
    """The shorter-side resize before the centre crop (256 for 224, as torchvision does)."""
    return int(round(image_size * 256 / 224))


def eval_transform(img: Image.Image, image_size: int, max_pixels: int | None = None) -> np.ndarray:
    """Shorter side to ``resize_size``, centre crop ``image_size``; uint8 (H, W, 3).

    The same functions the registered models use at prediction time, so validation pixels and
    served pixels agree exactly.
    """
    prep = Preprocessing(image_size=image_size, resize_size=resize_size(image_size))
    return resize_and_crop(to_rgb(img, max_pixels=max_pixels), prep)


def train_transform(img: Image.Image, image_size: int, max_pixels: int | None = None
                    ) -> tuple[np.ndarray, float]:
    """The whole (upright) image squashed to ``S x S``; uint8 (S, S, 3) and its w/h.

    JPEGs are decoded in draft mode (downscaled in the DCT domain to at least ``S x S``), which
    makes decoding large photos several times faster.
    """
    size = resize_size(image_size)
    img = to_rgb(img, fit=(size, size), max_pixels=max_pixels)
    aspect = img.size[0] / img.size[1]
    return np.asarray(img.resize((size, size), Image.BILINEAR)), aspect


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], mode: str, image_size: int, max_pixels: int):
        self.paths, self.mode, self.image_size = paths, mode, image_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.paths[i]) as img:
                if self.mode == "train":
                    arr, aspect = train_transform(img, self.image_size, self.max_pixels)
                else:
                    arr, aspect = eval_transform(img, self.image_size, self.max_pixels), 1.0
            return i, torch.from_numpy(arr.copy()).permute(2, 0, 1), aspect, None
        except ImageDecodeError as exc:  # over the pixel limit
            return i, None, 1.0, f"too large: {exc.message}"
        except Exception as exc:  # any decoder failure is a per-file problem, reported
            return i, None, 1.0, f"cannot decode: {type(exc).__name__}: {exc}"


@dataclass
class ImageCache:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)
    aspect: torch.Tensor  # float32 (N,), original width / height
    kept: list[Path]      # the paths of the rows, in order

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "ImageCache":
        return ImageCache(self.images.to(device), self.labels.to(device),
                          self.aspect.to(device), self.kept)


def decode_split(paths: list[Path], labels: list[int], mode: str, image_size: int,
                 workers: int, progress: bool = True, desc: str = "decode"
                 ) -> tuple[ImageCache, list[tuple[Path, str]]]:
    """Decode ``paths`` into an :class:`ImageCache`; also return ``(path, reason)`` failures."""
    side = resize_size(image_size) if mode == "train" else image_size
    need = len(paths) * 3 * side * side
    try:
        import psutil

        free = psutil.virtual_memory().available
    except ImportError:  # psutil comes with mlflow; be safe anyway
        free = need * 4
    if need > free * 0.6:
        from fowlflow.errors import DataError

        raise DataError(f"Decoding {len(paths)} images at {side}px needs {need / 2**30:.1f} GiB "
                        f"but only {free / 2**30:.1f} GiB is free. Use a smaller "
                        "-P image_size or a machine with more memory.")
    images = torch.empty((len(paths), 3, side, side), dtype=torch.uint8)
    aspect = torch.ones(len(paths), dtype=torch.float32)
    ok = torch.zeros(len(paths), dtype=torch.bool)
    failures: list[tuple[Path, str]] = []
    loader = torch.utils.data.DataLoader(
        _Decode(paths, mode, image_size, max_image_pixels()), batch_size=16, num_workers=workers,
        collate_fn=list, shuffle=False)
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            for i, tensor, asp, error in batch:
                if error is None:
                    images[i], aspect[i], ok[i] = tensor, asp, True
                else:
                    failures.append((paths[i], error))
            bar.update(len(batch))
    keep = ok.nonzero().flatten()
    cache = ImageCache(images[keep].contiguous(),
                       torch.tensor(labels, dtype=torch.int64)[keep], aspect[keep],
                       [paths[i] for i in keep.tolist()])
    return cache, failures
