"""Pure-PyTorch roi_align: the contract of mlkernels.ops.roi_align (torchvision's forward),
differentiable w.r.t. the feature map and the box coordinates through plain tensor operations.

Bilinear interpolation is separable: per RoI, the sample rows and columns each get two pixel
indices and two weights, and a gather of the [rows x columns] corners does the rest. Adaptive
sampling gives RoIs different sample counts; every RoI is laid out on the largest grid and the
extra samples are masked out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..ops.roi_align import checked_rois, output_pair


def sample_positions(start, bin_size, grid, bins: int, max_grid: int, size: int):
    """Sample positions along one axis as torchvision computes them, [K, bins, max_grid] for K
    RoIs (bin starts at start + b * bin_size, grid[k] samples a bin), and which are valid: inside
    the RoI's grid and in [-1, size]."""
    k = start.shape[0]
    dtype = start.dtype
    p = torch.arange(bins, dtype=dtype, device=start.device).view(1, bins, 1)
    i = torch.arange(max_grid, device=start.device).view(1, 1, max_grid)
    g = grid.clamp(min=1).to(dtype).view(k, 1, 1)
    coord = (
        start.view(k, 1, 1) + p * bin_size.view(k, 1, 1) + (i + 0.5) * bin_size.view(k, 1, 1) / g
    )
    valid = (i < grid.view(k, 1, 1)) & (coord >= -1) & (coord <= size)
    return coord, valid


def _axis(start, bin_size, grid, bins: int, max_grid: int, size: int):
    """Sample positions along one axis, clamped as torchvision does: for every RoI, bin and
    sample, the low/high pixel, their weights (zero for masked or out-of-map samples)."""
    coord, valid = sample_positions(start, bin_size, grid, bins, max_grid, size)
    dtype = start.dtype
    coord = coord.clamp(min=0)
    low = coord.detach().floor().long()
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    high = torch.where(edge, size - 1, low + 1)
    coord = torch.where(edge, low.to(dtype), coord)
    frac = coord - low.to(dtype)
    mask = valid.to(dtype)
    return low.clamp(min=0), high.clamp(min=0), (1 - frac) * mask, frac * mask


def roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """input [N, C, H, W], boxes [K, 5] or list of [L, 4] -> [K, C, oh, ow]. float16/bfloat16 are
    computed in float32. See mlkernels.ops.roi_align for the contract."""
    oh, ow = output_pair("roi_align", output_size)
    rois = checked_rois("roi_align", boxes, input)
    out_dtype = input.dtype
    dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    input, rois = input.to(dtype), rois.to(dtype=dtype, device=input.device)
    n, c, h, w = input.shape
    k = rois.shape[0]
    if k == 0 or c == 0 or h == 0 or w == 0:
        return (rois.sum() * 0 + input.sum() * 0).expand(k, c, oh, ow).to(out_dtype).contiguous()
    offset = 0.5 if aligned else 0.0
    batch = rois[:, 0].detach().long()
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x1
    roi_h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    if sampling_ratio > 0:
        grid_w = torch.full((k,), sampling_ratio, device=input.device)
        grid_h = grid_w
    else:  # held constant for the gradient: a step function of the box size
        grid_w = torch.ceil(roi_w.detach() / ow).long()
        grid_h = torch.ceil(roi_h.detach() / oh).long()
    max_w = max(int(grid_w.max()), 1)
    max_h = max(int(grid_h.max()), 1)
    y_lo, y_hi, wy_lo, wy_hi = _axis(y1, roi_h / oh, grid_h, oh, max_h, h)
    x_lo, x_hi, wx_lo, wx_hi = _axis(x1, roi_w / ow, grid_w, ow, max_w, w)
    # [K, Y] and [K, X] with Y = oh * max_h, X = ow * max_w
    rows = [(y.reshape(k, -1), wy.reshape(k, -1)) for y, wy in ((y_lo, wy_lo), (y_hi, wy_hi))]
    cols = [(x.reshape(k, -1), wx.reshape(k, -1)) for x, wx in ((x_lo, wx_lo), (x_hi, wx_hi))]
    b = batch.view(k, 1, 1)
    value = 0
    for y, wy in rows:
        for x, wx in cols:
            corner = input[b, :, y[:, :, None], x[:, None, :]]  # [K, Y, X, C]
            value = value + corner * (wy[:, :, None] * wx[:, None, :])[..., None]
    value = value.view(k, oh, max_h, ow, max_w, c).sum(dim=(2, 4))  # [K, oh, ow, C]
    count = (grid_h * grid_w).clamp(min=1).to(dtype).view(k, 1, 1, 1)
    return (value / count).permute(0, 3, 1, 2).contiguous().to(out_dtype)


def roi_align_grid_sample(
    input: Tensor,
    boxes: Tensor,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = False,
) -> Tensor:
    """roi_align through ``affine_grid`` + ``grid_sample`` (the DenseCap / spatial-transformer
    route to box gradients), for a fixed ``sampling_ratio`` and boxes whose width and height
    are >= 1 when not ``aligned``. An independent formulation: it agrees with roi_align where
    every sample lies in [-1, H] x [-1, W] (border padding is roi_align's clamping).

    A RoI's samples form a regular (oh * s) x (ow * s) grid over the box; affine_grid maps
    [-1, 1]^2 onto the box, grid_sample reads the samples, and a mean over s x s gives a bin."""
    oh, ow = output_pair("roi_align", output_size)
    n, c, h, w = input.shape
    s = sampling_ratio
    offset = 0.5 if aligned else 0.0
    out = input.new_zeros((boxes.shape[0], c, oh, ow))
    batch = boxes[:, 0].detach().long()
    for image in range(n):
        idx = (batch == image).nonzero().flatten()
        if idx.numel() == 0:
            continue
        b = boxes[idx, 1:] * spatial_scale - offset
        x1, y1, x2, y2 = b.unbind(1)
        # pixel x -> grid_sample's normalized x (align_corners=False): (2 x + 1) / W - 1
        theta = torch.zeros(idx.numel(), 2, 3, dtype=input.dtype, device=input.device)
        theta = theta + torch.stack(
            [
                torch.stack([(x2 - x1) / w, torch.zeros_like(x1), (x1 + x2 + 1) / w - 1], 1),
                torch.stack([torch.zeros_like(y1), (y2 - y1) / h, (y1 + y2 + 1) / h - 1], 1),
            ],
            1,
        )
        grid = torch.nn.functional.affine_grid(
            theta, [idx.numel(), 1, oh * s, ow * s], align_corners=False
        )
        sampled = torch.nn.functional.grid_sample(
            input[image : image + 1],
            grid.reshape(1, -1, ow * s, 2),
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )  # [1, C, R * oh * s, ow * s]
        sampled = sampled.view(c, idx.numel(), oh * s, ow * s).transpose(0, 1)
        out = out.index_copy(0, idx, torch.nn.functional.avg_pool2d(sampled, s))
    return out


__all__ = ["roi_align", "roi_align_grid_sample"]
