"""Box ops: encode_boxes, decode_boxes, box_iou, generate_anchors, nms, batched_nms, propose.

Kernels: csrc/boxes (CPU, CUDA); pure-PyTorch equivalents: mlkernels.reference.boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
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
        weights: (wx, wy, ww, wh), finite and positive.

    Returns:
        Tensor[..., 4]: (dx, dy, dw, dh) in the broadcast shape, with
        ``dx = wx * (cx - acx) / aw`` and ``dw = ww * log(w / aw)``.

    Not differentiable (targets need no gradient): backward through it raises.
    Equivalent PyTorch code: :func:`mlkernels.reference.encode_boxes`.
    """
    C.check_tensor("encode_boxes", "boxes", boxes)
    C.check_tensor("encode_boxes", "anchors", anchors)
    return _ops.encode_boxes(boxes, anchors, [float(w) for w in weights])


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
        weights: (wx, wy, ww, wh), finite and positive; deltas are divided by them.
        clamp: dw and dh are clamped from above at this value before ``exp`` (no gradient
            flows through a clamped value, as with ``torch.clamp``).

    Returns:
        Tensor[..., 4]: (x1, y1, x2, y2) in the broadcast shape.

    Differentiable w.r.t. ``deltas`` and ``anchors``.
    Equivalent PyTorch code: :func:`mlkernels.reference.decode_boxes`.
    """
    C.check_tensor("decode_boxes", "deltas", deltas)
    C.check_tensor("decode_boxes", "anchors", anchors)
    return _ops.decode_boxes(deltas, anchors, [float(w) for w in weights], float(clamp))


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over union of every pair of boxes (``torchvision.ops.box_iou``).

    Args:
        boxes1 (Tensor[N, 4]): (x1, y1, x2, y2).
        boxes2 (Tensor[M, 4]): (x1, y1, x2, y2), same dtype and device.

    Returns:
        Tensor[N, M]: IoU of ``boxes1[i]`` and ``boxes2[j]``; 0/0 (two empty boxes) gives NaN,
        as in torchvision.

    Not differentiable: backward through it raises.
    Equivalent PyTorch code: :func:`mlkernels.reference.box_iou`.
    """
    C.check_tensor("box_iou", "boxes1", boxes1)
    C.check_tensor("box_iou", "boxes2", boxes2)
    return _ops.box_iou(boxes1, boxes2)


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
def _decode_boxes_backward_fake(grad, deltas, anchors, weights, clamp):
    op = "decode_boxes_backward"
    C.check_weights(op, weights)
    C.check_clamp(op, clamp)
    shape = C.paired_boxes_shape(op, "deltas", deltas, "anchors", anchors)
    C.check_same_dtype(op, "deltas", deltas, "grad", grad)
    C.check_same_device(op, "deltas", deltas, "grad", grad)
    C.check(
        grad.shape == shape,
        f"{op}: grad must be Tensor[{', '.join(str(s) for s in shape)}] "
        f"(the broadcast shape of deltas and anchors), got {C.shape_str(grad)}",
    )
    return deltas.new_empty(shape), deltas.new_empty(shape)


@torch.library.register_fake("mlkernels::box_iou")
def _box_iou_fake(boxes1, boxes2):
    C.check_boxes("box_iou", "boxes1", boxes1, exact_dim=2)
    C.check_boxes("box_iou", "boxes2", boxes2, exact_dim=2)
    C.check_floating("box_iou", "boxes1", boxes1)
    C.check_same_dtype("box_iou", "boxes1", boxes1, "boxes2", boxes2)
    C.check_same_device("box_iou", "boxes1", boxes1, "boxes2", boxes2)
    return boxes1.new_empty((boxes1.shape[0], boxes2.shape[0]))


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
    grad_deltas, grad_anchors = _ops.decode_boxes_backward(
        grad.contiguous(), deltas, anchors, ctx.weights, ctx.clamp
    )
    return _sum_to(grad_deltas, deltas), _sum_to(grad_anchors, anchors), None, None


torch.library.register_autograd(
    "mlkernels::decode_boxes", _decode_backward, setup_context=_decode_setup
)


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


# ---- anchors, NMS and proposals ----


def _pair(value: int | float | Sequence[int | float], name: str) -> tuple[float, float]:
    """An int/float or an (h, w) pair, as (h, w)."""
    if isinstance(value, (int, float)):
        return float(value), float(value)
    pair = tuple(value)
    if len(pair) != 2:
        raise ValueError(f"generate_anchors: {name} must be a number or (h, w), got {value!r}")
    return float(pair[0]), float(pair[1])


def generate_anchors(
    feature_size: int | Sequence[int],
    stride: int | float | Sequence[int | float],
    sizes: Sequence[float] = (32, 64, 128, 256),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The anchors of one feature map level, in torchvision ``AnchorGenerator`` order.

    Args:
        feature_size: (H, W) of the feature map, or one int for a square map.
        stride: image pixels per feature cell, one number or (stride_h, stride_w).
        sizes: anchor sizes (the square root of the area) in pixels.
        aspect_ratios: height / width ratios.
        dtype, device: of the result.

    Returns:
        Tensor[H * W * k, 4]: (x1, y1, x2, y2) in image pixels, k = len(sizes) * len(aspect_ratios);
        cell-major (row by row), then anchor: aspect ratio outer, size inner. As torchvision, a
        cell's anchors are centred on the cell's top-left corner ``(x * stride_w, y * stride_h)``
        and the base anchors are rounded to whole pixels.

    Equivalent PyTorch code: :func:`mlkernels.reference.generate_anchors`.
    """
    fh, fw = _pair(feature_size, "feature_size")
    if not (fh.is_integer() and fw.is_integer() and fh >= 0 and fw >= 0):
        raise ValueError(
            f"generate_anchors: feature_size must be non-negative integers, got {feature_size!r}"
        )
    height, width = int(fh), int(fw)
    stride_h, stride_w = _pair(stride, "stride")
    if not all(math.isfinite(s) and s > 0 for s in (stride_h, stride_w)):
        raise ValueError(f"generate_anchors: stride must be finite and positive, got {stride!r}")
    if (
        not sizes
        or not aspect_ratios
        or not all(math.isfinite(v) and v > 0 for v in (*sizes, *aspect_ratios))
    ):
        raise ValueError(
            "generate_anchors: sizes and aspect_ratios must be non-empty, finite and positive, "
            f"got sizes={tuple(sizes)}, aspect_ratios={tuple(aspect_ratios)}"
        )
    # torchvision computes the base anchors in float32 whatever the output dtype; so do we.
    scales = torch.as_tensor(sizes, dtype=torch.float32, device=device)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32, device=device)
    h_ratios = torch.sqrt(ratios)
    ws = ((1 / h_ratios)[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round().to(dtype)
    shift_x = torch.arange(width, dtype=torch.int32, device=device).to(dtype) * stride_w
    shift_y = torch.arange(height, dtype=torch.int32, device=device).to(dtype) * stride_h
    sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Non-maximum suppression, with ``torchvision.ops.nms``'s results.

    Args:
        boxes (Tensor[N, 4]): (x1, y1, x2, y2); any coordinates, negative ones included.
        scores (Tensor[N]): same dtype and device.
        iou_threshold: a box is dropped when its IoU with a kept, higher-scoring box is
            strictly greater than this (non-negative; above 1 keeps every box).

    Returns:
        Tensor[K] int64: indices of the kept boxes, by decreasing score (a stable sort: equal
        scores keep the lower index first).

    NaN/Inf: a NaN score sorts before every number (as ``torch.sort``); a box with a NaN
    coordinate has NaN IoU with every box, so it is kept (in its score order) and suppresses
    nothing; Inf coordinates follow IEEE arithmetic exactly as torchvision's kernel. Indices are
    always valid. CPU: sorted structure-of-arrays candidates, a vectorized IoU of each kept box
    against the survivors; CUDA: bitmask NMS reduced on the device, whose mask takes N * N / 8
    bytes of GPU memory (as torchvision's; 50 MB at N = 20000) and N at most 65535 * 64.
    Equivalent PyTorch code: :func:`mlkernels.reference.nms`.
    """
    C.check_tensor("nms", "boxes", boxes)
    C.check_tensor("nms", "scores", scores)
    return _ops.nms(boxes, scores, float(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each group of ``idxs`` (``torchvision.ops.batched_nms``'s results).

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N]): as :func:`nms`.
        idxs (Tensor[N]): an integer group (category, image, level) per box; boxes of different
            groups never suppress each other.
        iou_threshold: as :func:`nms`.

    Returns:
        Tensor[K] int64: the kept indices of all groups, by decreasing score (stable).

    No coordinate-offset trick: coordinates may be negative or huge. Groups run in parallel on
    CPU; CUDA runs one bitmask NMS over all N boxes (memory as :func:`nms`). NaN/Inf as
    :func:`nms`.
    Equivalent PyTorch code: :func:`mlkernels.reference.batched_nms`.
    """
    C.check_tensor("batched_nms", "boxes", boxes)
    C.check_tensor("batched_nms", "scores", scores)
    C.check_tensor("batched_nms", "idxs", idxs)
    return _ops.batched_nms(boxes, scores, idxs, float(iou_threshold))


def propose(
    anchors: Tensor,
    deltas: Tensor,
    objectness: Tensor,
    image_sizes: Tensor | Sequence[Sequence[int | float]],
    *,
    pre_nms_top_n: int = 6000,
    post_nms_top_n: int = 256,
    iou_threshold: float = 0.7,
    min_size: float = 1e-3,
    score_threshold: float = 0.0,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    clamp: float = DEFAULT_CLAMP,
    append_whole_image: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Region proposals for a batch of images in one op (torchvision RPN's ``filter_proposals``).

    Per image: the ``pre_nms_top_n`` anchors with the highest objectness (a stable sort: ties to
    the lower anchor index), their boxes decoded from ``deltas`` (as :func:`decode_boxes`) and
    clipped to the image, boxes with a side below ``min_size`` or a non-finite coordinate dropped,
    ``sigmoid(objectness)`` below ``score_threshold`` dropped, NMS at ``iou_threshold``, the first
    ``post_nms_top_n`` kept.

    Args:
        anchors (Tensor[A, 4]): (x1, y1, x2, y2), e.g. from :func:`generate_anchors`.
        deltas (Tensor[N, A, 4]): (dx, dy, dw, dh) per image and anchor.
        objectness (Tensor[N, A]): logits.
        image_sizes (Tensor[N, 2] or list of (height, width)): finite and >= 0; boxes are
            clipped to them (checked in eager mode, which costs one host sync on CUDA).
        pre_nms_top_n: candidates per image before NMS (>= 0; at most A are taken).
        post_nms_top_n: proposals kept per image after NMS (>= 0).
        iou_threshold: as :func:`nms` (non-negative).
        min_size: a clipped box with a side below this is dropped.
        score_threshold: a box whose ``sigmoid(objectness)`` is below this is dropped.
        weights, clamp: as :func:`decode_boxes`.
        append_whole_image: add the box (0, 0, width, height) with score 1 after the kept ones.

    Returns:
        boxes (Tensor[N, P, 4]), scores (Tensor[N, P]), counts (Tensor[N] int64), with
        P = post_nms_top_n (+1 with ``append_whole_image``): image i's proposals are rows
        ``[:counts[i]]`` by decreasing score; the rows after them are zero.

    ``boxes`` is differentiable w.r.t. ``deltas`` and ``anchors`` (only kept boxes pass a
    gradient; a clipped coordinate passes none); ``scores`` and ``counts`` are not differentiable.
    NaN logits or boxes are dropped. Equivalent PyTorch code: :func:`mlkernels.reference.propose`.
    """
    C.check_tensor("propose", "anchors", anchors)
    C.check_tensor("propose", "deltas", deltas)
    C.check_tensor("propose", "objectness", objectness)
    if not isinstance(image_sizes, torch.Tensor):
        try:
            image_sizes = torch.as_tensor(image_sizes, dtype=torch.float64, device=deltas.device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"propose: image_sizes must be Tensor[N, 2] or a list of (height, width) pairs, "
                f"got {image_sizes!r} ({error})"
            ) from None
        if image_sizes.numel() == 0:
            image_sizes = image_sizes.reshape(0, 2)
    boxes, scores, counts, _ = _ops.propose(
        anchors,
        deltas,
        objectness,
        image_sizes,
        int(pre_nms_top_n),
        int(post_nms_top_n),
        float(iou_threshold),
        float(min_size),
        float(score_threshold),
        [float(w) for w in weights],
        float(clamp),
        bool(append_whole_image),
    )
    return boxes, scores, counts


# ---- fake kernels of the NMS family ----


def _check_per_box(op: str, arg: str, t: Tensor, n: int) -> None:
    C.check(
        t.dim() == 1 and t.shape[0] == n,
        f"{op}: {arg} must be Tensor[N] with N = {n} (one per box), got {C.shape_str(t)}",
    )


def _check_iou_threshold(op: str, threshold: float) -> None:
    C.check(
        not math.isnan(threshold) and threshold >= 0,
        f"{op}: iou_threshold must be a non-negative number, got {threshold}",
        ValueError,
    )


def _check_nms(op: str, boxes: Tensor, scores: Tensor, idxs: Tensor | None, thr: float) -> None:
    """The checks of prepare_nms (csrc/boxes/nms.h)."""
    C.check_boxes(op, "boxes", boxes, exact_dim=2)
    C.check_floating(op, "boxes", boxes)
    n = boxes.shape[0]
    _check_per_box(op, "scores", scores, n)
    C.check_same_dtype(op, "boxes", boxes, "scores", scores)
    C.check_same_device(op, "boxes", boxes, "scores", scores)
    if idxs is not None:
        _check_per_box(op, "idxs", idxs, n)
        C.check(
            not idxs.dtype.is_floating_point
            and not idxs.dtype.is_complex
            and idxs.dtype != torch.bool,
            f"{op}: idxs must be an integer tensor, got {C.dtype_str(idxs.dtype)}",
        )
        C.check_same_device(op, "boxes", boxes, "idxs", idxs)
    _check_iou_threshold(op, thr)


def _nms_fake_output(boxes: Tensor) -> Tensor:
    # How many boxes survive depends on the data: an unbacked size under torch.compile.
    kept = torch.library.get_ctx().new_dynamic_size() if boxes.shape[0] != 0 else 0
    return boxes.new_empty((kept,), dtype=torch.int64)


@torch.library.register_fake("mlkernels::nms")
def _nms_fake(boxes, scores, iou_threshold):
    _check_nms("nms", boxes, scores, None, iou_threshold)
    return _nms_fake_output(boxes)


@torch.library.register_fake("mlkernels::batched_nms")
def _batched_nms_fake(boxes, scores, idxs, iou_threshold):
    _check_nms("batched_nms", boxes, scores, idxs, iou_threshold)
    return _nms_fake_output(boxes)


def _check_anchors_deltas_sizes(op: str, anchors, deltas, image_sizes) -> None:
    """The checks of check_anchors_deltas_sizes (csrc/boxes/nms.h)."""
    C.check(
        anchors.dim() == 2 and anchors.shape[1] == 4,
        f"{op}: anchors must be Tensor[A, 4], got {C.shape_str(anchors)}",
    )
    C.check_floating(op, "anchors", anchors)
    a = anchors.shape[0]
    C.check(
        deltas.dim() == 3 and deltas.shape[1] == a and deltas.shape[2] == 4,
        f"{op}: deltas must be Tensor[N, A, 4] with A = {a}, got {C.shape_str(deltas)}",
    )
    n = deltas.shape[0]
    C.check(
        image_sizes.dim() == 2 and image_sizes.shape[0] == n and image_sizes.shape[1] == 2,
        f"{op}: image_sizes must be Tensor[N, 2] = Tensor[{n}, 2] (height, width), "
        f"got {C.shape_str(image_sizes)}",
    )
    C.check_same_dtype(op, "anchors", anchors, "deltas", deltas)
    C.check(
        image_sizes.dtype != torch.bool and not image_sizes.dtype.is_complex,
        f"{op}: image_sizes must be an integer or floating tensor, "
        f"got {C.dtype_str(image_sizes.dtype)}",
    )
    C.check_same_device(op, "anchors", anchors, "deltas", deltas)
    C.check_same_device(op, "anchors", anchors, "image_sizes", image_sizes)


def _check_propose(
    anchors, deltas, objectness, image_sizes, pre, post, thr, min_size, score_thr, weights, clamp
) -> None:
    """The checks of prepare_propose (csrc/boxes/nms.h)."""
    op = "propose"
    _check_anchors_deltas_sizes(op, anchors, deltas, image_sizes)
    n, a = deltas.shape[0], anchors.shape[0]
    C.check(
        objectness.dim() == 2 and objectness.shape[0] == n and objectness.shape[1] == a,
        f"{op}: objectness must be Tensor[N, A] = Tensor[{n}, {a}], got {C.shape_str(objectness)}",
    )
    C.check_same_dtype(op, "anchors", anchors, "objectness", objectness)
    C.check_same_device(op, "anchors", anchors, "objectness", objectness)
    for name, value in (("pre_nms_top_n", pre), ("post_nms_top_n", post)):
        C.check(value >= 0, f"{op}: {name} must be >= 0, got {value}", ValueError)
    _check_iou_threshold(op, thr)
    for name, value in (("min_size", min_size), ("score_threshold", score_thr)):
        C.check(not math.isnan(value), f"{op}: {name} must be a number, got nan", ValueError)
    C.check_weights(op, weights)
    C.check_clamp(op, clamp)


@torch.library.register_fake("mlkernels::propose")
def _propose_fake(anchors, deltas, objectness, image_sizes, pre_nms_top_n, post_nms_top_n, *rest):
    *settings, append_whole_image = rest  # iou_threshold ... clamp, then append_whole_image
    _check_propose(
        anchors, deltas, objectness, image_sizes, pre_nms_top_n, post_nms_top_n, *settings
    )
    n, rows = deltas.shape[0], post_nms_top_n + int(append_whole_image)
    return (
        deltas.new_empty((n, rows, 4)),
        deltas.new_empty((n, rows)),
        deltas.new_empty((n,), dtype=torch.int64),
        deltas.new_empty((n, rows), dtype=torch.int64),
    )


@torch.library.register_fake("mlkernels::propose_backward")
def _propose_backward_fake(grad_boxes, anchors, deltas, kept_anchors, image_sizes, weights, clamp):
    """The checks of check_propose_backward (csrc/boxes/nms.h), but the values of kept_anchors."""
    op = "propose_backward"
    _check_anchors_deltas_sizes(op, anchors, deltas, image_sizes)
    n = deltas.shape[0]
    C.check(
        kept_anchors.dim() == 2
        and kept_anchors.shape[0] == n
        and kept_anchors.dtype == torch.int64,
        f"{op}: kept_anchors must be int64 Tensor[N, P] with N = {n}, "
        f"got {C.dtype_str(kept_anchors.dtype)} {C.shape_str(kept_anchors)}",
    )
    p = kept_anchors.shape[1]
    C.check(
        grad_boxes.dim() == 3 and tuple(grad_boxes.shape) == (n, p, 4),
        f"{op}: grad_boxes must be Tensor[N, P, 4] = Tensor[{n}, {p}, 4], "
        f"got {C.shape_str(grad_boxes)}",
    )
    C.check_same_dtype(op, "deltas", deltas, "grad_boxes", grad_boxes)
    C.check_same_device(op, "deltas", deltas, "grad_boxes", grad_boxes)
    C.check_same_device(op, "deltas", deltas, "kept_anchors", kept_anchors)
    return torch.empty_like(deltas), torch.empty_like(anchors)


# ---- autograd of the NMS family ----


def _propose_setup(ctx, inputs, output):
    anchors, deltas, _, image_sizes, *_, weights, clamp, _ = inputs
    _, _, _, kept_anchors = output
    ctx.save_for_backward(anchors, deltas, kept_anchors, image_sizes)
    ctx.weights, ctx.clamp = weights, clamp
    ctx.mark_non_differentiable(*output[1:])


def _propose_backward(ctx, grad_boxes, *_):
    anchors, deltas, kept_anchors, image_sizes = ctx.saved_tensors
    grad_deltas, grad_anchors = _ops.propose_backward(
        grad_boxes.contiguous(), anchors, deltas, kept_anchors, image_sizes, ctx.weights, ctx.clamp
    )
    return (grad_anchors, grad_deltas) + (None,) * 10


torch.library.register_autograd(
    "mlkernels::propose", _propose_backward, setup_context=_propose_setup
)
