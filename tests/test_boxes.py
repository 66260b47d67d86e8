"""encode_boxes / decode_boxes / box_iou: every implementation (CPU, the CUDA kernels' logic on the
grid emulator, CUDA) against torchvision and the reference; gradients, opcheck, bad input, empty
input."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from helpers import (
    ALL_IMPLS,
    DEVICE_IMPLS,
    assert_coords_close,
    assert_raises,
    impl_params,
    random_boxes,
    run_opcheck,
)
from hypothesis import given
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder

from mlkernels import ops, reference

CLAMP = math.log(1000.0 / 16)
DTYPES = [torch.float32, torch.float64]

weights_st = st.tuples(*[st.sampled_from([1.0, 0.5, 2.0, 10.0, 5.0])] * 4)


def _inputs(seed: int, n: int, dtype: torch.dtype, min_side: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    anchors = random_boxes(n, generator=g, dtype=dtype, min_side=min_side, offset=-30.0)
    deltas = (torch.randn(n, 4, generator=g, dtype=torch.float64) * 2).to(dtype)
    return deltas, anchors


# ---- forward: every implementation against torchvision and the reference ----


@ALL_IMPLS
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 300),
    weights=weights_st,
    dtype=st.sampled_from(DTYPES),
)
def test_decode_matches_torchvision_and_reference(impl, seed, n, weights, dtype):
    deltas, anchors = _inputs(seed, n, dtype)
    deltas[::7, 2:] = 9.0  # past the clamp
    args = (deltas, anchors, list(weights), CLAMP)
    ours = impl.call("decode_boxes", *args)
    expected = BoxCoder(weights).decode_single(deltas, anchors)
    assert_coords_close(ours, expected)
    assert_coords_close(ours, reference.decode_boxes(deltas, anchors, weights))
    impl.assert_matches_cpu(ours, "decode_boxes", *args)


@ALL_IMPLS
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 300),
    weights=weights_st,
    dtype=st.sampled_from(DTYPES),
    degenerate=st.booleans(),
)
def test_encode_matches_torchvision_and_reference(impl, seed, n, weights, dtype, degenerate):
    g = torch.Generator().manual_seed(seed)
    anchors = random_boxes(n, generator=g, dtype=dtype, offset=-30.0)
    boxes = random_boxes(n, generator=g, dtype=dtype, offset=-30.0)
    if degenerate and n:  # empty and inverted boxes and anchors: inf/NaN exactly as torchvision
        boxes[::3, 2] = boxes[::3, 0]
        boxes[1::3, 3] = boxes[1::3, 1] - 1
        anchors[::4, 2] = anchors[::4, 0]
    ours = impl.call("encode_boxes", boxes, anchors, list(weights))
    expected = BoxCoder(weights).encode_single(boxes, anchors)
    torch.testing.assert_close(ours, expected, equal_nan=True)
    torch.testing.assert_close(
        ours, reference.encode_boxes(boxes, anchors, weights), equal_nan=True
    )
    impl.assert_matches_cpu(ours, "encode_boxes", boxes, anchors, list(weights), equal_nan=True)
    if degenerate and n:
        assert not torch.isfinite(ours).all()


@ALL_IMPLS
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 40),
    m=st.integers(0, 40),
    dtype=st.sampled_from(DTYPES),
    degenerate=st.booleans(),
)
def test_box_iou_matches_torchvision(impl, seed, n, m, dtype, degenerate):
    g = torch.Generator().manual_seed(seed)
    min_side = -5.0 if degenerate else 0.5  # degenerate: zero and negative widths too
    a = random_boxes(n, generator=g, dtype=dtype, min_side=min_side, offset=-20.0)
    b = random_boxes(m, generator=g, dtype=dtype, min_side=min_side, offset=-20.0)
    if n and m:
        b[0] = a[0]  # an identical pair: IoU exactly 1
    ours = impl.call("box_iou", a, b)
    expected = torchvision.ops.box_iou(a, b)
    torch.testing.assert_close(ours, expected, equal_nan=True)
    torch.testing.assert_close(ours, reference.box_iou(a, b), equal_nan=True)
    impl.assert_matches_cpu(ours, "box_iou", a, b, equal_nan=True)
    if n and m and not degenerate:
        assert ours[0, 0] == 1


@DEVICE_IMPLS
def test_roundtrip_encode_decode(impl):
    deltas, anchors = _inputs(1, 500, torch.float64)
    deltas[:, 2:] = deltas[:, 2:].clamp(max=3)
    d, a = impl.to(deltas, anchors)
    boxes = ops.decode_boxes(d, a, (10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(ops.encode_boxes(boxes, a, (10.0, 10.0, 5.0, 5.0)).cpu(), deltas)


W1 = [1.0, 1.0, 1.0, 1.0]


@ALL_IMPLS
def test_broadcasting(impl):
    g = torch.Generator().manual_seed(3)
    anchors = random_boxes(12, generator=g)  # [A, 4]
    deltas = torch.randn(3, 12, 4, generator=g)  # [N, A, 4]
    ours = impl.call("decode_boxes", deltas, anchors, W1, CLAMP)
    assert ours.shape == (3, 12, 4)
    for i in range(3):
        assert_coords_close(ours[i], impl.call("decode_boxes", deltas[i], anchors, W1, CLAMP))
    assert_coords_close(ours, reference.decode_boxes(deltas, anchors))
    enc = impl.call("encode_boxes", ours, anchors, W1)
    torch.testing.assert_close(enc, reference.encode_boxes(ours, anchors))


@ALL_IMPLS
def test_non_contiguous_inputs(impl):
    g = torch.Generator().manual_seed(4)
    anchors = random_boxes(50, generator=g, dtype=torch.float64)
    wide = torch.randn(50, 8, generator=g, dtype=torch.float64)
    deltas = wide[:, ::2]  # stride 2
    expected = reference.decode_boxes(deltas, anchors)
    expected_iou = reference.box_iou(anchors, anchors)
    anchors, wide = impl.to(anchors, wide)  # made strided on the device
    deltas = wide[:, ::2]
    assert not deltas.is_contiguous()
    torch.testing.assert_close(impl.call("decode_boxes", deltas, anchors, W1, CLAMP), expected)
    a_t = anchors.t().contiguous().t()
    assert not a_t.is_contiguous()
    torch.testing.assert_close(impl.call("box_iou", a_t, anchors), expected_iou)


@ALL_IMPLS
def test_nan_and_inf_propagate_like_torchvision(impl):
    deltas, anchors = _inputs(5, 8, torch.float32)
    deltas[0, 0] = float("nan")
    deltas[1, 2] = float("inf")  # clamped
    deltas[2, 3] = float("nan")  # NaN passes through the clamp
    ours = impl.call("decode_boxes", deltas, anchors, W1, CLAMP)
    torch.testing.assert_close(
        ours, BoxCoder((1.0,) * 4).decode_single(deltas, anchors), equal_nan=True
    )
    assert torch.isfinite(ours[1]).all()


# ---- empty inputs ----


@DEVICE_IMPLS
def test_empty_inputs(impl):
    empty = torch.zeros(0, 4, device=impl.device)
    one = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=impl.device)
    assert ops.decode_boxes(empty, empty).shape == (0, 4)
    assert ops.encode_boxes(empty, one).shape == (0, 4)
    assert ops.box_iou(empty, one).shape == (0, 1)
    assert ops.box_iou(one, empty).shape == (1, 0)
    assert ops.decode_boxes(torch.zeros(2, 0, 4, device=impl.device), one).shape == (2, 0, 4)


@ALL_IMPLS
def test_empty_inputs_raw(impl):
    empty, one = torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert impl.call("decode_boxes", empty, empty, W1, CLAMP).shape == (0, 4)
    assert impl.call("encode_boxes", empty, one, W1).shape == (0, 4)
    assert impl.call("box_iou", empty, one).shape == (0, 1)
    assert impl.call("box_iou", one, empty).shape == (1, 0)
    grad = impl.call("decode_boxes_backward", empty, empty, one, W1, CLAMP)
    assert [g.shape for g in grad] == [(0, 4), (0, 4)]  # the broadcast shape; wrappers sum


# ---- gradients ----


@DEVICE_IMPLS
@given(seed=st.integers(0, 2**31), n=st.integers(1, 12), weights=weights_st)
def test_decode_gradcheck(impl, seed, n, weights):
    deltas, anchors = _inputs(seed, n, torch.float64)
    deltas = deltas.clamp(-3, 3)
    deltas[0, 2] = 6.0  # one clamped dw: zero gradient, away from the kink at the clamp
    deltas, anchors = impl.to(deltas, anchors)
    deltas.requires_grad_(True)
    anchors.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda d, a: ops.decode_boxes(d, a, weights), (deltas, anchors))


@DEVICE_IMPLS
def test_decode_gradcheck_broadcast(impl):
    deltas, anchors = impl.to(*_inputs(7, 5, torch.float64))
    deltas = deltas.clamp(-2, 2).reshape(1, 5, 4).repeat(3, 1, 1).requires_grad_(True)
    anchors.requires_grad_(True)
    assert torch.autograd.gradcheck(ops.decode_boxes, (deltas, anchors))


@DEVICE_IMPLS
def test_decode_gradient_matches_reference_autograd(impl):
    deltas, anchors = _inputs(8, 64, torch.float64)
    deltas[::5, 2] = 7.0
    d1, a1 = (t.requires_grad_() for t in impl.to(deltas.clone(), anchors.clone()))
    d2, a2 = deltas.clone().requires_grad_(), anchors.clone().requires_grad_()
    grad = torch.randn(64, 4, dtype=torch.float64)
    ops.decode_boxes(d1, a1, (2.0, 2.0, 1.0, 1.0)).backward(impl.to(grad))
    reference.decode_boxes(d2, a2, (2.0, 2.0, 1.0, 1.0)).backward(grad)
    torch.testing.assert_close(d1.grad.cpu(), d2.grad)
    torch.testing.assert_close(a1.grad.cpu(), a2.grad)


@ALL_IMPLS
def test_decode_backward_matches_reference_autograd_and_cpu(impl):
    deltas, anchors = _inputs(9, 200, torch.float64)
    grad = torch.randn(200, 4, dtype=torch.float64)
    w = [1.0, 2.0, 3.0, 4.0]
    got = impl.call("decode_boxes_backward", grad, deltas, anchors, w, 2.0)
    d, a = deltas.clone().requires_grad_(), anchors.clone().requires_grad_()
    expected = torch.autograd.grad(reference.decode_boxes(d, a, w, 2.0), (d, a), grad)
    torch.testing.assert_close(got, expected)
    impl.assert_matches_cpu(got, "decode_boxes_backward", grad, deltas, anchors, w, 2.0)


@DEVICE_IMPLS
def test_not_differentiable_ops_say_so(impl):
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]], device=impl.device, requires_grad=True)
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]], device=impl.device)
    with pytest.raises(RuntimeError, match="box_iou: is not differentiable"):
        ops.box_iou(a, b).sum().backward()
    with pytest.raises(RuntimeError, match="encode_boxes: is not differentiable"):
        ops.encode_boxes(b, a).sum().backward()


# ---- opcheck ----


def _opcheck_samples():
    deltas, anchors = _inputs(11, 6, torch.float64)
    w = [1.0, 1.0, 2.0, 2.0]
    yield "decode_boxes", (deltas.requires_grad_(), anchors.requires_grad_(), w, CLAMP)
    yield "decode_boxes", (deltas.detach()[None].expand(2, 6, 4), anchors.detach(), w, 1.0)
    yield "encode_boxes", (anchors.detach() + 1, anchors.detach(), w)
    yield "box_iou", (anchors.detach(), anchors.detach()[:3])
    yield "box_iou", (anchors.detach()[:0], anchors.detach())
    grad = torch.randn(6, 4, dtype=torch.float64)
    yield "decode_boxes_backward", (grad, deltas.detach(), anchors.detach(), w, CLAMP)


@DEVICE_IMPLS
@pytest.mark.parametrize(
    "name,args", list(_opcheck_samples()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_opcheck(impl, name, args):
    run_opcheck(impl, name, args)


# ---- bad input: clear errors, the same from the fake kernels ----

BAD_CASES = [
    (
        "decode_boxes",
        (torch.zeros(3, 5), torch.zeros(3, 4)),
        RuntimeError,
        r"decode_boxes: deltas must be Tensor\[\.\.\., 4\], got Tensor\[3, 5\]",
    ),
    (
        "decode_boxes",
        (torch.zeros(3, 4), torch.zeros(2, 4)),
        RuntimeError,
        r"decode_boxes: deltas and anchors must broadcast to one shape, got "
        r"Tensor\[3, 4\] and Tensor\[2, 4\]",
    ),
    (
        "decode_boxes",
        (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64)),
        RuntimeError,
        "decode_boxes: deltas must be float32 or float64, got int64",
    ),
    (
        "decode_boxes",
        (torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64)),
        RuntimeError,
        r"decode_boxes: anchors must have the dtype of deltas \(float32\), got float64",
    ),
    (
        "encode_boxes",
        (torch.zeros(3, 4), torch.zeros(3)),
        RuntimeError,
        r"encode_boxes: anchors must be Tensor\[\.\.\., 4\], got Tensor\[3\]",
    ),
    (
        "box_iou",
        (torch.zeros(2, 3, 4), torch.zeros(3, 4)),
        RuntimeError,
        r"box_iou: boxes1 must be Tensor\[N, 4\], got Tensor\[2, 3, 4\]",
    ),
]


@pytest.mark.parametrize("name,args,error,message", BAD_CASES)
@pytest.mark.parametrize("mode", ["eager", "fake"])
def test_bad_input_messages(name, args, error, message, mode):
    fn = getattr(ops, name)
    assert_raises(fn, args, error, message, mode)


@pytest.mark.parametrize("mode", ["eager", "fake"])
def test_decode_backward_checks_its_grad(mode):
    op = torch.ops.mlkernels.decode_boxes_backward
    deltas, anchors = torch.zeros(3, 4), torch.zeros(1, 4)
    w = [1.0] * 4
    assert_raises(
        op,
        (torch.zeros(1, 4), deltas, anchors, w, CLAMP),
        RuntimeError,
        r"decode_boxes_backward: grad must be Tensor\[3, 4\] \(the broadcast shape of deltas "
        r"and anchors\), got Tensor\[1, 4\]",
        mode,
    )
    assert_raises(
        op,
        (torch.zeros(3, 4, dtype=torch.float64), deltas, anchors, w, CLAMP),
        RuntimeError,
        r"decode_boxes_backward: grad must have the dtype of deltas \(float32\), got float64",
        mode,
    )


@pytest.mark.parametrize(
    "weights,message",
    [
        ((1.0, 1.0, 1.0), r"weights must be 4 numbers \(wx, wy, ww, wh\), got 3"),
        ((1.0, 0.0, 1.0, 1.0), "weights must be finite and positive"),
        ((1.0, float("nan"), 1.0, 1.0), "weights must be finite and positive"),
    ],
)
def test_bad_weights(weights, message):
    boxes = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="decode_boxes: " + message):
        ops.decode_boxes(boxes, boxes, weights)
    with pytest.raises(ValueError, match="encode_boxes: " + message):
        ops.encode_boxes(boxes, boxes, weights)


def test_bad_clamp_and_types():
    boxes = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="decode_boxes: clamp must be a number, got nan"):
        ops.decode_boxes(boxes, boxes, clamp=float("nan"))
    with pytest.raises(TypeError, match="box_iou: boxes2 must be a Tensor, got list"):
        ops.box_iou(boxes, [[0, 0, 1, 1]])


# ---- torch.compile ----


def test_torch_compile_decode():
    deltas, anchors = _inputs(12, 10, torch.float32)
    compiled = torch.compile(lambda d, a: ops.decode_boxes(d, a) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(deltas, anchors), ops.decode_boxes(deltas, anchors) * 2)


# ---- larger inputs: many blocks ----


@pytest.mark.parametrize("impl", impl_params("emulated", "cuda"))
def test_large_inputs_match_cpu(impl):
    deltas, anchors = _inputs(13, 1000, torch.float32)
    args = (deltas, anchors, W1, CLAMP)
    impl.assert_matches_cpu(impl.call("decode_boxes", *args), "decode_boxes", *args)
    boxes = torch.ops.mlkernels.decode_boxes(*args)
    args = (boxes, anchors, W1)
    impl.assert_matches_cpu(impl.call("encode_boxes", *args), "encode_boxes", *args)
    impl.assert_matches_cpu(impl.call("box_iou", boxes, anchors), "box_iou", boxes, anchors)


@pytest.mark.parametrize("impl", impl_params("cuda"))
def test_decode_gradcheck_many_boxes(impl):
    deltas, anchors = impl.to(*_inputs(13, 1000, torch.float64))
    d = deltas.clamp(-2, 2).requires_grad_()
    a = anchors.requires_grad_()
    assert torch.autograd.gradcheck(ops.decode_boxes, (d, a))
