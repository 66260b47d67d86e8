"""Pure-PyTorch anchors, NMS and proposals: the contracts of mlkernels.ops.generate_anchors, nms,
batched_nms and propose, written with plain tensor operations and loops (torchvision semantics)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..ops.proposals import ProposeConfig
from .boxes import box_iou, decode_boxes


def generate_anchors(
    feature_size: int | Sequence[int],
    stride: float | Sequence[float],
    sizes: Sequence[float] = (32, 64, 128, 256),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Anchors of one level, cell by cell (row-major), then ratio by ratio, then size by size;
    base anchors (centred on the cell's top-left corner) rounded to whole pixels in float32."""
    height, width = (feature_size, feature_size) if isinstance(feature_size, int) else feature_size
    stride_h, stride_w = (stride, stride) if isinstance(stride, (int, float)) else stride
    base = []
    for ratio in aspect_ratios:
        h_ratio = torch.sqrt(torch.tensor(ratio, dtype=torch.float32))
        for size in sizes:
            half_w = (1 / h_ratio * size) / 2
            half_h = (h_ratio * size) / 2
            base.append(torch.stack([-half_w, -half_h, half_w, half_h]).round())
    rows = []
    for y in range(height):
        for x in range(width):
            shift = torch.tensor([x * stride_w, y * stride_h] * 2, dtype=dtype)
            rows += [shift + b.to(dtype) for b in base]
    if not rows:
        return torch.zeros(0, 4, dtype=dtype, device=device)
    return torch.stack(rows).to(device)


def _score_order(scores: Tensor) -> Tensor:
    return torch.sort(scores, descending=True, stable=True)[1]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS, one box at a time: indices kept, by decreasing score (stable)."""
    order = _score_order(scores)
    iou = box_iou(boxes, boxes)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    kept = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        kept.append(i)
        # IoU (a float32 value for float32 boxes) compared with the threshold in double, as
        # torchvision's kernels do.
        suppressed |= iou[i].double() > iou_threshold
    return torch.tensor(kept, dtype=torch.int64, device=boxes.device)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS in each group of ``idxs`` separately; the kept indices by decreasing score (stable)."""
    keep = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    for group in torch.unique(idxs).tolist():
        members = torch.nonzero(idxs == group).flatten()
        keep[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    order = _score_order(scores)
    return order[keep[order]]


def clip_boxes(boxes: Tensor, height: float, width: float) -> Tensor:
    """torchvision's clip_boxes_to_image."""
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def propose(
    anchors: Tensor,
    deltas: Tensor,
    objectness: Tensor,
    image_sizes: Tensor | Sequence[Sequence[float]],
    config: ProposeConfig | None = None,
    **settings,
) -> tuple[Tensor, Tensor, Tensor]:
    """torchvision RPN's filter_proposals, one image at a time: top-k objectness (stable),
    decode, clip, drop small / non-finite boxes, sigmoid, score threshold, NMS, first
    post_nms_top_n; padded to [N, P, 4] / [N, P] with the counts. Differentiable by autograd.
    Settings: a :class:`mlkernels.ops.ProposeConfig` and/or its fields by keyword."""
    import torchvision  # the reference pipeline is torchvision's own ops

    cfg = ProposeConfig.make(config, settings)
    weights, clamp, min_size = cfg.weights, cfg.clamp, cfg.min_size
    n = deltas.shape[0]
    rows = cfg.rows
    k = min(cfg.pre_nms_top_n, anchors.shape[0])
    out_boxes = deltas.new_zeros((n, rows, 4))
    out_scores = deltas.new_zeros((n, rows))
    counts = torch.zeros(n, dtype=torch.int64, device=deltas.device)
    sizes = torch.as_tensor(image_sizes, dtype=torch.float64).reshape(n, 2).tolist()
    top = torch.sort(objectness, dim=1, descending=True, stable=True)[1][:, :k]
    scores_all = torch.sigmoid(torch.gather(objectness, 1, top))
    for i, (height, width) in enumerate(sizes):
        boxes = decode_boxes(deltas[i, top[i]], anchors[top[i]], weights, clamp)
        boxes = clip_boxes(boxes, height, width)
        scores = scores_all[i]
        keep = torchvision.ops.remove_small_boxes(boxes, min_size)
        keep = keep[torch.isfinite(boxes[keep]).all(dim=1)]
        keep = keep[scores[keep] >= cfg.score_threshold]
        boxes, scores = boxes[keep], scores[keep]
        keep = torchvision.ops.nms(boxes.detach(), scores, cfg.iou_threshold)
        keep = keep[: cfg.post_nms_top_n]
        c = len(keep)
        out_boxes[i, :c] = boxes[keep]
        out_scores[i, :c] = scores[keep]
        if cfg.append_whole_image:
            out_boxes[i, c] = torch.tensor([0.0, 0.0, width, height], dtype=deltas.dtype)
            out_scores[i, c] = 1.0
            c += 1
        counts[i] = c
    return out_boxes, out_scores, counts
