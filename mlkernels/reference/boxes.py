"""Pure-PyTorch box coding and IoU: the contracts of mlkernels.ops.encode_boxes, decode_boxes and
box_iou, written with plain tensor operations (torchvision BoxCoder / ops.box_iou semantics)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor

DEFAULT_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
DEFAULT_CLAMP = math.log(1000.0 / 16)


def _centers_and_sizes(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode_boxes(
    boxes: Tensor, anchors: Tensor, weights: Sequence[float] = DEFAULT_WEIGHTS
) -> Tensor:
    """Deltas (dx, dy, dw, dh) that turn ``anchors`` into ``boxes``; both [..., 4], broadcast."""
    wx, wy, ww, wh = weights
    boxes, anchors = torch.broadcast_tensors(boxes, anchors)
    ax, ay, aw, ah = _centers_and_sizes(anchors)
    bx, by, bw, bh = _centers_and_sizes(boxes)
    return torch.stack(
        (
            wx * (bx - ax) / aw,
            wy * (by - ay) / ah,
            ww * torch.log(bw / aw),
            wh * torch.log(bh / ah),
        ),
        dim=-1,
    )


def decode_boxes(
    deltas: Tensor,
    anchors: Tensor,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    clamp: float = DEFAULT_CLAMP,
) -> Tensor:
    """Boxes (x1, y1, x2, y2) that ``deltas`` make of ``anchors``; both [..., 4], broadcast.

    dw and dh are clamped from above at ``clamp`` before exp()."""
    wx, wy, ww, wh = weights
    deltas, anchors = torch.broadcast_tensors(deltas, anchors)
    ax, ay, aw, ah = _centers_and_sizes(anchors)
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = torch.clamp(deltas[..., 2] / ww, max=clamp)
    dh = torch.clamp(deltas[..., 3] / wh, max=clamp)
    cx = dx * aw + ax
    cy = dy * ah + ay
    half_w = 0.5 * (torch.exp(dw) * aw)
    half_h = 0.5 * (torch.exp(dh) * ah)
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
    """IoU of every pair: boxes1 [N, 4], boxes2 [M, 4] -> [N, M], in ``fmt`` ("xyxy", "xywh" or
    "cxcywh"). float64 boxes give float64; every other dtype float32, computed in float32
    (float16, bfloat16) or float64 (integers), as mlkernels.ops.box_iou."""
    if fmt != "xyxy":
        boxes1 = torchvision.ops.box_convert(boxes1, fmt, "xyxy")
        boxes2 = torchvision.ops.box_convert(boxes2, fmt, "xyxy")
    dtype = boxes1.dtype
    in_double = dtype == torch.float64 or not dtype.is_floating_point
    boxes1 = boxes1.to(torch.float64 if in_double else torch.float32)
    boxes2 = boxes2.to(boxes1.dtype)
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    iou = inter / (box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter)
    return iou.to(torch.float64 if dtype == torch.float64 else torch.float32)
