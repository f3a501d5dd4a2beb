"""Preprocessing and decoding: the one function both formats and the served model use."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from fowlflow.data.images import (ImageDecodeError, Preprocessing, load_image, preprocess,
                                  resize_and_crop)
from tests.conftest import TURKEY
from tests.image_samples import BLUE, RED, gray16_png, sideways_jpeg, top_and_bottom
from tests.registry.conftest import hymenoptera_images


@pytest.mark.parametrize("size", [224, 32])
def test_preprocess_matches_torchvision_eval_transform(size):
    from torchvision import transforms

    prep = Preprocessing(image_size=size, resize_size=round(size * 256 / 224))
    tv = transforms.Compose([transforms.Resize(prep.resize_size), transforms.CenterCrop(size)])
    for path in [TURKEY, *hymenoptera_images(2)]:
        with Image.open(path) as img:
            expected = np.asarray(tv(img.convert("RGB")))
        np.testing.assert_array_equal(preprocess(path, prep), expected, err_msg=str(path))


def test_path_bytes_base64_datauri_and_pil_give_the_same_pixels():
    prep = Preprocessing(image_size=64, resize_size=73)
    raw = TURKEY.read_bytes()
    b64 = base64.b64encode(raw).decode()
    sources = [str(TURKEY), TURKEY, raw, b64, b64.encode(), f"data:image/jpeg;base64,{b64}",
               io.BytesIO(raw), Image.open(TURKEY)]
    first, *others = [preprocess(source, prep) for source in sources]
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    for i, pixels in enumerate(others, 1):
        np.testing.assert_array_equal(pixels, first, err_msg=f"source {i}")


def test_small_and_odd_images_are_padded_like_torchvision():
    prep = Preprocessing(image_size=32, resize_size=37)
    for size in [(5, 90), (37, 37), (300, 20)]:
        buf = io.BytesIO()
        Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
        out = preprocess(buf.getvalue(), prep)
        assert out.shape == (32, 32, 3)


@pytest.mark.parametrize("source, fragment", [
    (b"\xff\xd8\xff\xe0 truncated jpeg", "is not a readable image"),
    ("hello, not an image", "no such image file"),
    (base64.b64encode(b"plain text, no picture").decode(), "is not a readable image"),
    ("/no/such/file.jpg", "no such image file"),
    (12345, "unsupported input type int"),
])
def test_bad_inputs_raise_a_clear_error(source, fragment):
    prep = Preprocessing(image_size=32, resize_size=37)
    with pytest.raises(ImageDecodeError) as err:
        preprocess(source, prep)
    assert fragment in err.value.message, err.value.message


def test_served_16bit_grayscale_png_is_gray_not_white(tmp_path):
    prep = Preprocessing(image_size=32, resize_size=37)
    path = tmp_path / "scan.png"
    expected = resize_and_crop(Image.fromarray(gray16_png(path)).convert("RGB"), prep)
    served = preprocess(base64.b64encode(path.read_bytes()).decode(), prep, allow_paths=False)
    np.testing.assert_array_equal(served, expected)  # a gradient, not 255 everywhere
    assert served.std() > 50


def test_served_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    prep = Preprocessing(image_size=32, resize_size=37)
    path = tmp_path / "portrait.jpg"
    sideways_jpeg(path)
    with Image.open(path) as pil:
        sources = [base64.b64encode(path.read_bytes()).decode(), path, pil]
        for source in sources:
            top, bottom = top_and_bottom(preprocess(source, prep))
            assert np.abs(top - RED).max() < 25 and np.abs(bottom - BLUE).max() < 25, (top, bottom)
        assert pil.size == (60, 40)  # the caller's image is left as it was


def test_served_image_over_the_pixel_limit_is_a_clear_error(monkeypatch):
    prep = Preprocessing(image_size=32, resize_size=37)
    pngs = []
    for size in [(100, 150), (200, 150)]:
        buf = io.BytesIO()
        Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    monkeypatch.setenv("FOWLFLOW_MAX_IMAGE_PIXELS", "20000")
    assert preprocess(pngs[0], prep).shape == (32, 32, 3)  # 15,000 pixels: under the limit
    with pytest.raises(ImageDecodeError) as err:
        preprocess(pngs[1], prep)
    assert err.value.message == (
        f"{len(pngs[1])} bytes {pngs[1][:12]!r}: 200x150 = 30,000 pixels, over the "
        "decode limit of 20,000 pixels; downscale the image, or raise FOWLFLOW_MAX_IMAGE_PIXELS")
    assert err.value.get_http_status_code() == 400


def test_paths_are_not_read_when_serving():
    with pytest.raises(ImageDecodeError, match="neither image bytes nor base64"):
        load_image(str(TURKEY), allow_paths=False)


def test_preprocessing_from_metadata_needs_image_size():
    from fowlflow.errors import RegistryError

    prep = Preprocessing.from_metadata({"image_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3})
    assert prep.resize_size == 256 and prep.mean == (0.5, 0.5, 0.5)
    with pytest.raises(RegistryError, match="no 'image_size'"):
        Preprocessing.from_metadata({"class_names": ["a"]})


def test_parity_images_cover_every_class_and_skip_unreadable_files(tmp_path):
    from fowlflow.registry.parity import compare, load_parity_images
    from tests.conftest import make_imagefolder

    val = make_imagefolder(tmp_path, per_class=(1, 5)) / "val"
    (val / "ants" / "ants_0.jpg").write_bytes(b"\xff\xd8\xff broken")
    prep = Preprocessing(image_size=32, resize_size=37)
    pixels, used = load_parity_images(val, prep, max_images=4)
    assert pixels.shape == (4, 32, 32, 3)
    assert sorted(p.parent.name for p in used) == ["ants", "ants", "bees", "bees"]
    assert all(p.name != "ants_0.jpg" for p in used)
    p = np.array([[0.6, 0.4], [0.2, 0.8]], dtype=np.float32)
    assert compare(p, p + 5e-5).passed
    assert not compare(p, p + 2e-4).passed  # probabilities too far apart
    assert not compare(p, p[:, ::-1]).passed  # top-1 flipped
