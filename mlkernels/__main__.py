"""`python -m mlkernels`: how the extension was built, and a self-check of every op family
against its pure-PyTorch reference (CPU; CUDA too when a GPU is visible)."""

from __future__ import annotations

import sys

import torch

import mlkernels
from mlkernels import ops, reference


def _self_check_boxes(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(64, 2, generator=g, dtype=torch.float64) * 100
    anchors = torch.cat([xy, xy + torch.rand(64, 2, generator=g, dtype=torch.float64) * 50 + 1], 1)
    deltas = torch.randn(64, 4, generator=g, dtype=torch.float64) * 0.3
    anchors, deltas = anchors.to(device), deltas.to(device)
    boxes = ops.decode_boxes(deltas, anchors)
    torch.testing.assert_close(boxes, reference.decode_boxes(deltas, anchors))
    torch.testing.assert_close(
        ops.encode_boxes(boxes, anchors), reference.encode_boxes(boxes, anchors)
    )
    torch.testing.assert_close(ops.box_iou(anchors, boxes), reference.box_iou(anchors, boxes))


def _self_check_roi_align(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, 16, generator=g, dtype=torch.float64)
    xy = torch.rand(20, 2, generator=g, dtype=torch.float64) * 50 - 5
    wh = torch.rand(20, 2, generator=g, dtype=torch.float64) * 30 + 1
    index = torch.randint(0, 2, (20, 1), generator=g).to(torch.float64)
    boxes = torch.cat([index, xy, xy + wh], 1)
    x, boxes = x.to(device).requires_grad_(), boxes.to(device).requires_grad_()
    grads = []
    for fn in (ops.roi_align, reference.roi_align):
        out = fn(x, boxes, 7, 0.25, 2, True)
        grads.append((out, *torch.autograd.grad(out.square().sum(), (x, boxes))))
    torch.testing.assert_close(grads[0], grads[1])


def _self_check_proposals(device: str) -> None:
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(300, 2, generator=g, dtype=torch.float64) * 100 - 20
    boxes = torch.cat([xy, xy + torch.rand(300, 2, generator=g, dtype=torch.float64) * 40], 1)
    scores = torch.rand(300, generator=g, dtype=torch.float64)
    idxs = torch.randint(0, 4, (300,), generator=g)
    expected = reference.nms(boxes, scores, 0.5)
    expected_batched = reference.batched_nms(boxes, scores, idxs, 0.5)
    boxes, scores, idxs = boxes.to(device), scores.to(device), idxs.to(device)
    assert torch.equal(ops.nms(boxes, scores, 0.5).cpu(), expected), "nms"
    assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5).cpu(), expected_batched), (
        "batched_nms"
    )
    anchors = ops.generate_anchors((6, 8), 16, dtype=torch.float64)
    deltas = torch.randn(2, anchors.shape[0], 4, generator=g, dtype=torch.float64) * 0.3
    objectness = torch.randn(2, anchors.shape[0], generator=g, dtype=torch.float64)
    sizes = [(96, 128), (80, 100)]
    kw = dict(pre_nms_top_n=300, post_nms_top_n=30, append_whole_image=True)
    want = reference.propose(anchors, deltas, objectness, sizes, **kw)
    got = ops.propose(anchors.to(device), deltas.to(device), objectness.to(device), sizes, **kw)
    for ours, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(ours.cpu(), theirs)


def _self_check_beam_search(device: str) -> None:
    g = torch.Generator().manual_seed(2)
    B, K, C = 3, 4, 70
    log_probs = torch.randn(B, K, C, generator=g).log_softmax(-1).to(device)
    scores = torch.full((B, K), -float("inf"), device=device)
    scores[:, 0] = 0.0
    used = torch.zeros(B, K, 2, dtype=torch.int64, device=device)
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    for _ in range(3):  # three steps, each equal to the reference's to the bit
        got = ops.beam_search_step(log_probs, scores, used, finished, max_length=5)
        want = reference.beam_search_step(log_probs, scores, used, finished, max_length=5)
        for ours, theirs in zip(got, want, strict=True):
            assert torch.equal(ours, theirs), "beam_search_step"
        scores, used, finished = got.scores, got.used, got.finished
    state = [torch.randn(B * K, 6, generator=g).to(device)]  # the driver's step, state and all
    got = ops.beam_search_advance(log_probs, scores, used, finished, state, max_length=5)
    want = reference.beam_search_advance(log_probs, scores, used, finished, state, max_length=5)
    for ours, theirs in zip(got, want, strict=True):
        pairs = zip(ours, theirs, strict=True) if isinstance(ours, list) else [(ours, theirs)]
        assert all(torch.equal(a, b) for a, b in pairs), "beam_search_advance"


SELF_CHECKS = {
    "beam_search": _self_check_beam_search,
    "boxes": _self_check_boxes,
    "proposals": _self_check_proposals,
    "roi_align": _self_check_roi_align,
}


def main() -> int:
    info = mlkernels.build_info()
    print("mlkernels build info")
    for key, value in info.items():
        print(f"  {key}: {value}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    failed = 0
    print("self-check against mlkernels.reference")
    for family, check in SELF_CHECKS.items():
        for device in devices:
            try:
                check(device)
                print(f"  {family} on {device}: ok")
            except Exception as error:  # report every family, then fail
                failed += 1
                print(f"  {family} on {device}: FAILED: {error}")
    if not torch.cuda.is_available():
        print(
            "  (no GPU visible: CUDA kernels were not run here;"
            " the tests run their logic on the CPU grid emulator)"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
