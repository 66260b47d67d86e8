"""No host synchronisation in roi_align and propose (forward and backward) on CUDA.

Without a GPU: the emulated ops (torch.ops.mlkernels_emulated.*) run the very host code of the
CUDA ops, only their Runner differs, so every ATen op that host code calls shows in a profile of
an emulated call (the profiler records ops called from C++ kernels too; a TorchDispatchMode sees
only the custom op itself). What that can and cannot show on CPU tensors:

- ops that synchronise by themselves on CUDA (``.item()`` is ``aten::_local_scalar_dense``,
  ``nonzero``, ``masked_select``, ``equal``, ``unique``...) show by name: SYNCING;
- a device-to-host copy (``.cpu()``) of a CPU tensor is no op at all. A host check of device values
  reads back something computed on the device, mostly a reduction (``any``, ``min``, ``max``), so
  the ops each host path may call are listed (ALLOWED): an op outside the list fails the test until
  someone has checked that it does not synchronise on CUDA and added it.

With a GPU (cuda-marked, skipped here): torch.cuda.set_sync_debug_mode("error") around the public
functions and their backward, and a CUDA graph capture + replay of each, equal to eager.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import IMPLS

from mlkernels import ops
from mlkernels.nn import ProposalLayer

SYNCING = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::nonzero",
    "aten::nonzero_numpy",
    "aten::masked_select",
    "aten::equal",
    "aten::is_nonzero",
    "aten::allclose",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::repeat_interleave",
}

# What the CUDA host paths may call: allocation, layout, dtype conversion, and the device work
# propose does with ATen (sort, gather, sigmoid) and its backward's sums (index_add, sum).
_LAYOUT = {
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::zeros",
    "aten::zero_",
    "aten::fill_",
    "aten::contiguous",
    "aten::clone",
    "aten::copy_",
    "aten::to",
    "aten::_to_copy",
    "aten::view",
    "aten::reshape",
    "aten::narrow",
    "aten::slice",
    "aten::select",
    "aten::unsqueeze",
    "aten::as_strided",
    "aten::expand",
    "aten::resize_",
}
ALLOWED = {
    "roi_align": _LAYOUT,
    "roi_align_backward": _LAYOUT,
    "propose": _LAYOUT
    | {"aten::sort", "aten::arange", "aten::gather", "aten::sigmoid", "aten::mul"},
    "propose_backward": _LAYOUT | {"aten::index_add_", "aten::scatter_add_", "aten::sum"},
}


def _ops_called(fn) -> list[str]:
    """The names of the ATen ops fn() calls, nested calls included, outside any mlkernels op
    itself."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return [e.name for e in profile.events() if not e.name.startswith("mlkernels")]


def assert_no_sync(op: str, fn) -> None:
    called = _ops_called(fn)
    syncing = sorted(set(called) & SYNCING)
    assert not syncing, f"{op}: calls {syncing}, which synchronise with a GPU"
    unknown = sorted(set(called) - ALLOWED[op])
    assert not unknown, (
        f"{op}: calls {unknown}; check that they do not synchronise on CUDA (no result read on "
        "the host), then add them to ALLOWED"
    )


EMULATED = IMPLS["emulated"]


def _roi_align_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 12, generator=g, dtype=dtype)
    boxes = torch.tensor(
        [[0, 1.0, 1.0, 8.0, 6.0], [1, 0.5, 2.0, 11.0, 9.5], [1, 3.0, 3.0, 4.0, 4.5]], dtype=dtype
    )
    return x, boxes


@pytest.mark.emulated
@pytest.mark.parametrize("deterministic", [False, True])
def test_roi_align_emulated_host_path_has_no_sync(deterministic):
    x, boxes = _roi_align_inputs()
    args = (1.0, 2, 3, 2, True)
    emulated = torch.ops.mlkernels_emulated
    assert_no_sync("roi_align", lambda: emulated.roi_align(x, boxes, *args))
    grad = torch.randn(3, 3, 2, 3)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for mask in ([True, True], [True, False], [False, True]):
            assert_no_sync(
                "roi_align_backward",
                lambda m=mask: emulated.roi_align_backward(grad, x, boxes, *args, m),
            )
    finally:
        torch.use_deterministic_algorithms(previous)


def _propose_inputs():
    g = torch.Generator().manual_seed(1)
    anchors = ops.generate_anchors((3, 4), 16, (16, 32), (0.5, 1.0))
    deltas = torch.randn(2, anchors.shape[0], 4, generator=g) * 0.3
    objectness = torch.randn(2, anchors.shape[0], generator=g)
    sizes = torch.tensor([[48.0, 64.0], [40.0, 60]])
    return anchors, deltas, objectness, sizes


_PROPOSE_SETTINGS = ops.ProposeConfig(
    pre_nms_top_n=20, post_nms_top_n=8, iou_threshold=0.6, append_whole_image=True
).op_args()


@pytest.mark.emulated
def test_propose_emulated_host_path_has_no_sync():
    anchors, deltas, objectness, sizes = _propose_inputs()
    emulated = torch.ops.mlkernels_emulated
    for image_sizes in (sizes, sizes.to(torch.int64)):
        assert_no_sync(
            "propose",
            lambda s=image_sizes: emulated.propose(
                anchors, deltas, objectness, s, *_PROPOSE_SETTINGS
            ),
        )
    *_, kept = emulated.propose(anchors, deltas, objectness, sizes, *_PROPOSE_SETTINGS)
    grad = torch.randn(2, kept.shape[1], 4)
    weights, clamp = _PROPOSE_SETTINGS[5], _PROPOSE_SETTINGS[6]
    for mask in ([True, True], [True, False], [False, True]):
        assert_no_sync(
            "propose_backward",
            lambda m=mask: emulated.propose_backward(
                grad, anchors, deltas, kept, sizes, weights, clamp, m
            ),
        )


def test_the_check_catches_a_sync():
    # The CPU kernels check values on the host (free there): the same check must fail for them.
    x, boxes = _roi_align_inputs()
    with pytest.raises(AssertionError, match="roi_align: calls"):
        assert_no_sync(
            "roi_align", lambda: torch.ops.mlkernels.roi_align(x, boxes, 1.0, 2, 2, 2, False)
        )
    anchors, deltas, objectness, sizes = _propose_inputs()
    with pytest.raises(AssertionError, match=r"_local_scalar_dense"):
        assert_no_sync(
            "propose",
            lambda: torch.ops.mlkernels.propose(
                anchors, deltas, objectness, sizes, *_PROPOSE_SETTINGS
            ),
        )


def test_proposal_layer_adds_no_sync_of_its_own():
    # Everything the layer calls outside the propose op (whose CPU kernel checks image_sizes on
    # the host): the head, the cached anchors, the list of image sizes turned into a tensor.
    layer = ProposalLayer(4, sizes=(16, 32), aspect_ratios=(1.0,), hidden=8, pre_nms_top_n=20)
    features = torch.randn(2, 4, 3, 5)
    for _ in range(2):  # the first call builds the anchors, the second finds them cached
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            layer(features, [(48, 80), (40, 70)])
        outside = []
        for event in profile.events():
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("mlkernels::propose"):
                parent = parent.cpu_parent
            if parent is None and not event.name.startswith("mlkernels::propose"):
                outside.append(event.name)
        assert not set(outside) & SYNCING, sorted(set(outside) & SYNCING)


# ---- with a GPU ----------------------------------------------------------------------------------


@pytest.fixture
def sync_is_an_error():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _cuda_roi_align_inputs():
    x, boxes = _roi_align_inputs()
    return x.cuda().requires_grad_(), boxes.cuda().requires_grad_()


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_roi_align_cuda_has_no_sync(deterministic):
    x, boxes = _cuda_roi_align_inputs()
    box_list = [boxes[:1, 1:].detach(), boxes[1:, 1:].detach()]
    grad = torch.randn(3, 3, 2, 3, device="cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    previous_mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.roi_align(x, boxes, (2, 3), 1.0, 2, True)
        torch.autograd.grad(out, (x, boxes), grad)
        torch.autograd.grad(ops.roi_align(x, box_list, (2, 3), 1.0, 2, True), x, grad)
    finally:
        torch.cuda.set_sync_debug_mode(previous_mode)
        torch.use_deterministic_algorithms(previous)


@pytest.mark.cuda
def test_propose_cuda_has_no_sync(sync_is_an_error):
    anchors, deltas, objectness, sizes = (t.cuda() for t in _propose_inputs())
    deltas.requires_grad_()
    anchors.requires_grad_()
    settings = dict(pre_nms_top_n=20, post_nms_top_n=8, iou_threshold=0.6)
    for image_sizes in (sizes, [(48, 64), (40, 60.0)]):  # a list goes through pinned memory
        boxes, _, _ = ops.propose(anchors, deltas, objectness, image_sizes, **settings)
        torch.autograd.grad(boxes, (deltas, anchors), torch.ones_like(boxes))


@pytest.mark.cuda
def test_proposal_layer_cuda_has_no_sync():
    layer = ProposalLayer(4, sizes=(16, 32), aspect_ratios=(1.0,), hidden=8).cuda()
    features = torch.randn(2, 4, 3, 5, device="cuda")
    sizes = [(48, 80), (40, 70)]
    layer(features, sizes)  # builds and caches the anchors
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        proposals = layer(features, sizes)
        proposals.boxes.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _capture_and_compare(step, inputs):
    """step(*inputs) captured in a CUDA graph, replayed on new values of the same tensors, equals
    step run eagerly on those values."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        for _ in range(2):
            step(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(*inputs)
    for seed in range(2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            for t in inputs:
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, device="cuda", generator=g, dtype=t.dtype) * 0.1)
        graph.replay()
        eager = step(*inputs)
        for got, want in zip(captured, eager, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.cuda
def test_roi_align_cuda_graph_replays_as_eager():
    x, boxes = _roi_align_inputs()
    x = x.cuda()
    coords = boxes[:, 1:].cuda()
    index = boxes[:, :1].cuda()
    grad = torch.randn(3, 3, 2, 3, device="cuda")

    def step(x, coords, grad):
        x = x.detach().requires_grad_()
        coords = coords.detach().requires_grad_()
        out = ops.roi_align(x, torch.cat([index, coords], 1), (2, 3), 1.0, 2, True)
        return (out, *torch.autograd.grad(out, (x, coords), grad))

    # Deterministic backward only: the atomic one may differ in its last bits between runs.
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _capture_and_compare(step, (x, coords, grad))
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.cuda
def test_propose_cuda_graph_replays_as_eager():
    anchors, deltas, objectness, sizes = (t.cuda() for t in _propose_inputs())
    grad = torch.randn(2, 9, 4, device="cuda")

    def step(anchors, deltas, objectness, sizes, grad):
        deltas = deltas.detach().requires_grad_()
        boxes, scores, counts = ops.propose(
            anchors,
            deltas,
            objectness,
            sizes,
            pre_nms_top_n=20,
            post_nms_top_n=8,
            iou_threshold=0.6,
            append_whole_image=True,
        )
        (grad_deltas,) = torch.autograd.grad(boxes, deltas, grad)
        return boxes, scores, counts, grad_deltas

    _capture_and_compare(step, (anchors, deltas, objectness, sizes, grad))


_DEVICE_ASSERT_CASES = {
    "roi_align": (
        "x = torch.zeros(2, 3, 5, 5, device='cuda')\n"
        "boxes = torch.tensor([[2.0, 0, 0, 2, 2]], device='cuda')\n"
        "torch.ops.mlkernels.roi_align(x, boxes, 1.0, 2, 2, 2, False)\n",
        "roi_align: boxes[:, 0] (batch index)",
    ),
    "propose": (
        "anchors = torch.tensor([[0.0, 0, 4, 4]], device='cuda')\n"
        "sizes = torch.tensor([[8.0, -1.0]], device='cuda')\n"
        "torch.ops.mlkernels.propose(anchors, torch.zeros(1, 1, 4, device='cuda'),\n"
        "    torch.zeros(1, 1, device='cuda'), sizes, *ops.ProposeConfig().op_args())\n",
        "propose: image_sizes must be finite",
    ),
    "propose_backward": (
        "anchors = torch.tensor([[0.0, 0, 4, 4]], device='cuda')\n"
        "torch.ops.mlkernels.propose_backward(torch.ones(1, 1, 4, device='cuda'), anchors,\n"
        "    torch.zeros(1, 1, 4, device='cuda'), torch.tensor([[3]], device='cuda'),\n"
        "    torch.full((1, 2), 8.0, device='cuda'), [1.0] * 4, 4.0)\n",
        "propose_backward: kept_anchors must lie in",
    ),
}


@pytest.mark.cuda
@pytest.mark.parametrize("case", sorted(_DEVICE_ASSERT_CASES))
def test_bad_device_values_end_in_a_device_side_assert(case):
    # In a subprocess: a device-side assert leaves the CUDA context unusable.
    code, message = _DEVICE_ASSERT_CASES[case]
    script = "import torch\nfrom mlkernels import ops\n" + code + "torch.cuda.synchronize()\n"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "device-side assert" in output, output
    assert message in output, output
