"""mlkernels.reference.replacing_ops: every op and layer runs its pure-PyTorch twin inside the
block (no compiled kernel is called), and the compiled ops are back after it."""

from __future__ import annotations

import pytest
import torch

import mlkernels
from mlkernels import nn, ops, reference


def _workload() -> list[torch.Tensor]:
    """Every layer of mlkernels.nn and the ops they do not cover, on small inputs."""
    torch.manual_seed(0)
    features = torch.randn(2, 8, 6, 7, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 20.0, 18.0], [1, 4.0, 2.0, 30.0, 40.0]])
    pooled = nn.RoIAlign(3, 0.25, 2, aligned=True)(features, rois)

    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    tokens = torch.randn(2, 5, 8)
    attended, weights = attention(tokens, tokens, tokens, need_weights=True)

    proposals = nn.ProposalLayer(8, stride=8, post_nms_top_n=4)(features, [(48, 56), (40, 50)])

    def step_fn(last, state):
        return torch.log_softmax(state, dim=-1), state

    search = nn.LabelBeamSearch(beam_size=2, max_length=3)
    decoded = search(step_fn, torch.randn(4, 5), batch_size=2, num_labels=5)

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20, 30, 30]])
    kept = ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    ious = ops.box_iou(boxes, boxes)
    (pooled.sum() + attended.sum() + proposals.boxes.sum()).backward()
    return [pooled, attended, weights, proposals.boxes, decoded.labels, kept, ious, features.grad]


def _mlkernels_calls(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if e.name.startswith("mlkernels")})


def test_no_compiled_kernel_runs_inside():
    # The check can fail: outside the block the same workload calls the compiled ops.
    assert _mlkernels_calls(_workload)
    with reference.replacing_ops():
        assert _mlkernels_calls(_workload) == []


def test_results_agree_and_ops_come_back():
    originals = {name: getattr(ops, name) for name in ops.__all__}
    ours = _workload()
    with reference.replacing_ops():
        assert ops.roi_align is reference.roi_align
        twins = _workload()
    for a, b in zip(ours, twins, strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(a, b)
    assert {name: getattr(ops, name) for name in ops.__all__} == originals
    assert mlkernels.nn.roi_align.roi_align is mlkernels.ops.roi_align


def test_restored_after_an_error_and_not_nested():
    with pytest.raises(ValueError, match="inside"), reference.replacing_ops():
        raise ValueError("inside the block")
    assert ops.nms is not reference.nms
    with reference.replacing_ops(), pytest.raises(RuntimeError, match="already active"):
        with reference.replacing_ops():
            pass
    assert ops.nms is not reference.nms
