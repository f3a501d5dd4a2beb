"""ImageFolder layout checks and decoding: bad layouts fail clearly, bad files are skipped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
from PIL import Image

from fowlflow.errors import DataError
from fowlflow.trainer.image_cache import decode_split, eval_transform
from fowlflow.trainer.imagefolder import scan_imagefolder
from tests.conftest import HYMENOPTERA, make_imagefolder

CAFE_NFC, CAFE_NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


def test_hymenoptera_layout_and_its_gif(tmp_path):
    layout = scan_imagefolder(HYMENOPTERA)
    assert layout.classes == ["ants", "bees"]
    assert len(layout.train.paths) == 244 and len(layout.val.paths) == 153
    assert [s["path"] for s in layout.skipped] == ["train/ants/imageNotFound.gif"]
    assert any(p.suffix == ".jpeg" for p in layout.train.paths)
    # The digest of an existing image set never changes (chunked hashing, NFC paths: same bytes).
    assert (layout.train_digest, layout.val_digest, layout.digest) == (
        "9af94bff37da7da5", "c83f2bff4df523b7", "72fb4dfea133b075")


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


def test_class_names_in_nfc_and_nfd_are_one_class(tmp_path):
    """train/café in NFC, val/café in NFD (as macOS may write it): one class, named in NFC."""
    nfc = scan_imagefolder(make_imagefolder(tmp_path / "nfc", classes=(CAFE_NFC, "bar")))
    root = make_imagefolder(tmp_path / "mixed", classes=(CAFE_NFC, "bar"))
    (root / "val" / CAFE_NFC).rename(root / "val" / CAFE_NFD)
    assert sorted(os.listdir(root / "val")) == sorted(["bar", CAFE_NFD])  # really NFD on disk
    layout = scan_imagefolder(root)
    assert layout.classes == ["bar", CAFE_NFC]
    val_cafe = [p for p, label in zip(layout.val.paths, layout.val.labels) if label == 1]
    assert len(val_cafe) == 4 and all(p.parent.name == CAFE_NFD for p in val_cafe)
    assert layout.digest == nfc.digest  # same images, same digest


def test_two_folders_equal_after_nfc_are_refused(tmp_path):
    root = make_imagefolder(tmp_path / "d", classes=(CAFE_NFC, "bar"))
    shutil.copytree(root / "train" / CAFE_NFC, root / "train" / CAFE_NFD)
    with pytest.raises(DataError) as err:
        scan_imagefolder(root)
    assert err.value.message == (
        f"{root / 'train'} has two class folders whose names differ only in Unicode form: "
        "'cafe\\u0301' and 'caf\\xe9' (both 'café' in NFC). Move the images of one into the "
        "other and delete the empty folder.")


def test_unreadable_val_class_error_lists_each_file_and_why(tmp_path, tracking_uri):
    """`python -m fowlflow.trainer` on a set whose val/bees images are all unreadable."""
    root = make_imagefolder(tmp_path / "d")
    for path in (root / "val" / "bees").iterdir():
        path.write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "val" / "bees" / "clip.png").write_bytes(b"\x89PNG truncated")
    proc = subprocess.run(
        [sys.executable, "-m", "fowlflow.trainer", "--data", str(root), "--weights", "none",
         "--image_size", "32", "--workers", "0", "--num_epochs", "1",
         "--output_dir", str(tmp_path / "out"), "--registered_model_name", ""],
        cwd=tmp_path, env=os.environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    error = proc.stderr[proc.stderr.index("fowlflow: error: "):]
    assert error.startswith(f"fowlflow: error: val/ has no readable image for class(es) ['bees'] "
                            f"in {root}. Every file there was skipped:\n")
    listed = [line for line in error.splitlines() if line.startswith("  val/bees/")]
    assert [line.split(":")[0].strip() for line in listed] == [
        "val/bees/bees_0.jpg", "val/bees/bees_1.jpg", "val/bees/bees_2.jpg",
        "val/bees/bees_3.jpg", "val/bees/clip.png"]
    assert all("cannot decode: " in line for line in listed), listed
    assert "Replace those files with readable images" in error
