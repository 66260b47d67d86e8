"""Anchor and proposal layers (RLSD's localization layer) on mlkernels.ops.

``AnchorGenerator`` is torchvision's ``AnchorGenerator`` for one feature level; ``ProposalLayer`` is
the RPN head (3x3 conv + ReLU + 1x1 conv predicting (4 + 1) k values per cell) followed by the
fused, batched :func:`mlkernels.ops.propose` instead of torchvision's per-image loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.boxes import DEFAULT_CLAMP, DEFAULT_WEIGHTS


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
        key = (height, width, stride_key, dtype, features.device)
        if key not in self._cache:  # anchors depend only on the map's geometry
            if len(self._cache) >= 16:  # bounded when the input size varies (multi-scale)
                self._cache.clear()
            self._cache[key] = ops.generate_anchors(
                (height, width),
                stride,
                self.sizes,
                self.aspect_ratios,
                dtype=dtype,
                device=features.device,
            )
        return self._cache[key]

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
        pre_nms_top_n, post_nms_top_n, iou_threshold, min_size, score_threshold, weights,
        clamp, append_whole_image: passed to :func:`mlkernels.ops.propose`.

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
        pre_nms_top_n: int = 6000,
        post_nms_top_n: int = 256,
        iou_threshold: float = 0.7,
        min_size: float = 1e-3,
        score_threshold: float = 0.0,
        weights: Sequence[float] = DEFAULT_WEIGHTS,
        clamp: float = DEFAULT_CLAMP,
        append_whole_image: bool = False,
    ) -> None:
        super().__init__()
        self.anchor_generator = AnchorGenerator(sizes, aspect_ratios, stride)
        k = self.anchor_generator.num_anchors_per_location
        self.conv = nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1)
        self.predict = nn.Conv2d(hidden, 5 * k, kernel_size=1)
        for layer in (self.conv, self.predict):  # torchvision's RPNHead initialization
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)
        self.pre_nms_top_n = pre_nms_top_n
        self.post_nms_top_n = post_nms_top_n
        self.iou_threshold = iou_threshold
        self.min_size = min_size
        self.score_threshold = score_threshold
        self.weights = tuple(float(w) for w in weights)
        self.clamp = clamp
        self.append_whole_image = append_whole_image

    def forward(self, features: Tensor, image_sizes: Tensor | Sequence[Sequence[int]]) -> Proposals:
        n, _, height, width = features.shape
        k = self.anchor_generator.num_anchors_per_location
        out = self.predict(torch.relu(self.conv(features)))  # [N, 5k, H, W]
        # Cell-major, then anchor: the order of the anchors.
        objectness = out[:, :k].permute(0, 2, 3, 1).reshape(n, -1)
        deltas = out[:, k:].reshape(n, k, 4, height, width).permute(0, 3, 4, 1, 2)
        deltas = deltas.reshape(n, -1, 4)
        if deltas.dtype in (torch.float16, torch.bfloat16):
            # Half-precision heads (autocast): box coordinates in pixels need float32.
            deltas, objectness = deltas.float(), objectness.float()
        anchors = self.anchor_generator(features, dtype=deltas.dtype)
        boxes, scores, counts = ops.propose(
            anchors,
            deltas,
            objectness.detach(),  # as torchvision's RPN: no gradient through the ranking
            image_sizes,
            pre_nms_top_n=self.pre_nms_top_n,
            post_nms_top_n=self.post_nms_top_n,
            iou_threshold=self.iou_threshold,
            min_size=self.min_size,
            score_threshold=self.score_threshold,
            weights=self.weights,
            clamp=self.clamp,
            append_whole_image=self.append_whole_image,
        )
        return Proposals(boxes, scores, counts, objectness, deltas, anchors)

    def extra_repr(self) -> str:
        clamp = "log(1000/16)" if self.clamp == DEFAULT_CLAMP else f"{self.clamp:g}"
        return (
            f"k={self.anchor_generator.num_anchors_per_location}, "
            f"pre_nms_top_n={self.pre_nms_top_n}, post_nms_top_n={self.post_nms_top_n}, "
            f"iou_threshold={self.iou_threshold}, min_size={self.min_size}, "
            f"score_threshold={self.score_threshold}, weights={self.weights}, clamp={clamp}, "
            f"append_whole_image={self.append_whole_image}"
        )


__all__ = ["AnchorGenerator", "ProposalLayer", "Proposals"]
