"""Image files built by hand that reproduce the reports of issue 8 (decoding image items).

    expected = gray16_png(path)      # a 16-bit grayscale PNG; returns its correct 8-bit pixels
    sideways_jpeg(path)              # a phone-style photo stored sideways with EXIF orientation 6
    huge_png(path, 13000, 13000)     # a large PNG written row by row (5.7 MB on disk)
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED, BLUE = (210, 30, 30), (30, 30, 210)


def gray16_png(path: Path, size=(48, 40)) -> np.ndarray:
    """A 16-bit horizontal gradient (0..65535); returns its 8-bit version (uint8 H x W)."""
    w, h = size
    row = np.linspace(0, 65535, w).round().astype(np.uint16)
    pixels = np.broadcast_to(row, (h, w)).copy()
    img = Image.fromarray(pixels)
    assert img.mode == "I;16"
    img.save(path, format="PNG")
    return (pixels >> 8).astype(np.uint8)


def sideways_jpeg(path: Path) -> None:
    """Upright it is 40 wide x 60 tall, red on top, blue below; stored rotated 90° (60 x 40)
    with EXIF Orientation 6 ("rotate 90° clockwise to display"), as phones write portraits."""
    upright = np.zeros((60, 40, 3), np.uint8)
    upright[:30], upright[30:] = RED, BLUE
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())


def top_and_bottom(rgb_hwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour of the top quarter and of the bottom quarter of an H x W x 3 image."""
    q = rgb_hwc.shape[0] // 4
    return rgb_hwc[:q].reshape(-1, 3).mean(0), rgb_hwc[-q:].reshape(-1, 3).mean(0)


def huge_png(path: Path, width: int, height: int) -> None:
    """An RGB PNG with a repeating gradient, streamed row by row (never whole in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    row = b"\0" + (bytes(range(256)) * (width * 3 // 256 + 1))[:width * 3]  # filter 0 + pixels
    deflate = zlib.compressobj(1)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", b"".join([deflate.compress(row) for _ in range(height)]
                                         + [deflate.flush()])))
        f.write(chunk(b"IEND", b""))
