"""ImageFolder layout checks: bad layouts fail clearly, unsupported files are listed, class
names are compared in Unicode NFC. (Decoding the images is tests/trainer/test_image_decode.py.)"""

from __future__ import annotations

import os
import shutil
import unicodedata

import pytest

from fowlflow.data.imagefolder import scan_imagefolder
from fowlflow.errors import DataError
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
