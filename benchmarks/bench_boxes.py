"""Box coding and IoU vs torchvision: BoxCoder decode/encode and ops.box_iou."""

from __future__ import annotations

import torch
import torchvision
from harness import Case
from torchvision.models.detection._utils import BoxCoder

import mlkernels
from mlkernels.testing import assert_coords_close


def _boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * 600
    wh = torch.rand(n, 2, generator=generator) * 200 + 1
    return torch.cat([xy, xy + wh], dim=1)


def _close(ours, anchor):
    torch.testing.assert_close(ours, anchor)


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    """Every case runs on CUDA too: BoxCoder and box_iou are plain tensor code there."""
    g = torch.Generator().manual_seed(0)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    n = 8 * 6000 if not quick else 6000
    anchors = _boxes(n, g)
    deltas = torch.randn(n, 4, generator=g) * 0.5
    targets = coder.decode_single(deltas, anchors)
    a, b = _boxes(1000, g), _boxes(1000 if not quick else 300, g)
    # Drawn on the CPU generator as for the CPU run, then moved (a no-op on the CPU).
    anchors, deltas, targets, a, b = (t.to(device) for t in (anchors, deltas, targets, a, b))
    return [
        Case(
            "boxes",
            "decode_boxes",
            f"{n}x4",
            lambda: mlkernels.ops.decode_boxes(deltas, anchors),
            lambda: coder.decode_single(deltas, anchors),
            "BoxCoder.decode_single",
            # exp differs from torch's vectorized one by an ulp on some CPUs (see README)
            assert_coords_close,
        ),
        Case(
            "boxes",
            "encode_boxes",
            f"{n}x4",
            lambda: mlkernels.ops.encode_boxes(targets, anchors),
            lambda: coder.encode_single(targets, anchors),
            "BoxCoder.encode_single",
            assert_coords_close,
        ),
        Case(
            "boxes",
            "box_iou",
            f"{len(a)}x{len(b)}",
            lambda: mlkernels.ops.box_iou(a, b),
            lambda: torchvision.ops.box_iou(a, b),
            "torchvision.ops.box_iou",
            _close,
        ),
    ]
