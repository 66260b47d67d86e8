"""Code written for torchvision's ops keeps working with ours: TorchScript, torch.fx, torch.export,
autocast, the dtypes torchvision accepts, its degenerate calls and its exception types.

In the spirit of torchvision's test/test_ops.py (not its code): every case compares our op with
itself eager (scripted, traced, exported) or with torchvision on the same inputs."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import DEVICE_IMPLS

import mlkernels
from mlkernels import ops


def _boxes(n: int, generator: torch.Generator, scale: float = 50.0, dtype=torch.float32):
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale / 2 + 1
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def _roi_inputs(device: str, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 12, 14, generator=g, dtype=dtype)
    per_image = [_boxes(4, g, 40.0, dtype), _boxes(3, g, 40.0, dtype)]
    rois = torch.cat(
        [
            torch.cat([torch.full((len(b), 1), float(i), dtype=dtype), b], 1)
            for i, b in enumerate(per_image)
        ]
    )
    return x.to(device), rois.to(device), [b.to(device) for b in per_image]


def _nms_inputs(device: str, n: int = 200, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    boxes = _boxes(n, g, 100.0, dtype)
    scores = torch.rand(n, generator=g).to(dtype)
    idxs = torch.randint(0, 4, (n,), generator=g)
    return boxes.to(device), scores.to(device), idxs.to(device)


# ---- TorchScript ----


@DEVICE_IMPLS
@pytest.mark.parametrize("output_size", [3, (2, 4)])
@pytest.mark.parametrize("aligned", [False, True])
def test_scripted_roi_align_equals_eager(impl, output_size, aligned):
    x, rois, per_image = _roi_inputs(impl.device)
    scripted = torch.jit.script(ops.roi_align)
    size = list(output_size) if isinstance(output_size, tuple) else output_size
    expected = ops.roi_align(x, rois, output_size, 0.5, 2, aligned)
    assert torch.equal(scripted(x, rois, size, 0.5, 2, aligned), expected)
    assert torch.equal(scripted(x, per_image, size, 0.5, 2, aligned), expected)
    # Gradients through the scripted function, as torchvision's tests do before gradcheck (the
    # per-image list: the batch-index column is not differentiable).
    inputs = (x.clone().requires_grad_(), *(b.clone().requires_grad_() for b in per_image))
    assert torch.autograd.gradcheck(
        lambda a, b0, b1: scripted(a, [b0, b1], size, 0.5, 2, aligned), inputs
    )


@DEVICE_IMPLS
@pytest.mark.parametrize("output_size", [3, (2, 4)])
def test_scripted_roi_align_module_equals_eager(impl, output_size):
    x, rois, per_image = _roi_inputs(impl.device)
    layer = mlkernels.nn.RoIAlign(output_size, 0.5, -1, aligned=True)
    scripted = torch.jit.script(layer)
    assert torch.equal(scripted(x, rois), layer(x, rois))
    assert torch.equal(scripted(x, per_image), layer(x, rois))


@DEVICE_IMPLS
def test_scripted_box_ops_equal_eager(impl):
    boxes, scores, idxs = _nms_inputs(impl.device)
    for fn, args in [
        (ops.nms, (boxes, scores, 0.5)),
        (ops.batched_nms, (boxes, scores, idxs, 0.5)),
        (ops.box_iou, (boxes, boxes[:17])),
    ]:
        assert torch.equal(torch.jit.script(fn)(*args), fn(*args)), fn.__name__
    empty = torch.empty(0, device=impl.device)
    assert torch.jit.script(ops.batched_nms)(empty, scores, idxs, 0.5).shape == (0,)


# ---- torch.fx and torch.export ----


class EveryOp(torch.nn.Module):
    """A module that calls every op through the functional API and the layer."""

    def __init__(self):
        super().__init__()
        self.pool = mlkernels.nn.RoIAlign((2, 3), 0.5, 2)

    def forward(self, x, rois, boxes, scores, idxs):
        pooled = ops.roi_align(x, rois, 3, 0.5, 2, True) + 1
        return (
            pooled,
            self.pool(x, rois),
            ops.nms(boxes, scores, 0.5),
            ops.batched_nms(boxes, scores, idxs, 0.5),
            ops.box_iou(boxes, boxes[:9]),
        )


def _every_op_inputs(device: str):
    x, rois, _ = _roi_inputs(device, torch.float32)
    return (x, rois, *_nms_inputs(device, 60))


def _assert_all_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


@DEVICE_IMPLS
def test_fx_traced_module_equals_eager(impl):
    module = EveryOp()
    inputs = _every_op_inputs(impl.device)
    traced = torch.fx.symbolic_trace(module)
    _assert_all_equal(traced(*inputs), module(*inputs))
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    # The layer's call is one leaf node (torch.fx.wrap), as torchvision's RoIAlign.
    assert ops.roi_align in targets, targets
    for op in ("roi_align", "nms", "batched_nms", "box_iou"):
        assert getattr(torch.ops.mlkernels, op).default in targets or any(
            str(t).startswith(f"mlkernels.{op}") for t in targets
        ), (op, targets)


@DEVICE_IMPLS
def test_fx_traced_list_boxes(impl):
    x, rois, per_image = _roi_inputs(impl.device)

    class ListBoxes(torch.nn.Module):
        def forward(self, x, a, b):
            return ops.roi_align(x, [a, b], 2, 0.5, 2)

    traced = torch.fx.symbolic_trace(ListBoxes())
    assert torch.equal(traced(x, *per_image), ops.roi_align(x, rois, 2, 0.5, 2))


@DEVICE_IMPLS
def test_exported_module_equals_eager(impl):
    module = EveryOp()
    inputs = _every_op_inputs(impl.device)
    exported = torch.export.export(module, inputs)
    _assert_all_equal(exported.module()(*inputs), module(*inputs))
    # Other inputs of the same shapes give the eager results too (nothing baked in).
    other = _every_op_inputs(impl.device)
    other = (other[0] * 2, *other[1:3], other[3].flip(0), other[4])
    _assert_all_equal(exported.module()(*other), module(*other))


# ---- autocast and dtypes ----


@DEVICE_IMPLS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_every_op_as_torchvision(impl, dtype):
    x, rois, _ = _roi_inputs(impl.device, torch.float32)
    boxes, scores, idxs = _nms_inputs(impl.device)
    with torch.autocast(impl.device, dtype=dtype):
        ours = [
            ops.roi_align(x.to(dtype), rois, 3, 0.5, 2),
            ops.nms(boxes, scores.to(dtype), 0.5),
            torch.ops.mlkernels.nms(boxes.to(dtype), scores, 0.5),
            ops.batched_nms(boxes.to(dtype), scores, idxs, 0.5),
        ]
        theirs = [
            torchvision.ops.roi_align(x.to(dtype), rois, 3, 0.5, 2),
            torchvision.ops.nms(boxes, scores.to(dtype), 0.5),
            torchvision.ops.nms(boxes.to(dtype), scores, 0.5),
        ]
    # torchvision's batched_nms offsets the boxes of each group in their own dtype before its
    # nms upcasts them, which rounds bfloat16/float16 boxes further; ours compares the given
    # values in float32, as torchvision's on float32 copies of them.
    theirs.append(torchvision.ops.batched_nms(boxes.to(dtype).float(), scores, idxs, 0.5))
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


@DEVICE_IMPLS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_nms_equals_float32_of_the_same_values(impl, dtype):
    boxes, scores, idxs = _nms_inputs(impl.device)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    assert torch.equal(ops.nms(boxes, scores, 0.5), ops.nms(boxes.float(), scores.float(), 0.5))
    assert torch.equal(
        ops.batched_nms(boxes, scores, idxs, 0.5),
        ops.batched_nms(boxes.float(), scores.float(), idxs, 0.5),
    )


def _integer_boxes(dtype, device, top=200):
    g = torch.Generator().manual_seed(2)
    xy = torch.randint(0, top, (30, 2), generator=g)
    wh = torch.randint(0, top // 2, (30, 2), generator=g)  # some empty boxes too
    return torch.cat([xy, xy + wh], 1).to(dtype).to(device)


@DEVICE_IMPLS
@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16]
)
def test_box_iou_integer_and_half_as_torchvision(impl, dtype):
    # Corners below 2**7 (int8) or 2**8 are exact in every dtype here, so the IoUs are too.
    boxes = _integer_boxes(dtype, impl.device, top=80 if dtype == torch.int8 else 200)
    ours, theirs = ops.box_iou(boxes, boxes[:11]), torchvision.ops.box_iou(boxes, boxes[:11])
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


@DEVICE_IMPLS
def test_box_iou_uint8_is_the_iou_of_its_values(impl):
    """torchvision subtracts uint8 corners in uint8, which wraps around for boxes that do not
    overlap (IoUs above 1); ours are the IoUs of the values, as in float64."""
    boxes = _integer_boxes(torch.uint8, impl.device, top=120)
    expected = torchvision.ops.box_iou(boxes.double(), boxes[:11].double()).float()
    torch.testing.assert_close(ops.box_iou(boxes, boxes[:11]), expected, equal_nan=True)


def test_box_iou_half_rounding_bound():
    """torchvision subtracts float16 corners in float16, we in float32: apart by float16's
    rounding of the intersection sides at most."""
    g = torch.Generator().manual_seed(3)
    boxes = _boxes(40, g, 500.0).half()
    ours, theirs = ops.box_iou(boxes, boxes), torchvision.ops.box_iou(boxes, boxes)
    torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=2e-3)


# ---- degenerate calls and exception types ----


@DEVICE_IMPLS
def test_degenerate_calls_as_torchvision(impl):
    device = impl.device
    for empty in (torch.empty(0, device=device), torch.empty(0, 4, device=device)):
        ours = ops.batched_nms(empty, None, None, 0.5)
        theirs = torchvision.ops.batched_nms(empty, None, None, 0.5)
        assert ours.dtype == theirs.dtype == torch.int64 and ours.shape == theirs.shape == (0,)
        assert ours.device == empty.device
    x, _, _ = _roi_inputs(device)
    no_boxes = torch.empty(0, 4, dtype=x.dtype, device=device)
    assert ops.roi_align(x, [no_boxes, no_boxes], 2).shape == (0, 3, 2, 2)
    assert ops.nms(no_boxes, torch.empty(0, dtype=x.dtype, device=device), 0.5).shape == (0,)
    assert ops.box_iou(no_boxes, no_boxes[:0]).shape == (0, 0)


@pytest.mark.parametrize(
    "boxes",
    [
        torch.zeros(3, 4),  # Tensor without the batch-index column
        torch.zeros(3, 6),
        torch.zeros(5),
        [torch.zeros(3, 5)],  # list of Tensor[L, 5]
        [torch.zeros(2, 4), torch.zeros(3)],
    ],
    ids=["tensor-k4", "tensor-k6", "tensor-1d", "list-l5", "list-1d"],
)
def test_wrong_boxes_shape_is_an_assertion_error_too(boxes):
    x = torch.zeros(2, 3, 8, 8)
    for call in (
        lambda: ops.roi_align(x, boxes, 2),
        lambda: mlkernels.nn.RoIAlign(2, 1.0, 2)(x, boxes),
    ):
        with pytest.raises(AssertionError, match="roi_align: boxes must be") as info:
            call()
        assert isinstance(info.value, RuntimeError)
        assert isinstance(info.value, mlkernels.ShapeError)


def test_quantized_input_gets_a_clear_error():
    q = torch.quantize_per_tensor(torch.rand(1, 2, 4, 4), 0.1, 0, torch.quint8)
    boxes = torch.tensor([[0.0, 0, 0, 2, 2]])
    with pytest.raises(
        NotImplementedError,
        match=r"roi_align: input must be a float tensor, got a quantized quint8 tensor .*dequant",
    ):
        ops.roi_align(q, boxes, 2)
    qb = torch.quantize_per_tensor(torch.rand(3, 4), 0.1, 0, torch.quint8)
    with pytest.raises(
        NotImplementedError, match="nms: boxes must be a float tensor, got a quantized"
    ):
        ops.nms(qb, torch.rand(3), 0.5)
    with pytest.raises(
        NotImplementedError, match="box_iou: boxes1 must be a float tensor, got a quantized"
    ):
        ops.box_iou(qb, qb)


@DEVICE_IMPLS
@pytest.mark.parametrize("fmt", ["xywh", "cxcywh"])
def test_box_iou_formats_as_torchvision(impl, fmt):
    g = torch.Generator().manual_seed(4)
    boxes = torchvision.ops.box_convert(_boxes(25, g, 100.0), "xyxy", fmt).to(impl.device)
    ours, theirs = (
        ops.box_iou(boxes, boxes[:6], fmt),
        torchvision.ops.box_iou(boxes, boxes[:6], fmt),
    )
    # torchvision takes cxcywh areas as w * h, we as the converted corners' (x2 - x1) * (y2 - y1):
    # a few float32 roundings of coordinates up to ~150 apart (measured: 2.7e-6 at most).
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.jit.script(ops.box_iou)(boxes, boxes[:6], fmt), ours)
    with pytest.raises(
        ValueError, match="box_iou: fmt must be one of xyxy, xywh, cxcywh, got 'xywhr'"
    ):
        ops.box_iou(boxes, boxes, "xywhr")
