"""Batched augmentation on the device: random-resized-crop + horizontal flip + normalize.

    x = train_batch(cache.images[idx], cache.aspect[idx], 224, generator)  # float (B,3,224,224)
    x = eval_batch(val.images[idx])

One ``affine_grid``/``grid_sample`` call per batch replaces torchvision's per-image PIL
``RandomResizedCrop(224)`` + ``RandomHorizontalFlip`` (same scale (0.08, 1) and ratio (3/4, 4/3)
in the original image's geometry), so no decode or resize runs in the hot path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
TRIES = 10


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float32 normalized with ImageNet mean/std."""
    return _normalize_(x_uint8.float())


def _normalize_(x: torch.Tensor) -> torch.Tensor:
    """``(x / 255 - mean) / std`` in place on a float (B,3,H,W) batch, as one multiply-add
    (four passes over the batch took half of the augmentation's time on a CPU)."""
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    return x.mul_(1 / (255.0 * std)).add_(-mean / std)


def crop_boxes(aspect: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sample random-resized-crop boxes as (B, 4): width/height fractions and centres in [-1, 1].

    Like torchvision: area fraction ~ U(SCALE), log aspect ~ U(log RATIO), up to TRIES draws
    per image; an image with no valid draw gets the whole image.
    """
    b, dev = aspect.shape[0], aspect.device
    u = torch.rand((b, TRIES, 4), generator=generator, device=dev)
    area = SCALE[0] + (SCALE[1] - SCALE[0]) * u[..., 0]
    log_r = math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * u[..., 1]
    r = torch.exp(log_r)
    a = aspect.view(b, 1)
    fw = torch.sqrt(area * r / a)  # crop width / image width
    fh = torch.sqrt(area * a / r)  # crop height / image height
    valid = (fw <= 1) & (fh <= 1)
    first = torch.where(valid.any(1), valid.float().argmax(1), torch.zeros_like(aspect, dtype=torch.long))
    pick = lambda t: t.gather(1, first.view(b, 1)).squeeze(1)  # noqa: E731
    has = valid.any(1)
    fw = torch.where(has, pick(fw), torch.ones_like(aspect))
    fh = torch.where(has, pick(fh), torch.ones_like(aspect))
    cx = (1 - fw) * (2 * pick(u[..., 2]) - 1)
    cy = (1 - fh) * (2 * pick(u[..., 3]) - 1)
    return torch.stack([fw, fh, cx, cy], 1)


def train_batch(images: torch.Tensor, aspect: torch.Tensor, out_size: int,
                generator: torch.Generator) -> torch.Tensor:
    """Random-resized-crop to ``out_size``, random flip, normalize; float32 (B,3,S,S)."""
    b = images.shape[0]
    fw, fh, cx, cy = crop_boxes(aspect, generator).unbind(1)
    flip = torch.where(torch.rand(b, generator=generator, device=images.device) < 0.5, -1.0, 1.0)
    theta = torch.zeros((b, 2, 3), device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = fw * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = fh, cy
    grid = F.affine_grid(theta, [b, 3, out_size, out_size], align_corners=False)
    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                      align_corners=False)
    # Normalized after the crop, on fewer pixels: each output pixel is a weighted mean of input
    # pixels (weights summing to 1, borders clamped), so normalizing commutes with the sampling.
    return _normalize_(x)


def eval_batch(images: torch.Tensor) -> torch.Tensor:
    """Validation images are cropped at decode time: only normalize."""
    return normalize(images)
