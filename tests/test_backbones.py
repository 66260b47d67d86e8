"""models.backbones: the packaged EfficientNet-Lite0 ImageNet weights load right (the issue's
acceptance tests: skimage's cat and coffee), every backbone's map has the documented channels,
stride and size, torchvision state-dict files round-trip, bad names and files give clear errors,
and gradients flow."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from torch import nn

from models.backbones import (
    Backbone,
    backbone_names,
    build_backbone,
    imagenet_classifier,
    packaged_efficientnet_lite0_path,
)

# The specification (the issue): name -> (channels, default stride, map size rounds down).
SPEC = {
    "efficientnet_lite0": (1280, 32, False),
    "resnet18": (512, 32, False),
    "resnet34": (512, 32, False),
    "resnet50": (2048, 32, False),
    "resnet101": (2048, 32, False),
    "vgg16": (512, 16, True),
    "small_cnn": (128, 16, False),
}
CAT_CLASSES = {"Egyptian cat", "tiger cat", "tabby"}


@pytest.fixture(scope="module")
def classifier():
    return imagenet_classifier()


@pytest.fixture(scope="module")
def packaged_tensors() -> dict[str, torch.Tensor]:
    return torch.load(packaged_efficientnet_lite0_path(), map_location="cpu", weights_only=True)


def top1(classifier, image: np.ndarray) -> tuple[str, float]:
    with torch.no_grad():
        probabilities = classifier(classifier.preprocess(image)).softmax(-1)[0]
    index = int(probabilities.argmax())
    return classifier.class_names[index], float(probabilities[index])


# ---- the packaged ImageNet weights --------------------------------------------------------------


def test_pretrained_classifier_sees_the_cat(classifier):
    name, probability = top1(classifier, skimage.data.chelsea())
    assert name in CAT_CLASSES, (name, probability)
    assert probability > 0.5


def test_pretrained_classifier_sees_the_espresso(classifier):
    name, probability = top1(classifier, skimage.data.coffee())
    assert name == "espresso", (name, probability)
    assert probability > 0.5


def test_classifier_attributes(classifier):
    assert not classifier.training
    assert len(classifier.class_names) == 1000
    assert classifier.class_names[967] == "espresso"
    image = skimage.data.chelsea()
    pixels = classifier.preprocess(image)
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == torch.float32
    assert 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    with pytest.raises(ValueError, match="preprocess: image must be a uint8"):
        classifier.preprocess(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"preprocess: image must be H x W x 3.*\(10, 10\)"):
        classifier.preprocess(np.zeros((10, 10), np.uint8))


def test_all_296_packaged_tensors_are_loaded(classifier, packaged_tensors):
    network = classifier.network
    loaded = network.state_dict()
    assert len(packaged_tensors) == 296 and len(loaded) == 296
    for (file_key, expected), (key, tensor) in zip(
        packaged_tensors.items(), loaded.items(), strict=True
    ):
        assert torch.equal(tensor, expected), (file_key, key)
    # A few by name, independently of the order the loader relies on.
    assert torch.equal(network.conv_stem.weight, packaged_tensors["_conv_stem.weight"])
    assert torch.equal(
        network.blocks[6][0].conv_pwl.weight, packaged_tensors["_blocks.15._project_conv.weight"]
    )
    assert torch.equal(network.bn2.running_var, packaged_tensors["_bn1.running_var"])
    assert torch.equal(network.classifier.bias, packaged_tensors["_fc.bias"])
    norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 49 and all(m.eps == 1e-3 for m in norms)


def test_normalization_fits_the_stem_batchnorm_statistics(classifier):
    # The stem BatchNorm's running variance is the stem convolution's output variance on the
    # training images as the weights were trained on them: with the right normalization, natural
    # photographs come close to it; with ImageNet's mean/std (2.2x larger inputs) they do not.
    photos = [
        skimage.data.chelsea(),
        skimage.data.coffee(),
        skimage.data.astronaut(),
        skimage.data.rocket(),
        skimage.data.stereo_motorcycle()[0],
    ]
    pixels = torch.cat([classifier.preprocess(photo) for photo in photos])
    imagenet = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    network = classifier.network
    log_ratios = []
    for mean, std in [(classifier.mean, classifier.std), imagenet]:
        with torch.no_grad():
            stem = network.conv_stem((pixels - mean) / std)
        log_ratios.append(float((stem.var((0, 2, 3)) / network.bn1.running_var).log().median()))
    ours, imagenets = log_ratios
    assert abs(ours) < 0.6 and imagenets > 1.0, log_ratios


def test_pretrained_efficientnet_backbone_is_the_classifier_body(classifier, packaged_tensors):
    backbone = build_backbone("efficientnet_lite0").eval()
    assert backbone.pretrained and backbone.channels == 1280 and backbone.stride == 32
    assert torch.equal(backbone.body.model.conv_head.weight, packaged_tensors["_conv_head.weight"])
    images = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = backbone(images)
        normalized = (images - classifier.mean) / classifier.std
        expected = classifier.network.forward_features(normalized)
    assert features.shape == (1, 1280, 3, 3)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_efficientnet_loads_a_timm_layout_file(classifier, tmp_path):
    path = tmp_path / "timm_layout.pth"
    torch.save(classifier.network.state_dict(), path)
    backbone = build_backbone("efficientnet_lite0", pretrained=path, out_stride=16)
    assert backbone.pretrained
    model = backbone.body.model
    assert torch.equal(
        model.blocks[3][1].conv_dw.weight, classifier.network.blocks[3][1].conv_dw.weight
    )
    assert torch.equal(model.bn2.running_mean, classifier.network.bn2.running_mean)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            "reshape",
            r"tensor #\d+ '_blocks\.3\._depthwise_conv\.weight' \[144, 1, 3, 3\] does not fit",
        ),
        (
            "drop",
            r"tensor #\d+ '_blocks\.0\._bn1\.running_var' .* "
            r"does not fit 'blocks\.0\.0\.bn1\.running_mean'",
        ),
        ("truncate", r"has 200 tensors, expected 294"),
    ],
    ids=["reshape", "drop", "truncate"],
)
def test_mismatched_efficientnet_file_is_refused(packaged_tensors, tmp_path, damage, message):
    tensors = dict(packaged_tensors)
    if damage == "reshape":
        assert tensors["_blocks.3._depthwise_conv.weight"].shape == (144, 1, 5, 5)
        tensors["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)
    elif damage == "drop":
        del tensors["_blocks.0._bn1.running_mean"]
    else:
        tensors = dict(list(tensors.items())[:200])
    path = tmp_path / "damaged.pth"
    torch.save(tensors, path)
    with pytest.raises(RuntimeError, match=message) as error:
        build_backbone("efficientnet_lite0", pretrained=path)
    assert str(path) in str(error.value) and "first mismatch" in str(error.value)


# ---- shapes -------------------------------------------------------------------------------------


def expected_size(size: int, stride: int, floor: bool) -> int:
    return size // stride if floor else math.ceil(size / stride)


@pytest.mark.parametrize(
    "name, out_stride, sizes",
    [
        ("efficientnet_lite0", None, [(64, 64), (33, 70)]),
        ("efficientnet_lite0", 16, [(47, 64)]),
        ("efficientnet_lite0", 8, [(33, 40)]),
        ("resnet18", None, [(64, 64), (33, 70)]),
        ("resnet34", None, [(33, 40)]),
        ("resnet50", None, [(33, 40)]),
        ("resnet50", 16, [(33, 40)]),
        ("resnet50", 8, [(17, 23)]),
        ("resnet101", None, [(64, 71)]),
        ("vgg16", None, [(64, 71)]),
        ("small_cnn", None, [(64, 64), (97, 130), (8, 5)]),
        ("small_cnn", 8, [(97, 130)]),
    ],
)
def test_feature_map_shapes(name, out_stride, sizes):
    channels, default_stride, floor = SPEC[name]
    stride = out_stride or default_stride
    torch.manual_seed(0)
    backbone = build_backbone(name, pretrained=False, out_stride=out_stride).eval()
    assert isinstance(backbone, Backbone)
    assert (backbone.name, backbone.channels, backbone.stride) == (name, channels, stride)
    assert backbone.pretrained is False
    for height, width in sizes:
        with torch.no_grad():
            features = backbone(torch.rand(1, 3, height, width))
        expected = (expected_size(height, stride, floor), expected_size(width, stride, floor))
        assert backbone.output_size(height, width) == expected
        assert features.shape == (1, channels, *expected), (height, width)
        assert features.dtype == torch.float32 and torch.isfinite(features).all()


def test_backbone_names():
    assert backbone_names() == list(SPEC)


# ---- files in torchvision's layout --------------------------------------------------------------


def randomized_resnet18() -> nn.Module:
    network = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for name, buffer in network.named_buffers():
            if "running" in name:  # nonzero mean, var != 1, so the buffers are checked too
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    return network.eval()


def test_torchvision_resnet18_file_round_trips(tmp_path):
    torch.manual_seed(1)
    network = randomized_resnet18()
    path = tmp_path / "resnet18.pth"
    state = network.state_dict()
    torch.save(state, path)
    torch.manual_seed(2)
    backbone = build_backbone("resnet18", pretrained=path).eval()
    assert backbone.pretrained
    body = backbone.body.state_dict()
    assert len(body) == len(state) - 2  # all but fc.weight and fc.bias
    for key, tensor in body.items():
        assert torch.equal(tensor, state[key]), key
    images = torch.rand(1, 3, 64, 48)
    with torch.no_grad():
        x = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]
        ).view(1, 3, 1, 1)
        x = network.maxpool(network.relu(network.bn1(network.conv1(x))))
        expected = network.layer4(network.layer3(network.layer2(network.layer1(x))))
        torch.testing.assert_close(backbone(images), expected)


def test_torchvision_classifier_file(tmp_path):
    torch.manual_seed(3)
    network = randomized_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(network.state_dict(), path)
    classifier = imagenet_classifier("resnet18", weights=path)
    assert not classifier.training and classifier.resize == "shorter_256_crop_224"
    pixels = classifier.preprocess(skimage.data.coffee())
    assert pixels.shape == (1, 3, 224, 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(classifier(pixels), network((pixels - mean) / std))


def test_vgg16_takes_torchvision_names(tmp_path):
    with torch.device("meta"):  # the names and shapes without initializing 138M parameters
        layout = torchvision.models.vgg16(weights=None).state_dict()
    generator = torch.Generator().manual_seed(4)
    state = {
        key: torch.randn(tensor.shape, generator=generator)
        for key, tensor in layout.items()
        if key.startswith("features.") or key == "classifier.6.bias"
    }
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    backbone = build_backbone("vgg16", pretrained=path)
    body = backbone.body.state_dict()
    assert set(body) == {key for key in state if key.startswith("features.")}
    assert all(torch.equal(tensor, state[key]) for key, tensor in body.items())


def test_small_cnn_state_round_trips(tmp_path):
    torch.manual_seed(5)
    first = build_backbone("small_cnn", pretrained=False)
    torch.manual_seed(5)
    again = build_backbone("small_cnn", pretrained=False)
    torch.manual_seed(6)
    other = build_backbone("small_cnn", pretrained=False)
    weight = "0.0.0.weight"
    assert torch.equal(first.body.state_dict()[weight], again.body.state_dict()[weight])
    assert not torch.equal(first.body.state_dict()[weight], other.body.state_dict()[weight])
    other.load_state_dict(first.state_dict())  # a trainer checkpoint: strict, no mean/std keys
    assert torch.equal(other.body.state_dict()[weight], first.body.state_dict()[weight])
    path = tmp_path / "small.pth"
    torch.save({"state_dict": first.body.state_dict(), "epoch": 3}, path)  # a wrapped one
    loaded = build_backbone("small_cnn", pretrained=str(path))
    assert loaded.pretrained
    assert torch.equal(loaded.body.state_dict()[weight], first.body.state_dict()[weight])


# ---- errors -------------------------------------------------------------------------------------


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'; expected one of ") as error:
        build_backbone("resnet19")
    assert all(name in str(error.value) for name in SPEC)
    with pytest.raises(ValueError, match="no ImageNet network 'small_cnn'"):
        imagenet_classifier("small_cnn")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16"])
def test_pretrained_true_without_packaged_weights(name):
    with pytest.raises(ValueError, match="pretrained=PATH.*torchvision.*pretrained=False"):
        build_backbone(name)
    with pytest.raises(ValueError, match="weights=PATH"):
        imagenet_classifier(name)


def test_small_cnn_has_no_pretrained_weights():
    with pytest.raises(
        ValueError, match="small_cnn has no pretrained weights; pass pretrained=False"
    ):
        build_backbone("small_cnn", pretrained=True)


def test_out_stride_refused():
    with pytest.raises(ValueError, match=r"out_stride must be one of \(32,\) .*BasicBlock.*got 16"):
        build_backbone("resnet18", pretrained=False, out_stride=16)
    with pytest.raises(ValueError, match=r"'vgg16'\): out_stride must be one of \(16,\)"):
        build_backbone("vgg16", pretrained=False, out_stride=32)


def test_bad_files(tmp_path):
    missing = tmp_path / "absent.pth"
    with pytest.raises(
        FileNotFoundError, match=r"build_backbone\('resnet18'\): pretrained=.*absent"
    ):
        build_backbone("resnet18", pretrained=missing)
    with pytest.raises(
        FileNotFoundError, match=r"imagenet_classifier\('vgg16'\): weights=.*absent"
    ):
        imagenet_classifier("vgg16", weights=missing)
    with pytest.raises(TypeError, match="pretrained must be True, False or a path, got int"):
        build_backbone("resnet18", pretrained=1)
    not_state = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_state)
    with pytest.raises(RuntimeError, match=f"{not_state}.*is not a state dict"):
        build_backbone("resnet18", pretrained=not_state)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match=f"cannot read {garbage}"):
        build_backbone("small_cnn", pretrained=garbage)


def resnet18_file(tmp_path: Path, change) -> Path:
    torch.manual_seed(7)
    state = torchvision.models.resnet18(weights=None).state_dict()
    change(state)
    path = tmp_path / "changed.pth"
    torch.save(state, path)
    return path


def test_mismatched_torchvision_files(tmp_path):
    def reshape(state):
        state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)

    def drop(state):
        del state["layer3.1.bn2.running_var"]

    def add(state):
        state["layer5.0.conv1.weight"] = torch.zeros(1)

    cases = [
        (
            reshape,
            r"'layer2\.0\.conv1\.weight' of shape \[128, 64, 1, 1\], expected \[128, 64, 3, 3\]",
        ),
        (drop, r"lacks the tensor 'layer3\.1\.bn2\.running_var'"),
        (add, r"has the tensor 'layer5\.0\.conv1\.weight', which this network does not"),
    ]
    for change, message in cases:
        path = resnet18_file(tmp_path, change)
        with pytest.raises(RuntimeError, match=message) as error:
            build_backbone("resnet18", pretrained=path)
        assert str(path) in str(error.value)
    # resnet18's file is not resnet34's.
    path = resnet18_file(tmp_path, lambda state: None)
    with pytest.raises(RuntimeError, match=r"lacks the tensor 'layer1\.2\.conv1\.weight'"):
        build_backbone("resnet34", pretrained=path)


def test_forward_checks_images():
    backbone = build_backbone("small_cnn", pretrained=False)
    with pytest.raises(ValueError, match=r"Backbone\(small_cnn\): images must be .*torch.uint8"):
        backbone(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got torch.float32 Tensor\[1, 1, 16, 16\]"):
        backbone(torch.zeros(1, 1, 16, 16))


# ---- gradients ----------------------------------------------------------------------------------


def test_gradients_flow_through_small_cnn():
    torch.manual_seed(8)
    backbone = build_backbone("small_cnn", pretrained=False).train()
    images = torch.rand(2, 3, 40, 36, requires_grad=True)
    features = backbone(images)
    (features * torch.randn_like(features)).sum().backward()
    for name, parameter in backbone.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert images.grad is not None and images.grad.abs().sum() > 0
