"""NMS and region proposals: generate_anchors, nms, batched_nms, propose (RLSD's localization).

Kernels: csrc/proposals (CPU, CUDA); pure-PyTorch equivalents: mlkernels.reference.proposals.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _checks as C
from .boxes import DEFAULT_CLAMP, DEFAULT_WEIGHTS

_ops = torch.ops.mlkernels

# The most output rows per image (csrc/proposals/proposals.h kMaxProposals).
MAX_PROPOSALS = 1 << 24


def _pair(value: int | float | Sequence[int | float], name: str) -> tuple[float, float]:
    """An int/float or an (h, w) pair, as (h, w)."""
    op = "generate_anchors"
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        single = C.as_float(op, name, value)
        return single, single
    if len(value) != 2:
        raise ValueError(f"{op}: {name} must be a number or (h, w), got {value!r}")
    return C.as_float(op, name, value[0]), C.as_float(op, name, value[1])


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
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"generate_anchors: dtype must be a floating torch.dtype, got {dtype!r}")
    try:
        device = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError):
        raise ValueError(
            f"generate_anchors: device must be a torch.device or a device name, got {device!r}"
        ) from None
    fh, fw = _pair(feature_size, "feature_size")
    if not (fh.is_integer() and fw.is_integer() and fh >= 0 and fw >= 0):
        raise ValueError(
            f"generate_anchors: feature_size must be non-negative integers, got {feature_size!r}"
        )
    height, width = int(fh), int(fw)
    stride_h, stride_w = _pair(stride, "stride")
    # Finite in dtype too: an infinite stride would make the first column's shifts 0 * inf = NaN.
    largest = torch.finfo(dtype).max
    if not all(math.isfinite(s) and 0 < s <= largest for s in (stride_h, stride_w)):
        raise ValueError(
            f"generate_anchors: stride must be finite and positive in {C.dtype_str(dtype)}, "
            f"got {stride!r}"
        )
    sizes = C.as_floats("generate_anchors", "sizes", sizes)
    aspect_ratios = C.as_floats("generate_anchors", "aspect_ratios", aspect_ratios)
    if (
        not sizes
        or not aspect_ratios
        or not all(math.isfinite(v) and v > 0 for v in (*sizes, *aspect_ratios))
    ):
        raise ValueError(
            "generate_anchors: sizes and aspect_ratios must be non-empty, finite and positive, "
            f"got sizes={tuple(sizes)}, aspect_ratios={tuple(aspect_ratios)}"
        )
    count = height * width * len(sizes) * len(aspect_ratios)
    try:
        anchors = torch.empty((count, 4), dtype=dtype, device=device)
    except (RuntimeError, TypeError) as error:  # far beyond memory, or no such device
        raise RuntimeError(
            f"generate_anchors: the output Tensor[{count}, 4] could not be allocated"
            f"{' on ' + str(device) if device is not None else ''} "
            f"({str(error).strip().splitlines()[0]})"
        ) from None
    if count == 0:  # no shifts to build, however long the other side is
        return anchors
    device = anchors.device
    # torchvision computes the base anchors in float32 whatever the output dtype; so do we.
    scales = host_to_device(torch.as_tensor(sizes, dtype=torch.float32), device)
    ratios = host_to_device(torch.as_tensor(aspect_ratios, dtype=torch.float32), device)
    h_ratios = torch.sqrt(ratios)
    ws = ((1 / h_ratios)[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round().to(dtype)
    shift_x = torch.arange(width, dtype=torch.int32, device=device).to(dtype) * stride_w
    shift_y = torch.arange(height, dtype=torch.int32, device=device).to(dtype) * stride_h
    sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
    torch.add(shifts, base[None], out=anchors.view(height * width, base.shape[0], 4))
    return anchors


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Non-maximum suppression, with ``torchvision.ops.nms``'s results.

    Args:
        boxes (Tensor[N, 4]): (x1, y1, x2, y2); any coordinates, negative ones included.
            float32/64, or float16/bfloat16 (compared in float32, to which they convert
            exactly; torchvision's CPU nms refuses them outside autocast).
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

    Under ``torch.autocast`` boxes and scores are compared in float32, as torchvision's.
    Scriptable, traceable by ``torch.fx`` and exportable.
    Equivalent PyTorch code: :func:`mlkernels.reference.nms`.
    """
    if not torch.jit.is_scripting():
        if not C.symbolic_tracing():
            C.check_tensor("nms", "boxes", boxes)
            C.check_tensor("nms", "scores", scores)
            iou_threshold = C.as_float("nms", "iou_threshold", iou_threshold)
    return torch.ops.mlkernels.nms(boxes, scores, iou_threshold)


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
    CPU; CUDA runs a bitmask NMS per group, the groups in chunks whose masks together take at
    most what :func:`nms` takes for the largest group (n * n / 8 bytes, torchvision's peak, as it
    runs the groups one after another) or 8 bytes per box, whichever is more; at most 389,120
    boxes per group. NaN/Inf, dtypes, autocast, scripting and tracing as :func:`nms`. As
    torchvision's, empty ``boxes`` (any shape) give an empty result without looking at the other
    arguments.
    Equivalent PyTorch code: :func:`mlkernels.reference.batched_nms`.
    """
    if not torch.jit.is_scripting():
        if not C.symbolic_tracing():
            C.check_tensor("batched_nms", "boxes", boxes)
            if boxes.numel() == 0:  # as torchvision's: the other arguments are not looked at
                return torch.empty((0,), dtype=torch.int64, device=boxes.device)
            C.check_tensor("batched_nms", "scores", scores)
            C.check_tensor("batched_nms", "idxs", idxs)
            iou_threshold = C.as_float("batched_nms", "iou_threshold", iou_threshold)
    elif boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    return torch.ops.mlkernels.batched_nms(boxes, scores, idxs, iou_threshold)


@dataclasses.dataclass(frozen=True)
class ProposeConfig:
    """The settings of :func:`propose`, in one typed place (ops, reference and
    :class:`mlkernels.nn.ProposalLayer` all take it; a new setting is added here only).

    Attributes:
        pre_nms_top_n: candidates per image before NMS (>= 0; at most A are taken).
        post_nms_top_n: proposals kept per image after NMS (0 .. 2**24).
        iou_threshold: as :func:`nms` (non-negative).
        min_size: a clipped box with a side below this is dropped.
        score_threshold: a box whose ``sigmoid(objectness)`` is below this is dropped.
        weights, clamp: as :func:`mlkernels.ops.decode_boxes`.
        append_whole_image: add the box (0, 0, width, height) with score 1 after the kept ones.

    Values are checked and normalized on construction (ints, floats, a 4-tuple of weights), with
    errors that name the setting: ``ProposeConfig(post_nms_top_n="a")`` raises
    ``TypeError: propose: post_nms_top_n must be an int, got 'a'``.
    """

    pre_nms_top_n: int = 6000
    post_nms_top_n: int = 256
    iou_threshold: float = 0.7
    min_size: float = 1e-3
    score_threshold: float = 0.0
    weights: tuple[float, float, float, float] = DEFAULT_WEIGHTS
    clamp: float = DEFAULT_CLAMP
    append_whole_image: bool = False

    def __post_init__(self) -> None:
        def normalize(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        for name in ("pre_nms_top_n", "post_nms_top_n"):
            normalize(name, C.as_int("propose", name, getattr(self, name)))
        for name in ("iou_threshold", "min_size", "score_threshold", "clamp"):
            normalize(name, C.as_float("propose", name, getattr(self, name)))
        normalize("weights", tuple(C.as_floats("propose", "weights", self.weights)))
        if not isinstance(self.append_whole_image, bool):
            raise TypeError(
                f"propose: append_whole_image must be a bool, got {self.append_whole_image!r}"
            )
        _check_settings(
            "propose",
            self.pre_nms_top_n,
            self.post_nms_top_n,
            self.iou_threshold,
            self.min_size,
            self.score_threshold,
            self.weights,
            self.clamp,
        )

    @property
    def rows(self) -> int:
        """Output rows per image: post_nms_top_n, plus one with append_whole_image."""
        return self.post_nms_top_n + int(self.append_whole_image)

    def op_args(self) -> tuple:
        """The settings as torch.ops.mlkernels.propose takes them after its four tensors."""
        return (
            self.pre_nms_top_n,
            self.post_nms_top_n,
            self.iou_threshold,
            self.min_size,
            self.score_threshold,
            list(self.weights),
            self.clamp,
            self.append_whole_image,
        )

    @classmethod
    def make(cls, config: ProposeConfig | None, settings: dict) -> ProposeConfig:
        """``config`` (default: the defaults) with ``settings`` (keyword overrides) applied."""
        if config is None:
            config = _DEFAULT_CONFIG
        elif not isinstance(config, cls):
            raise TypeError(f"propose: config must be a ProposeConfig, got {type(config).__name__}")
        if not settings:
            return config
        unknown = sorted(set(settings) - set(_CONFIG_FIELDS))
        if unknown:
            raise TypeError(
                f"propose: unknown setting(s) {unknown}; the settings are: "
                + ", ".join(_CONFIG_FIELDS)
            )
        return cls(**{name: settings.get(name, getattr(config, name)) for name in _CONFIG_FIELDS})


def _check_settings(op, pre, post, thr, min_size, score_thr, weights, clamp) -> None:
    """The checks of prepare_propose (csrc/proposals/proposals.h) on the settings."""
    for name, value in (("pre_nms_top_n", pre), ("post_nms_top_n", post)):
        C.check(value >= 0, f"{op}: {name} must be >= 0, got {value}", ValueError)
    C.check(
        post <= MAX_PROPOSALS,
        f"{op}: post_nms_top_n must be at most {MAX_PROPOSALS} (the output has that many rows "
        f"per image), got {post}",
        ValueError,
    )
    _check_iou_threshold(op, thr)
    for name, value in (("min_size", min_size), ("score_threshold", score_thr)):
        C.check(not math.isnan(value), f"{op}: {name} must be a number, got nan", ValueError)
    C.check_weights(op, weights)
    C.check_clamp(op, clamp)


def propose(
    anchors: Tensor,
    deltas: Tensor,
    objectness: Tensor,
    image_sizes: Tensor | Sequence[Sequence[int | float]],
    config: ProposeConfig | None = None,
    **settings,
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
            clipped to them. Checked without a host sync: on the CPU before the op runs, on
            CUDA by the kernel (a bad size is a device-side assert, reported at the next
            synchronising call). A list is copied to the device from pinned memory, without a
            sync; pass a device tensor under CUDA graph capture.
        config: a :class:`ProposeConfig` (default: its defaults).
        **settings: any :class:`ProposeConfig` field by keyword, overriding ``config``'s, e.g.
            ``propose(..., pre_nms_top_n=6000, post_nms_top_n=256, iou_threshold=0.7)``.

    Returns:
        boxes (Tensor[N, P, 4]), scores (Tensor[N, P]), counts (Tensor[N] int64), with
        P = post_nms_top_n (+1 with ``append_whole_image``): image i's proposals are rows
        ``[:counts[i]]`` by decreasing score; the rows after them are zero.

    ``boxes`` is differentiable w.r.t. ``deltas`` and ``anchors`` (only kept boxes pass a
    gradient; a clipped coordinate passes none; only the gradients asked for are computed);
    ``scores`` and ``counts`` are not differentiable, and second derivatives raise.
    NaN logits or boxes are dropped. Equivalent PyTorch code: :func:`mlkernels.reference.propose`.
    """
    config = ProposeConfig.make(config, settings)
    C.check_tensor("propose", "anchors", anchors)
    C.check_tensor("propose", "deltas", deltas)
    C.check_tensor("propose", "objectness", objectness)
    image_sizes = image_sizes_tensor("propose", image_sizes, deltas.device)
    boxes, scores, counts, _ = _ops.propose(
        anchors, deltas, objectness, image_sizes, *config.op_args()
    )
    return boxes, scores, counts


def image_sizes_tensor(
    op: str, image_sizes: Tensor | Sequence[Sequence[int | float]], device: torch.device
) -> Tensor:
    """``image_sizes`` as a Tensor[N, 2]; a list of (height, width) pairs becomes float64."""
    if isinstance(image_sizes, torch.Tensor):
        return image_sizes
    try:
        sizes = torch.as_tensor(image_sizes, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"{op}: image_sizes must be Tensor[N, 2] or a list of (height, width) pairs, "
            f"got {image_sizes!r} ({error})"
        ) from None
    sizes = sizes.reshape(0, 2) if sizes.numel() == 0 else sizes
    return host_to_device(sizes, device)


def host_to_device(values: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor built from Python numbers, on ``device`` without a synchronising copy.

    A plain copy from pageable memory to a GPU waits for the copy (a host sync); from pinned
    memory with ``non_blocking=True`` it is queued on the current stream like a kernel, and the
    caching host allocator keeps the pinned block until the copy has run. Under CUDA graph
    capture, pass device tensors instead: a captured copy would re-read the host block at replay.
    """
    if torch.device(device).type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


# ---- fake kernels: the C++ checks, repeated, and the output shapes ----


def _check_per_box(op: str, arg: str, t: Tensor, n: int) -> None:
    C.check(
        t.dim() == 1 and t.shape[0] == n,
        f"{op}: {arg} must be Tensor[N] with N = {n} (one per box), got {C.shape_str(t)}",
    )


def _check_iou_threshold(op: str, threshold: float) -> None:
    C.check(
        not math.isnan(threshold) and threshold >= 0,
        f"{op}: iou_threshold must be a non-negative number, got {C.num_str(threshold)}",
        ValueError,
    )


def _check_nms(op: str, boxes: Tensor, scores: Tensor, idxs: Tensor | None, thr: float) -> None:
    """The checks of prepare_nms (csrc/proposals/proposals.h)."""
    C.check_defined(op, "boxes", boxes)
    C.check_defined(op, "scores", scores)
    C.check_boxes(op, "boxes", boxes, exact_dim=2)
    C.check_floating(op, "boxes", boxes, allow_half=True)
    n = boxes.shape[0]
    _check_per_box(op, "scores", scores, n)
    C.check_same_dtype(op, "boxes", boxes, "scores", scores)
    C.check_same_device(op, "boxes", boxes, "scores", scores)
    if op == "batched_nms":
        C.check_defined(op, "idxs", idxs)
        _check_per_box(op, "idxs", idxs, n)
        C.check(
            idxs.dtype in C.INTEGER_TYPES,
            f"{op}: idxs must be an integer tensor, got {C.dtype_str(idxs.dtype)}",
        )
        C.check_same_device(op, "boxes", boxes, "idxs", idxs)
    _check_iou_threshold(op, thr)


def _nms_fake_output(op: str, boxes: Tensor) -> Tensor:
    # How many boxes survive depends on the data: an unbacked size under torch.compile.
    if boxes.shape[0] == 0:
        return boxes.new_empty((0,), dtype=torch.int64)
    try:
        ctx = torch.library.get_ctx()
    except RuntimeError:  # plain meta tensors (not fake ones): no values, no size to stand for
        raise RuntimeError(
            f"{op}: boxes must be a tensor with values (on CPU or CUDA) or a FakeTensor, got a "
            "meta tensor (how many boxes are kept depends on their values)"
        ) from None
    return boxes.new_empty((ctx.new_dynamic_size(),), dtype=torch.int64)


@torch.library.register_fake("mlkernels::nms")
def _nms_fake(boxes, scores, iou_threshold):
    _check_nms("nms", boxes, scores, None, iou_threshold)
    return _nms_fake_output("nms", boxes)


@torch.library.register_fake("mlkernels::batched_nms")
def _batched_nms_fake(boxes, scores, idxs, iou_threshold):
    _check_nms("batched_nms", boxes, scores, idxs, iou_threshold)
    return _nms_fake_output("batched_nms", boxes)


_CONFIG_FIELDS = tuple(field.name for field in dataclasses.fields(ProposeConfig))
_DEFAULT_CONFIG = ProposeConfig()


def _check_anchors_deltas_sizes(op: str, anchors, deltas, image_sizes) -> None:
    """The checks of check_anchors_deltas_sizes (csrc/proposals/proposals.h)."""
    C.check_defined(op, "anchors", anchors)
    C.check_defined(op, "deltas", deltas)
    C.check_defined(op, "image_sizes", image_sizes)
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


def _check_propose(anchors, deltas, objectness, image_sizes, pre, post, *settings) -> None:
    """The checks of prepare_propose (csrc/proposals/proposals.h), but image_sizes' values."""
    op = "propose"
    _check_anchors_deltas_sizes(op, anchors, deltas, image_sizes)
    C.check_defined(op, "objectness", objectness)
    n, a = deltas.shape[0], anchors.shape[0]
    C.check(
        objectness.dim() == 2 and objectness.shape[0] == n and objectness.shape[1] == a,
        f"{op}: objectness must be Tensor[N, A] = Tensor[{n}, {a}], got {C.shape_str(objectness)}",
    )
    C.check_same_dtype(op, "anchors", anchors, "objectness", objectness)
    C.check_same_device(op, "anchors", anchors, "objectness", objectness)
    _check_settings(op, pre, post, *settings)


@torch.library.register_fake("mlkernels::propose")
def _propose_fake(anchors, deltas, objectness, image_sizes, *settings):
    _check_propose(anchors, deltas, objectness, image_sizes, *settings[:-1])
    n, rows = deltas.shape[0], settings[1] + int(settings[-1])  # post_nms_top_n (+1)
    return (
        deltas.new_empty((n, rows, 4)),
        deltas.new_empty((n, rows)),
        deltas.new_empty((n,), dtype=torch.int64),
        deltas.new_empty((n, rows), dtype=torch.int64),
    )


@torch.library.register_fake("mlkernels::propose_backward")
def _propose_backward_fake(
    grad_boxes, anchors, deltas, kept_anchors, image_sizes, weights, clamp, output_mask=(True, True)
):
    """The checks of check_propose_backward (csrc/proposals/proposals.h), but the values of
    kept_anchors."""
    op = "propose_backward"
    _check_anchors_deltas_sizes(op, anchors, deltas, image_sizes)
    C.check_defined(op, "grad_boxes", grad_boxes)
    C.check_defined(op, "kept_anchors", kept_anchors)
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
    C.check_weights(op, weights)
    C.check_clamp(op, clamp)
    return C.masked_outputs(op, output_mask, deltas, anchors)


# ---- autograd ----


def _propose_setup(ctx, inputs, output):
    anchors, deltas, _, image_sizes, *settings = inputs
    _, _, _, kept_anchors = output
    ctx.save_for_backward(anchors, deltas, kept_anchors, image_sizes)
    ctx.weights, ctx.clamp = settings[5], settings[6]
    ctx.mark_non_differentiable(*output[1:])


def _propose_backward(ctx, grad_boxes, *_):
    anchors, deltas, kept_anchors, image_sizes = ctx.saved_tensors
    mask = [ctx.needs_input_grad[1], ctx.needs_input_grad[0]]  # deltas, anchors
    grad_deltas, grad_anchors = _ops.propose_backward(
        grad_boxes.contiguous(),
        anchors,
        deltas,
        kept_anchors,
        image_sizes,
        ctx.weights,
        ctx.clamp,
        mask,
    )
    return (grad_anchors if mask[1] else None, grad_deltas if mask[0] else None) + (None,) * 10


torch.library.register_autograd(
    "mlkernels::propose", _propose_backward, setup_context=_propose_setup
)
C.no_double_backward("propose_backward")
