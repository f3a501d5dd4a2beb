"""Decoding image items (issue 8): 16-bit PNGs, EXIF orientation, the decode pixel limit, and
memory that stays flat for huge images and huge non-image files. The trainer's validation
decode and the served model's preprocessing must give the same pixels. Files that fail to
decode are skipped and listed; a class left with none fails the run, naming each file."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fowlflow.data.imagefolder import scan_imagefolder
from fowlflow.data.images import Preprocessing, preprocess, resize_and_crop
from fowlflow.errors import ConfigError
from fowlflow.trainer.image_cache import decode_split, eval_transform, resize_size, train_transform
from tests.conftest import HYMENOPTERA, ROOT, TURKEY, make_imagefolder
from tests.image_samples import RED, BLUE, gray16_png, huge_png, sideways_jpeg, top_and_bottom

SIZE = 32  # image_size; the train cache is resize_size(32) = 37 px square
PREP = Preprocessing(image_size=SIZE, resize_size=resize_size(SIZE))


def _decode(path: Path, mode: str):
    cache, failures = decode_split([path], [0], mode, SIZE, 0, progress=False)
    return cache, [reason for _, reason in failures]


def _served(path: Path) -> np.ndarray:
    """What `mlflow models serve` computes for the file sent as base64 JSON."""
    return preprocess(base64.b64encode(path.read_bytes()).decode(), PREP, allow_paths=False)


def _hwc(cache) -> np.ndarray:
    return cache.images[0].permute(1, 2, 0).numpy()


def test_16bit_grayscale_png_is_gray_not_white(tmp_path):
    path = tmp_path / "scan.png"
    expected = np.asarray(Image.fromarray(gray16_png(path)).convert("RGB"))
    val, _ = _decode(path, "val")
    reference = resize_and_crop(Image.fromarray(expected), PREP)
    np.testing.assert_array_equal(_hwc(val), reference)  # the gradient, not 255 everywhere
    assert 100 < _hwc(val).mean() < 155 and _hwc(val).std() > 50
    np.testing.assert_array_equal(_served(path), _hwc(val))
    train, _ = _decode(path, "train")
    ref_train = np.asarray(Image.fromarray(expected).resize((37, 37), Image.BILINEAR))
    np.testing.assert_array_equal(_hwc(train), ref_train)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "portrait.jpg"
    sideways_jpeg(path)
    train, _ = _decode(path, "train")
    assert train.aspect[0].item() == pytest.approx(40 / 60)  # upright portrait, not 60/40
    val, _ = _decode(path, "val")
    for pixels in (_hwc(train), _hwc(val)):
        top, bottom = top_and_bottom(pixels)
        assert np.abs(top - RED).max() < 25 and np.abs(bottom - BLUE).max() < 25, (top, bottom)
    np.testing.assert_array_equal(_served(path), _hwc(val))


def _old_eval(path: Path) -> np.ndarray:  # the decode before issue 8, for normal images
    with Image.open(path) as img:
        return resize_and_crop(img.convert("RGB"), PREP)


def _old_train(path: Path) -> tuple[np.ndarray, float]:
    with Image.open(path) as img:
        img.draft("RGB", (37, 37))
        aspect = img.size[0] / img.size[1]
        return np.asarray(img.convert("RGB").resize((37, 37), Image.BILINEAR)), aspect


def test_normal_images_keep_exactly_their_pixels(tmp_path):
    """Photos, grayscale JPEGs, palette and RGBA PNGs decode to the same pixels as before."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8)).save(tmp_path / "gray.jpg")
    colour = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    colour.convert("P").save(tmp_path / "pal.png")
    Image.fromarray(rng.integers(0, 255, (30, 20, 4), dtype=np.uint8)).save(tmp_path / "rgba.png")
    paths = [TURKEY, *sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:3],
             *sorted(tmp_path.iterdir())]
    for path in paths:
        with Image.open(path) as img:
            np.testing.assert_array_equal(eval_transform(img, SIZE), _old_eval(path), str(path))
        with Image.open(path) as img:
            arr, aspect = train_transform(img, SIZE)
        old_arr, old_aspect = _old_train(path)
        np.testing.assert_array_equal(arr, old_arr, str(path))
        assert aspect == pytest.approx(old_aspect, rel=1e-2)


def test_pixel_limit_skips_big_images_and_drafts_big_jpegs(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    smooth = np.linspace(0, 255, 400 * 300 * 3).reshape(300, 400, 3).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    monkeypatch.setenv("FOWLFLOW_MAX_IMAGE_PIXELS", "20000")
    for mode in ("train", "val"):
        _, reasons = _decode(tmp_path / "big.png", mode)
        assert reasons == ["too large: 200x150 = 30,000 pixels, over the decode limit of 20,000 "
                           "pixels; downscale the image, or raise FOWLFLOW_MAX_IMAGE_PIXELS"]
        cache, reasons = _decode(tmp_path / "big.jpg", mode)  # decoded at 1/4 scale (100 x 75)
        assert reasons == [] and len(cache) == 1
    assert np.abs(_hwc(cache).astype(int) - _old_eval(tmp_path / "big.jpg")).mean() < 3
    np.testing.assert_array_equal(_served(tmp_path / "big.jpg"), _hwc(cache))
    monkeypatch.setenv("FOWLFLOW_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ConfigError, match="FOWLFLOW_MAX_IMAGE_PIXELS='lots' is invalid: set it "
                                          "to a whole number of pixels"):
        _decode(tmp_path / "big.jpg", "val")


_MEASURE = """
import json, resource, sys
from pathlib import Path
from fowlflow.data.imagefolder import scan_imagefolder
from fowlflow.data.images import ImageDecodeError, load_image
from fowlflow.trainer.image_cache import decode_split

def grown_mb():  # growth of the peak resident set since the imports
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {}
"""


def _measure(body: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _MEASURE + body, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_huge_png_decodes_in_bounded_memory(tmp_path):
    """13000 x 13000 (under PIL's bomb limit) used to take ~1.4 GB to decode; now it is skipped
    before decoding, by the trainer and by the served model."""
    path = tmp_path / "poster.png"
    huge_png(path, 13000, 13000)
    out = _measure("""
for mode in ("train", "val"):
    _, failures = decode_split([Path(sys.argv[1])], [0], mode, 224, 0, progress=False)
    out[mode] = [reason for _, reason in failures]
out["trainer_mb"] = grown_mb()
try:
    load_image(sys.argv[1])
except ImageDecodeError as exc:
    out["served"] = exc.message
out["served_mb"] = grown_mb()
print(json.dumps(out))
""", str(path))
    assert out["trainer_mb"] < 150 and out["served_mb"] < 150, out
    for mode in ("train", "val"):
        assert out[mode] == ["too large: 13000x13000 = 169,000,000 pixels, over the decode "
                             "limit of 64,000,000 pixels; downscale the image, or raise "
                             "FOWLFLOW_MAX_IMAGE_PIXELS"]
    assert "169,000,000 pixels, over the decode limit of 64,000,000" in out["served"]


def test_2gb_non_image_file_is_hashed_and_skipped_in_bounded_memory(tmp_path):
    """A 2 GiB file named like an image used to be read whole to hash it (peak +2 GB)."""
    root = make_imagefolder(tmp_path / "d")
    big = root / "train" / "ants" / "clip.jpg"
    with open(big, "wb") as f:
        f.truncate(2 << 30)  # sparse: no disk used
    out = _measure("""
layout = scan_imagefolder(Path(sys.argv[1]))
out["digest"] = layout.digest
out["scan_mb"] = grown_mb()
_, failures = decode_split(layout.train.paths, layout.train.labels, "train", 32, 0, progress=False)
out["failures"] = [(p.name, reason) for p, reason in failures]
try:
    load_image(sys.argv[2])
except ImageDecodeError as exc:
    out["served"] = exc.message
out["decode_mb"] = grown_mb()
print(json.dumps(out))
""", str(root), str(big))
    assert out["scan_mb"] < 150 and out["decode_mb"] < 150, out
    assert [name for name, _ in out["failures"]] == ["clip.jpg"]
    assert "cannot decode: UnidentifiedImageError" in out["failures"][0][1]
    assert "is not a readable image (UnidentifiedImageError" in out["served"]
    assert len(out["digest"]) == 16


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


def test_unreadable_val_class_error_lists_each_file_and_why(tmp_path, tracking_uri):
    """`python -m fowlflow.train` on a set whose val/bees images are all unreadable."""
    root = make_imagefolder(tmp_path / "d")
    for path in (root / "val" / "bees").iterdir():
        path.write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "val" / "bees" / "clip.png").write_bytes(b"\x89PNG truncated")
    proc = subprocess.run(
        [sys.executable, "-m", "fowlflow.train", "--data", str(root), "--weights", "none",
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
