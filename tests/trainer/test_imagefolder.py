"""ImageFolder layout checks and decoding: bad layouts fail clearly, bad files are skipped."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from fowlflow.errors import DataError
from fowlflow.trainer.image_cache import decode_split, eval_transform
from fowlflow.trainer.imagefolder import scan_imagefolder
from tests.conftest import HYMENOPTERA, make_imagefolder


def test_hymenoptera_layout_and_its_gif(tmp_path):
    layout = scan_imagefolder(HYMENOPTERA)
    assert layout.classes == ["ants", "bees"]
    assert len(layout.train.paths) == 244 and len(layout.val.paths) == 153
    assert [s["path"] for s in layout.skipped] == ["train/ants/imageNotFound.gif"]
    assert any(p.suffix == ".jpeg" for p in layout.train.paths)
    assert len(layout.digest) == 16


def test_digest_changes_with_content(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    before = scan_imagefolder(root).digest
    img = next((root / "train" / "ants").iterdir())
    img.write_bytes(img.read_bytes() + b"\0")
    assert scan_imagefolder(root).digest != before


@pytest.mark.parametrize("breakage,message", [
    (lambda r: shutil.rmtree(r / "val"), "no 'val/' folder"),
    (lambda r: shutil.rmtree(r / "train"), "no 'train/' folder"),
    (lambda r: (r / "val" / "bees").rename(r / "val" / "wasps"), "different classes"),
    (lambda r: [p.unlink() for p in (r / "train" / "bees").iterdir()], r"no readable image for class\(es\) \['bees'\]"),
    (lambda r: [shutil.rmtree(r / s / "bees") for s in ("train", "val")], "only one class"),
])
def test_bad_layouts_are_explained(tmp_path, breakage, message):
    root = make_imagefolder(tmp_path / "d")
    breakage(root)
    with pytest.raises(DataError, match=message):
        scan_imagefolder(root)


def test_corrupt_files_are_skipped_and_listed(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    (root / "train" / "ants" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "train" / "ants" / "notes.txt").write_text("hello")
    layout = scan_imagefolder(root)
    assert [s["path"] for s in layout.skipped] == ["train/ants/notes.txt"]
    cache, failures = decode_split(layout.train.paths, layout.train.labels, "train", 32, 0,
                                   progress=False)
    assert [p.name for p, _ in failures] == ["broken.jpg"]
    assert "cannot decode" in failures[0][1]
    assert len(cache) == len(layout.train.paths) - 1
    assert cache.images.dtype.is_floating_point is False and cache.images.shape[1:] == (3, 37, 37)


def test_eval_transform_matches_torchvision(tmp_path):
    """Our decode-time eval crop equals torchvision's Resize(256) + CenterCrop(224) on a photo."""
    from torchvision import transforms

    path = next((HYMENOPTERA / "val" / "bees").glob("*.jpg"))
    ours = eval_transform(Image.open(path), 224).astype(np.int16)
    ref = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    theirs = np.asarray(ref(Image.open(path).convert("RGB"))).astype(np.int16)
    assert ours.shape == theirs.shape == (224, 224, 3)
    assert np.abs(ours - theirs).max() <= 1  # rounding only
