"""Box coding and IoU: encode_boxes, decode_boxes, box_iou.

Kernels: csrc/boxes (CPU, CUDA); pure-PyTorch equivalents: mlkernels.reference.boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor

from . import _checks as C

DEFAULT_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
DEFAULT_CLAMP = math.log(1000.0 / 16)  # torchvision's bbox_xform_clip

_ops = torch.ops.mlkernels


def encode_boxes(
    boxes: Tensor, anchors: Tensor, weights: Sequence[float] = DEFAULT_WEIGHTS
) -> Tensor:
    """Regression targets that turn ``anchors`` into ``boxes`` (``BoxCoder.encode_single``).

    Args:
        boxes (Tensor[..., 4]): target boxes, (x1, y1, x2, y2).
        anchors (Tensor[..., 4]): reference boxes, broadcast against ``boxes``.
        weights: (wx, wy, ww, wh), finite and positive (within float32's normal range).

    Returns:
        Tensor[..., 4]: (dx, dy, dw, dh) in the broadcast shape, with
        ``dx = wx * (cx - acx) / aw`` and ``dw = ww * log(w / aw)``.

    Not differentiable (targets need no gradient): backward through it raises.
    Equivalent PyTorch code: :func:`mlkernels.reference.encode_boxes`.
    """
    C.check_tensor("encode_boxes", "boxes", boxes)
    C.check_tensor("encode_boxes", "anchors", anchors)
    return _ops.encode_boxes(boxes, anchors, C.as_floats("encode_boxes", "weights", weights))


def decode_boxes(
    deltas: Tensor,
    anchors: Tensor,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    clamp: float = DEFAULT_CLAMP,
) -> Tensor:
    """Boxes that ``deltas`` make of ``anchors`` (torchvision ``BoxCoder.decode_single``).

    Args:
        deltas (Tensor[..., 4]): (dx, dy, dw, dh).
        anchors (Tensor[..., 4]): (x1, y1, x2, y2), broadcast against ``deltas``.
        weights: (wx, wy, ww, wh), finite and positive (within float32's normal range);
            deltas are divided by them.
        clamp: dw and dh are clamped from above at this value before ``exp`` (no gradient
            flows through a clamped value, as with ``torch.clamp``).

    Returns:
        Tensor[..., 4]: (x1, y1, x2, y2) in the broadcast shape.

    Differentiable w.r.t. ``deltas`` and ``anchors`` (only the gradients asked for are
    computed); second derivatives raise.
    Equivalent PyTorch code: :func:`mlkernels.reference.decode_boxes`.
    """
    C.check_tensor("decode_boxes", "deltas", deltas)
    C.check_tensor("decode_boxes", "anchors", anchors)
    weights = C.as_floats("decode_boxes", "weights", weights)
    return _ops.decode_boxes(deltas, anchors, weights, C.as_float("decode_boxes", "clamp", clamp))


BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


def _check_box_iou_args(boxes1: object, boxes2: object, fmt: object) -> None:
    C.check_tensor("box_iou", "boxes1", boxes1)
    C.check_tensor("box_iou", "boxes2", boxes2)
    if fmt not in BOX_FORMATS:
        rotated = " (rotated boxes: torchvision.ops.box_iou)" if isinstance(fmt, str) else ""
        raise ValueError(
            f"box_iou: fmt must be one of {', '.join(BOX_FORMATS)}, got {fmt!r}{rotated}"
        )


def box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
    """Intersection over union of every pair of boxes (``torchvision.ops.box_iou``).

    Args:
        boxes1 (Tensor[N, 4]): float or integer boxes in ``fmt``.
        boxes2 (Tensor[M, 4]): same dtype and device.
        fmt: "xyxy" (x1, y1, x2, y2; the default), "xywh" (x1, y1, width, height) or "cxcywh"
            (centre, width, height); the other two are converted to "xyxy" by
            ``torchvision.ops.box_convert`` first. torchvision's rotated formats are not
            supported.

    Returns:
        Tensor[N, M]: IoU of ``boxes1[i]`` and ``boxes2[j]``; 0/0 (two empty boxes) gives NaN,
        as in torchvision. float64 for float64 boxes, else float32 (as torchvision): float16 and
        bfloat16 boxes are computed in float32, integer boxes in float64 (exact areas).
        torchvision subtracts float16 corners in float16 (and uint8 corners in uint8, which
        wraps around), so its IoUs of such boxes can differ from ours; integer ones agree
        while areas stay below 2**24.

    Not differentiable: backward through it raises. Scriptable, traceable by ``torch.fx``.
    Equivalent PyTorch code: :func:`mlkernels.reference.box_iou`.
    """
    if not torch.jit.is_scripting():
        if not C.symbolic_tracing():
            _check_box_iou_args(boxes1, boxes2, fmt)
    if fmt != "xyxy":
        boxes1 = torchvision.ops.box_convert(boxes1, fmt, "xyxy")
        boxes2 = torchvision.ops.box_convert(boxes2, fmt, "xyxy")
    return torch.ops.mlkernels.box_iou(boxes1, boxes2)


# ---- fake kernels: the C++ checks, repeated, and the output shapes ----


@torch.library.register_fake("mlkernels::encode_boxes")
def _encode_boxes_fake(boxes, anchors, weights):
    C.check_weights("encode_boxes", weights)
    shape = C.paired_boxes_shape("encode_boxes", "boxes", boxes, "anchors", anchors)
    return boxes.new_empty(shape)


@torch.library.register_fake("mlkernels::decode_boxes")
def _decode_boxes_fake(deltas, anchors, weights, clamp):
    C.check_weights("decode_boxes", weights)
    C.check_clamp("decode_boxes", clamp)
    shape = C.paired_boxes_shape("decode_boxes", "deltas", deltas, "anchors", anchors)
    return deltas.new_empty(shape)


@torch.library.register_fake("mlkernels::decode_boxes_backward")
def _decode_boxes_backward_fake(grad, deltas, anchors, weights, clamp, output_mask=(True, True)):
    op = "decode_boxes_backward"
    C.check_weights(op, weights)
    C.check_clamp(op, clamp)
    shape = C.paired_boxes_shape(op, "deltas", deltas, "anchors", anchors)
    C.check_defined(op, "grad", grad)
    C.check_same_dtype(op, "deltas", deltas, "grad", grad)
    C.check_same_device(op, "deltas", deltas, "grad", grad)
    C.check(
        grad.shape == shape,
        f"{op}: grad must be Tensor[{', '.join(str(s) for s in shape)}] "
        f"(the broadcast shape of deltas and anchors), got {C.shape_str(grad)}",
    )
    full = deltas.new_empty(shape)
    return C.masked_outputs(op, output_mask, full, full)


@torch.library.register_fake("mlkernels::box_iou")
def _box_iou_fake(boxes1, boxes2):
    C.check_defined("box_iou", "boxes1", boxes1)
    C.check_defined("box_iou", "boxes2", boxes2)
    C.check_boxes("box_iou", "boxes1", boxes1, exact_dim=2)
    C.check_boxes("box_iou", "boxes2", boxes2, exact_dim=2)
    dtype = boxes1.dtype
    C.check(
        dtype.is_floating_point or dtype in C.INTEGER_TYPES,
        f"box_iou: boxes1 must be a floating or integer tensor, got {C.dtype_str(dtype)}",
    )
    C.check_same_dtype("box_iou", "boxes1", boxes1, "boxes2", boxes2)
    C.check_same_device("box_iou", "boxes1", boxes1, "boxes2", boxes2)
    result_type = torch.float64 if dtype == torch.float64 else torch.float32
    shape = (boxes1.shape[0], boxes2.shape[0])
    return C.allocate_output("box_iou", boxes1, shape, dtype=result_type)


# ---- autograd ----


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """Undo broadcasting: sum ``grad`` (the broadcast shape) down to ``like``'s shape."""
    return grad.sum_to_size(like.shape) if grad.shape != like.shape else grad


def _decode_setup(ctx, inputs, output):
    deltas, anchors, weights, clamp = inputs
    ctx.save_for_backward(deltas, anchors)
    ctx.weights, ctx.clamp = weights, clamp


def _decode_backward(ctx, grad):
    deltas, anchors = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:2])
    grad_deltas, grad_anchors = _ops.decode_boxes_backward(
        grad.contiguous(), deltas, anchors, ctx.weights, ctx.clamp, mask
    )
    return (
        _sum_to(grad_deltas, deltas) if mask[0] else None,
        _sum_to(grad_anchors, anchors) if mask[1] else None,
        None,
        None,
    )


torch.library.register_autograd(
    "mlkernels::decode_boxes", _decode_backward, setup_context=_decode_setup
)
C.no_double_backward("decode_boxes_backward")


def _not_differentiable(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op}: is not differentiable; detach its inputs "
            f"(mlkernels.reference.{op} is a differentiable PyTorch version)"
        )

    return backward


torch.library.register_autograd(
    "mlkernels::encode_boxes", _not_differentiable("encode_boxes"), setup_context=None
)
torch.library.register_autograd(
    "mlkernels::box_iou", _not_differentiable("box_iou"), setup_context=None
)
