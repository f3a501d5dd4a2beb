"""A generated, learnable two-class ImageFolder for smoke tests and demos (``-P data=synthetic``).

Class ``circles`` holds warm-tinted ellipses, class ``squares`` cool-tinted rectangles, on noisy
backgrounds: a small CNN separates them within an epoch or two, so a demo shows accuracy rise.
The set is written once per cache folder, atomically (a temporary folder renamed when done).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circles", "squares")
COUNTS = {"train": 48, "val": 24}  # per class
SIZE = 64


def _draw(rng: np.random.Generator, label: int) -> Image.Image:
    bg = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) // 2 + 40
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(SIZE // 5, SIZE // 3))
    cx, cy = (int(v) for v in rng.integers(r, SIZE - r, 2))
    base = np.array([220, 90, 40]) if label == 0 else np.array([40, 110, 220])
    colour = tuple(int(c) for c in np.clip(base + rng.integers(-30, 30, 3), 0, 255))
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw.ellipse if label == 0 else draw.rectangle)(box, fill=colour)
    return img


def ensure_synthetic(root: Path, seed: int = 0) -> Path:
    """Create the synthetic ImageFolder at ``root`` unless it exists; return ``root``."""
    if (root / "val").is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root.parent))
    try:
        rng = np.random.default_rng(seed)
        for split, n in COUNTS.items():
            for label, name in enumerate(CLASSES):
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for i in range(n):
                    _draw(rng, label).save(folder / f"{name}_{i:03d}.png")
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "val").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
