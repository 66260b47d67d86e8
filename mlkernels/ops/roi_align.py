"""Bilinear RoI sampling: roi_align, differentiable w.r.t. the feature map and the boxes.

Kernels: csrc/roi_align (CPU, CUDA); pure-PyTorch equivalent: mlkernels.reference.roi_align.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor
from torch.jit.annotations import BroadcastingList2
from torch.nn.modules.utils import _pair

from . import _checks as C

_ops = torch.ops.mlkernels

BOXES_EXPECTED = "Tensor[K, 5] or list of Tensor[L, 4]"


def list_to_rois(boxes: list[Tensor], input: Tensor) -> Tensor:
    """Per-image Tensor[L, 4] boxes as one Tensor[K, 5], each image's index in front (the
    concatenation is differentiable, so gradients reach the list's tensors); an empty list gives
    Tensor[0, 5] of ``input``'s dtype and device. Scriptable: the Python checks of
    ``checked_rois`` come first in eager mode."""
    if len(boxes) == 0:
        return input.new_zeros((0, 5))
    rois: list[Tensor] = []
    for i in range(len(boxes)):
        b = boxes[i]
        rois.append(torch.cat([torch.full_like(b[:, :1], float(i)), b], dim=1))
    return torch.cat(rois, dim=0)


def checked_rois(op: str, boxes: object, input: Tensor) -> Tensor:
    """``boxes`` as one Tensor[K, 5], with errors that name the op: a Tensor passes through (the
    op checks its shape), a list or tuple of Tensor[L, 4] is checked and concatenated."""
    if isinstance(boxes, Tensor):
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"{op}: boxes must be {BOXES_EXPECTED}, got {type(boxes).__name__}")
    for i, b in enumerate(boxes):
        C.check_tensor(op, f"boxes[{i}]", b)
        if not (b.dim() == 2 and b.shape[1] == 4):
            raise C.ShapeError(
                f"{op}: boxes must be {BOXES_EXPECTED}, got list containing {C.shape_str(b)}"
            )
        C.check_same_dtype(op, "boxes[0]", boxes[0], f"boxes[{i}]", b)
        C.check_same_device(op, "boxes[0]", boxes[0], f"boxes[{i}]", b)
    try:
        return list_to_rois(list(boxes), input)
    except RuntimeError as error:  # an expanded box tensor far larger than memory
        if "can't allocate memory" not in str(error) and "out of memory" not in str(error):
            raise
        sizes = ", ".join(C.shape_str(b) for b in boxes)
        raise RuntimeError(
            f"{op}: boxes must fit in memory once concatenated, got a list of {sizes}"
        ) from None


def output_pair(op: str, output_size: object) -> tuple[int, int]:
    """(height, width) of ``output_size`` given as an int or a pair of ints. Any integer type
    (Python, numpy, a 0-d integer tensor) is accepted, as torchvision does; bools and floats
    are not."""
    single = _as_index(output_size)
    if single is not None:
        C.check_int64(op, "output_size", single)
        return single, single
    if isinstance(output_size, (list, tuple)) and len(output_size) == 2:
        pair = [_as_index(s) for s in output_size]
        if None not in pair:
            height, width = (C.check_int64(op, "output_size", s) for s in pair)
            return height, width
    raise TypeError(f"{op}: output_size must be an int or a pair of ints, got {output_size!r}")


def _as_index(value: object) -> int | None:
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except (TypeError, RuntimeError):  # RuntimeError: a meta tensor has no value
        return None


def checked_roi_args(
    op: str,
    input: object,
    boxes: object,
    output_size: object,
    spatial_scale: object,
    sampling_ratio: object,
) -> tuple[Tensor, list[int], float, int]:
    """The Python checks of roi_align and RoIAlign (eager mode only): the rois tensor, output
    size, scale and ratio as the op takes them, or errors that name the op and the argument."""
    C.check_tensor(op, "input", input)
    rois = checked_rois(op, boxes, input)
    # (The message is built only on failure: under torch.compile the sizes are symbolic.)
    if isinstance(boxes, Tensor) and not (boxes.dim() == 2 and boxes.shape[1] == 5):
        raise C.ShapeError(f"{op}: boxes must be {BOXES_EXPECTED}, got {C.shape_str(boxes)}")
    height, width = output_pair(op, output_size)
    ratio = C.as_int(op, "sampling_ratio", sampling_ratio)
    C.check(
        ratio <= MAX_SAMPLING_RATIO,
        f"{op}: sampling_ratio must be at most {MAX_SAMPLING_RATIO} (samples per bin each way; "
        f"<= 0 for adaptive), got {ratio}",
        ValueError,
    )
    return rois, [height, width], C.as_float(op, "spatial_scale", spatial_scale), ratio


@torch.fx.wrap
def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: BroadcastingList2[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Bilinearly sampled features of every box (``torchvision.ops.roi_align``, plus box gradients).

    Args:
        input (Tensor[N, C, H, W]): the feature map; float32/64, or float16/bfloat16
            (computed with float32 accumulation). Any memory layout; channels_last is read
            without a copy on CPU.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): (batch index, x1, y1, x2, y2) rows, or
            one (x1, y1, x2, y2) tensor per image; same dtype and device as ``input``. Batch
            indices must be integers in [0, N): checked before the op runs on the CPU, by the
            kernel on CUDA (no host sync: a bad index is a device-side assert, reported at the
            next synchronising call).
        output_size (int or (oh, ow)): bins per box, each way.
        spatial_scale: box coordinates are multiplied by it (e.g. 1/16 for a stride-16 map);
            finite and positive, within float32's normal range.
        sampling_ratio: samples per bin each way; <= 0 means adaptive,
            ``ceil(box_size / output_size)``.
        aligned: shift box corners by -0.5 pixel (pixel-centre convention); without it a
            box's width and height are clamped to at least 1.

    Returns:
        Tensor[K, C, oh, ow]: each bin is the mean of its bilinear samples; a sample outside
        ``[-1, H] x [-1, W]`` counts as 0, the results equal torchvision's.

    Differentiable w.r.t. ``input`` and the four box coordinates (not the batch index). The
    box gradient is exact almost everywhere: at a sample on a pixel border the bilinear
    interpolation has a kink. With adaptive sampling the sample count, which jumps with the box
    size, is held constant (its derivative is zero between jumps). A coordinate clamped to the
    map border, and a width clamped to 1 (also one of exactly 1, as ``torch.clamp``), pass no
    gradient. A box with a NaN coordinate gets NaN bins and a NaN box gradient (torchvision's
    kernels read out of bounds there); infinite coordinates give finite results (0 where no
    sample reaches the map). Boxes far larger than the map cost no more than the map: only
    samples whose computed positions can reach it are visited, and samples whose positions
    round to the same value (huge boxes) are visited once, weighted by their count.
    ``sampling_ratio`` is at most 1024.

    Under ``torch.autocast`` it computes in float32 and returns ``input``'s dtype, as
    torchvision does, so a bfloat16/float16 map and float32 boxes mix there.

    CPU forward and backward are deterministic (bitwise identical run to run and at any thread
    count on a given machine). On CUDA, ``torch.use_deterministic_algorithms(True)`` selects a
    deterministic (slower) input-gradient kernel instead of atomics.

    As torchvision's, it can be scripted (``torch.jit.script``), traced by ``torch.fx`` (a leaf
    call) and exported (``torch.export``). A wrong boxes shape raises
    :class:`mlkernels.ShapeError`, a RuntimeError that is also an AssertionError (torchvision
    raises AssertionError there).
    Equivalent PyTorch code: :func:`mlkernels.reference.roi_align`.
    """
    if not torch.jit.is_scripting():
        if not C.symbolic_tracing():
            rois, size, scale, ratio = checked_roi_args(
                "roi_align", input, boxes, output_size, spatial_scale, sampling_ratio
            )
            # Under torch.autocast the dispatcher's autocast kernel (csrc/roi_align/roi_align.cpp)
            # computes in float32 and returns input's dtype, as torchvision's.
            return torch.ops.mlkernels.roi_align(
                input, rois, scale, size[0], size[1], ratio, aligned
            )
    # TorchScript and torch.fx: the same call without the Python checks (the op checks too).
    # (Under torch.fx a Tensor argument is a Proxy, not a Tensor: test for the list.)
    rois = list_to_rois(boxes, input) if isinstance(boxes, list) else boxes
    size = _pair(output_size)
    return torch.ops.mlkernels.roi_align(
        input, rois, spatial_scale, size[0], size[1], sampling_ratio, aligned
    )


# ---- fake kernels: the C++ checks, repeated, and the output shapes ----


# The largest fixed sampling_ratio (csrc/roi_align/roi_align.h kMaxSamplingRatio).
MAX_SAMPLING_RATIO = 1024


def _check_args(op, input, boxes, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    """The checks of csrc/roi_align/roi_align.h check_args (all but the batch-index values)."""
    C.check_defined(op, "input", input)
    C.check_defined(op, "boxes", boxes)
    C.check(input.dim() == 4, f"{op}: input must be Tensor[N, C, H, W], got {C.shape_str(input)}")
    C.check_floating(op, "input", input, allow_half=True)
    C.check(
        boxes.dim() == 2 and boxes.shape[1] == 5,
        f"{op}: boxes must be {BOXES_EXPECTED}, got {C.shape_str(boxes)}",
    )
    C.check_same_dtype(op, "input", input, "boxes", boxes)
    C.check_same_device(op, "input", input, "boxes", boxes)
    C.check(
        pooled_height > 0 and pooled_width > 0,
        f"{op}: output_size must be positive, got ({pooled_height}, {pooled_width})",
        ValueError,
    )
    positive = math.isfinite(spatial_scale) and spatial_scale > 0
    C.check(
        positive and C.FLOAT32_NORMAL_MIN <= spatial_scale <= C.FLOAT32_MAX,
        f"{op}: spatial_scale must be finite and positive, got {C.num_str(spatial_scale)}"
        + (" (outside float32's normal range)" if positive else ""),
        ValueError,
    )
    C.check(
        sampling_ratio <= MAX_SAMPLING_RATIO,
        f"{op}: sampling_ratio must be at most {MAX_SAMPLING_RATIO} (samples per bin each way; "
        f"<= 0 for adaptive), got {sampling_ratio}",
        ValueError,
    )


@torch.library.register_fake("mlkernels::roi_align")
def _roi_align_fake(
    input, boxes, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned
):
    _check_args(
        "roi_align", input, boxes, spatial_scale, pooled_height, pooled_width, sampling_ratio
    )
    shape = (boxes.shape[0], input.shape[1], pooled_height, pooled_width)
    return C.allocate_output("roi_align", input, shape)


@torch.library.register_fake("mlkernels::roi_align_backward")
def _roi_align_backward_fake(
    grad,
    input,
    boxes,
    spatial_scale,
    pooled_height,
    pooled_width,
    sampling_ratio,
    aligned,
    output_mask=(True, True),
):
    op = "roi_align_backward"
    _check_args(op, input, boxes, spatial_scale, pooled_height, pooled_width, sampling_ratio)
    expected = (boxes.shape[0], input.shape[1], pooled_height, pooled_width)
    C.check_defined(op, "grad", grad)
    C.check(
        tuple(grad.shape) == expected,
        f"{op}: grad must be Tensor[{', '.join(str(s) for s in expected)}], "
        f"got {C.shape_str(grad)}",
    )
    C.check_same_dtype(op, "input", input, "grad", grad)
    C.check_same_device(op, "input", input, "grad", grad)
    return C.masked_outputs(op, output_mask, input, boxes)


# ---- autograd ----


def _setup(ctx, inputs, output):
    input, boxes, *args = inputs
    ctx.save_for_backward(input, boxes)
    ctx.args = args


def _backward(ctx, grad):
    input, boxes = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:2])
    grad_input, grad_boxes = _ops.roi_align_backward(
        grad.contiguous(), input, boxes, *ctx.args, mask
    )
    return (
        grad_input if mask[0] else None,
        grad_boxes if mask[1] else None,
        *([None] * len(ctx.args)),
    )


torch.library.register_autograd("mlkernels::roi_align", _backward, setup_context=_setup)
C.no_double_backward("roi_align_backward")
