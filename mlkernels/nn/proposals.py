"""Anchor and proposal layers (RLSD's localization layer) on mlkernels.ops.

``AnchorGenerator`` is torchvision's ``AnchorGenerator`` for one feature level; ``ProposalLayer`` is
the RPN head (3x3 conv + ReLU + 1x1 conv predicting (4 + 1) k values per cell) followed by the
fused, batched :func:`mlkernels.ops.propose` instead of torchvision's per-image loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import _checks as C
from ..ops.boxes import DEFAULT_CLAMP
from ..ops.proposals import ProposeConfig


class AnchorGenerator(nn.Module):
    """Anchors for one feature map, as torchvision's ``AnchorGenerator`` with one level.

    Args:
        sizes: anchor sizes (square root of the area) in image pixels.
        aspect_ratios: height / width ratios; k = len(sizes) * len(aspect_ratios) per cell.
        stride: image pixels per feature cell (a number or (h, w)); None derives it in
            ``forward`` from the image size, as torchvision does (``image_size // feature_size``).

    Shape:
        forward(features: Tensor[N, C, H, W], image_size=None, *, dtype=None)
        -> Tensor[H * W * k, 4]: (x1, y1, x2, y2), cell-major then anchor, on the features'
        device, in ``dtype`` (default: the features' dtype).

    Anchors are cached per map geometry and settings; each call returns a copy of the cached
    tensor, so editing a result in place never changes a later one, and a first call under
    ``torch.inference_mode()`` does not leave an inference tensor behind for training.
    """

    def __init__(
        self,
        sizes: Sequence[float] = (32, 64, 128, 256),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        stride: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.sizes = tuple(C.as_floats("AnchorGenerator", "sizes", sizes))
        self.aspect_ratios = tuple(C.as_floats("AnchorGenerator", "aspect_ratios", aspect_ratios))
        if not (self.sizes and self.aspect_ratios) or not all(
            math.isfinite(v) and v > 0 for v in self.sizes + self.aspect_ratios
        ):
            raise ValueError(
                "AnchorGenerator: sizes and aspect_ratios must be non-empty, finite and positive, "
                f"got sizes={self.sizes}, aspect_ratios={self.aspect_ratios}"
            )
        self.stride = stride
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.sizes) * len(self.aspect_ratios)

    def forward(
        self,
        features: Tensor,
        image_size: Sequence[int] | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        C.check_tensor("AnchorGenerator", "features", features)
        if features.dim() < 2:
            raise ValueError(
                "AnchorGenerator: features must be Tensor[..., H, W], "
                f"got Tensor[{', '.join(str(d) for d in features.shape)}]"
            )
        height, width = features.shape[-2:]
        dtype = dtype or features.dtype
        stride = self.stride
        if stride is None:
            if image_size is None:
                raise ValueError(
                    "AnchorGenerator: image_size must be given when stride is None, got None"
                )
            image_h, image_w = _image_hw(image_size)
            if image_h < height or image_w < width:
                raise ValueError(
                    f"AnchorGenerator: image_size must be at least the feature map's size "
                    f"({height}, {width}) to derive a stride, got {(image_h, image_w)}"
                )
            # max(.., 1): an empty map has no anchors whatever the stride.
            stride = (image_h // max(height, 1), image_w // max(width, 1))
        stride_key = tuple(stride) if isinstance(stride, Sequence) else stride
        # Everything the anchors depend on, the settings included: changing sizes after a call
        # must not return stale anchors.
        key = (height, width, stride_key, tuple(self.sizes), tuple(self.aspect_ratios), dtype)
        key = key + (features.device,)
        anchors = self._cache.get(key)
        if anchors is None:
            if len(self._cache) >= 16:  # bounded when the input size varies (multi-scale)
                self._cache.clear()
            # Made outside inference mode, so that the cached tensor can serve training later.
            with torch.inference_mode(False):
                anchors = ops.generate_anchors(
                    (height, width),
                    stride,
                    self.sizes,
                    self.aspect_ratios,
                    dtype=dtype,
                    device=features.device,
                )
            self._cache[key] = anchors
        # A copy: the caller may edit its anchors in place (a few hundred kB, far below the conv).
        return anchors.clone()

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}, stride={self.stride}"


def _image_hw(image_size: object) -> tuple[int, int]:
    """(height, width) of an image size given as two numbers (a tuple, list or Tensor[2])."""
    if isinstance(image_size, Tensor):
        image_size = image_size.tolist()
    op, arg = "AnchorGenerator", "image_size"
    if not isinstance(image_size, Sequence) or isinstance(image_size, str) or len(image_size) != 2:
        raise TypeError(f"{op}: {arg} must be (height, width), got {image_size!r}")
    height, width = (C.as_float(op, arg, v) for v in image_size)
    if not (math.isfinite(height) and math.isfinite(width)):
        raise ValueError(f"{op}: {arg} must be finite, got {image_size!r}")
    return int(height), int(width)


class Proposals(NamedTuple):
    """What ProposalLayer returns: the proposals and the raw predictions (for training losses)."""

    boxes: Tensor  # [N, P, 4]
    scores: Tensor  # [N, P]
    counts: Tensor  # [N] int64
    objectness: Tensor  # [N, H * W * k] logits
    deltas: Tensor  # [N, H * W * k, 4]
    anchors: Tensor  # [H * W * k, 4]


class ProposalLayer(nn.Module):
    """RLSD's localization layer: an RPN head and the fused proposal op.

    A 3x3 conv (``hidden`` channels) + ReLU, then a 1x1 conv with (1 + 4) k outputs per cell
    (k objectness logits, then k (dx, dy, dw, dh)), decoded against ``AnchorGenerator``'s anchors
    and filtered by :func:`mlkernels.ops.propose` for all images at once.

    Args:
        in_channels: channels of the feature map.
        sizes, aspect_ratios, stride: of the anchors (see :class:`AnchorGenerator`).
        hidden: channels of the 3x3 conv.
        config: the settings of :func:`mlkernels.ops.propose` (a
            :class:`mlkernels.ops.ProposeConfig`); any of its fields may also be given by
            keyword (``post_nms_top_n=256``), overriding ``config``'s.

    Shape:
        forward(features: Tensor[N, C, H, W], image_sizes: Tensor[N, 2] or list of (h, w),
        config: ProposeConfig | None = None) -> Proposals(boxes [N, P, 4], scores [N, P],
        counts [N], objectness [N, HWk], deltas [N, HWk, 4], anchors [HWk, 4]). The boxes carry
        gradients to the head's deltas. A float16/bfloat16 head (autocast) gets its predictions
        converted to float32 for the proposals. ``config``, when given, replaces the layer's own
        settings for this call (e.g. a model that keeps other proposals at test time).
    """

    def __init__(
        self,
        in_channels: int,
        sizes: Sequence[float] = (32, 64, 128, 256),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        stride: float | Sequence[float] = 16,
        *,
        hidden: int = 256,
        config: ProposeConfig | None = None,
        **settings,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("hidden", hidden)):
            if C.as_int("ProposalLayer", name, value) <= 0:
                raise ValueError(f"ProposalLayer: {name} must be positive, got {value}")
        self.config = ProposeConfig.make(config, settings)
        self.anchor_generator = AnchorGenerator(sizes, aspect_ratios, stride)
        k = self.anchor_generator.num_anchors_per_location
        try:
            self.conv = nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1)
            self.predict = nn.Conv2d(hidden, 5 * k, kernel_size=1)
        except RuntimeError as error:  # weights far beyond memory
            raise RuntimeError(
                f"ProposalLayer: the head's weights (in_channels={in_channels}, hidden={hidden}, "
                f"k={k}) could not be allocated ({str(error).strip().splitlines()[0]})"
            ) from None
        for layer in (self.conv, self.predict):  # torchvision's RPNHead initialization
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    def forward(
        self,
        features: Tensor,
        image_sizes: Tensor | Sequence[Sequence[int]],
        config: ProposeConfig | None = None,
    ) -> Proposals:
        if not isinstance(features, Tensor) or features.dim() != 4:
            got = (
                f"Tensor[{', '.join(map(str, features.shape))}]"
                if isinstance(features, Tensor)
                else type(features).__name__
            )
            raise ValueError(f"ProposalLayer: features must be Tensor[N, C, H, W], got {got}")
        weight = self.conv.weight
        C.check(
            features.shape[1] == weight.shape[1],
            f"ProposalLayer: features must have in_channels = {weight.shape[1]} channels, "
            f"got {C.shape_str(features)}",
        )
        C.check_same_device("ProposalLayer", "the layer's weights", weight, "features", features)
        autocast = torch.is_autocast_enabled(features.device.type)
        C.check(
            features.dtype == weight.dtype or (autocast and features.is_floating_point()),
            f"ProposalLayer: features must have the dtype of the layer's weights "
            f"({C.dtype_str(weight.dtype)}), got {C.dtype_str(features.dtype)}",
        )
        n, _, height, width = features.shape
        k = self.anchor_generator.num_anchors_per_location
        try:
            out = self.predict(torch.relu(self.conv(features)))  # [N, 5k, H, W]
        except RuntimeError as error:  # checked above: what is left is memory
            raise RuntimeError(
                f"ProposalLayer: features {C.shape_str(features)} could not be run through the "
                f"head ({str(error).strip().splitlines()[0]})"
            ) from None
        # Cell-major, then anchor: the order of the anchors.
        objectness = out[:, :k].permute(0, 2, 3, 1).reshape(n, height * width * k)
        deltas = out[:, k:].reshape(n, k, 4, height, width).permute(0, 3, 4, 1, 2)
        deltas = deltas.reshape(n, height * width * k, 4)  # explicit sizes: n may be 0
        if deltas.dtype in (torch.float16, torch.bfloat16):
            # Half-precision heads (autocast): box coordinates in pixels need float32.
            deltas, objectness = deltas.float(), objectness.float()
        anchors = self.anchor_generator(features, dtype=deltas.dtype)
        boxes, scores, counts = ops.propose(
            anchors,
            deltas,
            objectness.detach(),  # as torchvision's RPN: no gradient through the ranking
            image_sizes,
            self.config if config is None else ProposeConfig.make(config, {}),
        )
        return Proposals(boxes, scores, counts, objectness, deltas, anchors)

    def extra_repr(self) -> str:
        k = self.anchor_generator.num_anchors_per_location
        settings = []
        for field in dataclasses.fields(ProposeConfig):
            value = getattr(self.config, field.name)
            if field.name == "clamp" and value == DEFAULT_CLAMP:
                value = "log(1000/16)"
            settings.append(f"{field.name}={value}")
        return f"k={k}, " + ", ".join(settings)


__all__ = ["AnchorGenerator", "ProposalLayer", "Proposals"]
