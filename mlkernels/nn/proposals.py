"""Anchor and proposal layers (RLSD's localization layer) on mlkernels.ops.

``AnchorGenerator`` is torchvision's ``AnchorGenerator`` for one feature level; ``ProposalLayer`` is
the RPN head (3x3 conv + ReLU + 1x1 conv predicting (4 + 1) k values per cell) followed by the
fused, batched :func:`mlkernels.ops.propose` instead of torchvision's per-image loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import ops
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
        self.sizes = tuple(float(s) for s in sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
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
            image_h, image_w = int(image_size[0]), int(image_size[1])
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
        forward(features: Tensor[N, C, H, W], image_sizes: Tensor[N, 2] or list of (h, w))
        -> Proposals(boxes [N, P, 4], scores [N, P], counts [N], objectness [N, HWk],
        deltas [N, HWk, 4], anchors [HWk, 4]). The boxes carry gradients to the head's deltas.
        A float16/bfloat16 head (autocast) gets its predictions converted to float32 for the
        proposals.
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
        self.config = ProposeConfig.make(config, settings)
        self.anchor_generator = AnchorGenerator(sizes, aspect_ratios, stride)
        k = self.anchor_generator.num_anchors_per_location
        self.conv = nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1)
        self.predict = nn.Conv2d(hidden, 5 * k, kernel_size=1)
        for layer in (self.conv, self.predict):  # torchvision's RPNHead initialization
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    def forward(self, features: Tensor, image_sizes: Tensor | Sequence[Sequence[int]]) -> Proposals:
        if not isinstance(features, Tensor) or features.dim() != 4:
            got = (
                f"Tensor[{', '.join(map(str, features.shape))}]"
                if isinstance(features, Tensor)
                else type(features).__name__
            )
            raise ValueError(f"ProposalLayer: features must be Tensor[N, C, H, W], got {got}")
        n, _, height, width = features.shape
        k = self.anchor_generator.num_anchors_per_location
        out = self.predict(torch.relu(self.conv(features)))  # [N, 5k, H, W]
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
            self.config,
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
