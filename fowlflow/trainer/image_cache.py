"""Decode every image once into a uint8 tensor kept in memory (on the GPU when there is one).

    cache, failures = decode_split(paths, labels, mode="train", image_size=224, workers=2)
    cache.images  # uint8 (N, 3, S, S); cache.aspect (N,) original width/height

This is the *cached* data path (:mod:`fowlflow.trainer.data_path` chooses it when this rank's
part of the set fits the memory budget); :mod:`fowlflow.trainer.streaming` decodes the same
way every epoch instead. Under DDP each rank decodes only its own rows
(:mod:`fowlflow.trainer.sharding`).

Training images are resized ("squashed") to ``S x S`` with ``S = resize_size(image_size)`` and
their original aspect ratio is kept, so the batched random-resized-crop in ``augment`` can
sample crops in the original geometry without losing the image's edges. Validation images get
the classic eval transform once (shorter side to ``S``, centre crop ``image_size``). Both decode
with the served model's :func:`fowlflow.data.images.to_rgb` (EXIF orientation, 16-bit
grayscale, the ``FOWLFLOW_MAX_IMAGE_PIXELS`` decode limit). Decoding runs in ``workers``
processes with a progress bar; files that fail to decode are reported, not fatal.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
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


# What a decode item reads: a local path, or the encoded bytes of one image (a shard's record).
Source = Path | bytes


def bytes_per_image(mode: str, image_size: int) -> int:
    """The decoded bytes one image takes in a cache: ``S x S x 3`` uint8 (``S`` the resize
    size for training, the crop size for validation)."""
    side = resize_size(image_size) if mode == "train" else image_size
    return 3 * side * side


class DecodeImages(torch.utils.data.Dataset):
    """Item ``i``: ``(i, uint8 CHW tensor or None, aspect, error or None)`` decoded from
    ``sources[i]`` with :func:`train_transform` or :func:`eval_transform` (``mode``)."""

    def __init__(self, sources: list[Source], mode: str, image_size: int, max_pixels: int):
        self.sources, self.mode, self.image_size = sources, mode, image_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        return (i, *self.decode(self.sources[i]))

    def decode(self, source: Source):
        """``(uint8 CHW tensor or None, aspect, error or None)`` for one source."""
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                if self.mode == "train":
                    arr, aspect = train_transform(img, self.image_size, self.max_pixels)
                else:
                    arr, aspect = eval_transform(img, self.image_size, self.max_pixels), 1.0
            return torch.from_numpy(arr.copy()).permute(2, 0, 1), aspect, None
        except ImageDecodeError as exc:  # over the pixel limit
            return None, 1.0, f"too large: {exc.message}"
        except Exception as exc:  # any decoder failure is a per-file problem, reported
            return None, 1.0, f"cannot decode: {type(exc).__name__}: {exc}"


@dataclass
class ImageCache:
    """Decoded images in memory; also the loop's data (``train_batches``/``eval_batches``)."""

    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)
    aspect: torch.Tensor  # float32 (N,), original width / height
    kept: list[Path]      # the paths of the rows, in order
    # The rows' indices in the whole split (this rank's part of it under DDP; validation
    # figures are put together from them); empty: 0..N-1.
    rows: list[int] = field(default_factory=list)
    per_rank: int = 0  # images each rank trains on per epoch (0: all of these)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "ImageCache":
        return ImageCache(self.images.to(device), self.labels.to(device),
                          self.aspect.to(device), self.kept, self.rows, self.per_rank)

    def train_batches(self, setup, epoch: int):
        """This epoch's batch sizes and its ``(uint8 images, aspect, labels)`` batches."""
        from fowlflow.trainer.sharding import epoch_batches

        batches = epoch_batches(len(self), self.per_rank or len(self), setup.batch_size,
                                setup.seed, epoch)

        def gen():
            for idx in batches:
                idx = idx.to(self.images.device, non_blocking=True)
                yield self.images[idx], self.aspect[idx], self.labels[idx]
        return [len(b) for b in batches], gen()

    def eval_batches(self, batch_size: int):
        """``(split rows, uint8 images, labels)`` batches over every image held, in order."""
        rows = torch.tensor(self.rows or range(len(self)), dtype=torch.int64)
        for pos in torch.arange(len(self)).split(batch_size):
            idx = pos.to(self.images.device)
            yield rows[pos], self.images[idx], self.labels[idx]

    def example(self, k: int) -> torch.Tensor:
        """The first ``k`` images (the logged model's input example)."""
        return self.images[:k]


def decode_split(paths: list[Path], labels: list[int], mode: str, image_size: int,
                 workers: int, progress: bool = True, desc: str = "decode",
                 rows: list[int] | None = None, names: list | None = None
                 ) -> tuple[ImageCache, list[tuple[Path, str]]]:
    """Decode ``paths`` into an :class:`ImageCache`; also return ``(path, reason)`` failures.
    ``rows``: the paths' indices in the whole split (this rank's part of it), kept with them;
    ``paths`` may also be encoded images (``bytes``), then ``names`` name them (failures and
    ``kept`` list the names). Whether it fits in memory is :mod:`fowlflow.trainer.data_path`'s
    question, asked first."""
    names = names if names is not None else paths
    side = resize_size(image_size) if mode == "train" else image_size
    images = torch.empty((len(paths), 3, side, side), dtype=torch.uint8)
    aspect = torch.ones(len(paths), dtype=torch.float32)
    ok = torch.zeros(len(paths), dtype=torch.bool)
    failures: list[tuple[Path, str]] = []
    loader = torch.utils.data.DataLoader(
        DecodeImages(paths, mode, image_size, max_image_pixels()), batch_size=16, num_workers=workers,
        collate_fn=list, shuffle=False)
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            for i, tensor, asp, error in batch:
                if error is None:
                    images[i], aspect[i], ok[i] = tensor, asp, True
                else:
                    failures.append((names[i], error))
            bar.update(len(batch))
    keep = ok.nonzero().flatten()
    cache = ImageCache(images[keep].contiguous(),
                       torch.tensor(labels, dtype=torch.int64)[keep], aspect[keep],
                       [names[i] for i in keep.tolist()],
                       [rows[i] for i in keep.tolist()] if rows is not None else [])
    return cache, failures
