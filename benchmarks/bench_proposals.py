"""NMS and proposals vs torchvision: ops.nms, ops.batched_nms, and the RPN's per-image proposal
pipeline."""

from __future__ import annotations

import torch
import torchvision
from harness import Case
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

import mlkernels
from mlkernels.testing import assert_coords_close


def _boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * 600
    wh = torch.rand(n, 2, generator=generator) * 200 + 1
    return torch.cat([xy, xy + wh], dim=1)


def _equal(ours, anchor):
    torch.testing.assert_close(ours, anchor, rtol=0, atol=0)


def _nms_case(boxes: torch.Tensor, scores: torch.Tensor) -> Case:
    n = len(boxes)
    return Case(
        "proposals",
        "nms",
        f"N={n}, iou 0.5",
        lambda: mlkernels.ops.nms(boxes, scores, 0.5),
        lambda: torchvision.ops.nms(boxes, scores, 0.5),
        "torchvision.ops.nms",
        _equal,
        target_ratio=5.0 if n == 6000 else None,
    )


def _nms_cases(quick: bool, g: torch.Generator, device: str) -> list[Case]:
    cases = []
    for n in (1000, 6000) if quick else (1000, 6000, 20000):
        boxes, scores = _boxes(n, g), torch.rand(n, generator=g)
        cases.append(_nms_case(boxes.to(device), scores.to(device)))
    if torch.device(device).type == "cuda" and not quick:
        # N = 100,000 on the GPU only: torchvision's CPU nms would take ~13 s a call there (it
        # grows as N^2: 0.5 s at N = 20,000). Its own generator, so that the CPU cases above
        # and below keep their inputs. Both sides hold an N x N bit mask (1.25 GB).
        g_large = torch.Generator().manual_seed(1)
        n = 100_000
        boxes_large, scores_large = _boxes(n, g_large), torch.rand(n, generator=g_large)
        cases.append(_nms_case(boxes_large.to(device), scores_large.to(device)))
    images = 2 if quick else 8
    boxes = _boxes(images * 6000, g)
    # Distinct scores: torchvision's per-group path orders equal scores with an unstable sort.
    scores = torch.randperm(images * 6000, generator=g).float()
    idxs = torch.arange(images).repeat_interleave(6000)
    boxes, scores, idxs = boxes.to(device), scores.to(device), idxs.to(device)
    cases.append(
        Case(
            "proposals",
            "batched_nms",
            f"{images}x6000, iou 0.7",
            lambda: mlkernels.ops.batched_nms(boxes, scores, idxs, 0.7),
            lambda: torchvision.ops.batched_nms(boxes, scores, idxs, 0.7),
            "torchvision.ops.batched_nms",
            _equal,
        )
    )
    cases.append(_classes_case(quick, device))
    return cases


def _classes_case(quick: bool, device: str) -> Case:
    """A detector's last step: boxes of 80 classes, the classes of very uneven sizes (from over
    1000 boxes down to a handful). Its own generator, so that the other cases keep their inputs."""
    g = torch.Generator().manual_seed(2)
    n = 4000 if quick else 20000
    boxes = _boxes(n, g)
    scores = torch.randperm(n, generator=g).float()
    idxs = (torch.rand(n, generator=g) ** 2 * 80).long()
    boxes, scores, idxs = boxes.to(device), scores.to(device), idxs.to(device)
    return Case(
        "proposals",
        "batched_nms",
        f"80 uneven classes, N={n}, iou 0.5",
        lambda: mlkernels.ops.batched_nms(boxes, scores, idxs, 0.5),
        lambda: torchvision.ops.batched_nms(boxes, scores, idxs, 0.5),
        "torchvision.ops.batched_nms",
        _equal,
    )


def _propose_case(quick: bool, g: torch.Generator, device: str) -> Case:
    """RLSD's shape: 12 anchors on a 38x50 map (22,800 per image), pre 6000, post 256."""
    images, height, width, stride = (2 if quick else 8), 38, 50, 16
    anchors = mlkernels.ops.generate_anchors((height, width), stride)
    deltas = torch.randn(images, anchors.shape[0], 4, generator=g) * 0.3
    objectness = torch.randn(images, anchors.shape[0], generator=g)
    anchors, deltas, objectness = anchors.to(device), deltas.to(device), objectness.to(device)
    sizes = [(height * stride, width * stride)] * images
    rpn = RegionProposalNetwork(
        AnchorGenerator(),
        RPNHead(1, 12),
        0.7,
        0.3,
        256,
        0.5,
        pre_nms_top_n=dict(training=6000, testing=6000),
        post_nms_top_n=dict(training=256, testing=256),
        nms_thresh=0.7,
    ).eval()

    def torchvision_pipeline():
        # What torchvision's RPN does after its head: decode every anchor, then filter per image.
        proposals = rpn.box_coder.decode(deltas.reshape(-1, 4), [anchors] * images)
        proposals = proposals.view(images, -1, 4)
        return rpn.filter_proposals(proposals, objectness, sizes, [anchors.shape[0]])

    def ours():
        return mlkernels.ops.propose(
            anchors, deltas, objectness, sizes, pre_nms_top_n=6000, post_nms_top_n=256
        )

    def check(result, anchor):
        boxes, scores, counts = result
        for i, (tv_boxes, tv_scores) in enumerate(zip(*anchor, strict=True)):
            assert counts[i] == len(tv_boxes)
            assert_coords_close(boxes[i, : counts[i]], tv_boxes)
            torch.testing.assert_close(scores[i, : counts[i]], tv_scores)

    return Case(
        "proposals",
        "propose",
        f"{images}x{anchors.shape[0]} anchors, pre 6000, post 256",
        ours,
        torchvision_pipeline,
        "torchvision RPN decode + filter_proposals",
        check,
        target_ratio=20.0 if images == 8 else None,
    )


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    """Every case runs on CUDA too (torchvision's nms, batched_nms and RPN filter_proposals all
    have CUDA paths); the CUDA run adds nms at N = 100,000."""
    g = torch.Generator().manual_seed(0)
    return [*_nms_cases(quick, g, device), _propose_case(quick, g, device)]
