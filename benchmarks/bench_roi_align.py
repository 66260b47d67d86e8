"""roi_align vs torchvision.ops.roi_align and the affine_grid + grid_sample path, at RLSD's shape:
a 38x50 map of 512 channels (a 600x800 image at stride 16), 256 proposals, 7x7 bins, 2x2 samples
per bin; and a batch of 8 such maps with 256 proposals each.

Forward+backward cases: ours computes the gradients of the map AND the boxes; torchvision's
gives only the map's; the grid_sample path gives both (boxes inside the image, so it agrees)."""

from __future__ import annotations

import contextlib

import torch
import torchvision
from harness import Case, is_cuda

import mlkernels
from mlkernels.reference import roi_align_grid_sample
from mlkernels.reference.roi_align import sample_positions

OUT, SCALE, RATIO = 7, 1 / 16, 2
ATOMICS_MEASURE = "input-gradient atomics, ours / torchvision's (emulator count)"
WALKS_MEASURE = "input-gradient axis walks, ours deterministic / ours atomic (emulator count)"


def _inputs(images: int, rois_per_image: int, generator: torch.Generator):
    feat = torch.randn(images, 512, 38, 50, generator=generator)
    k = images * rois_per_image
    wh = torch.rand(k, 2, generator=generator) * torch.tensor([400.0, 300.0]) + 32
    xy = torch.rand(k, 2, generator=generator) * (torch.tensor([800.0, 600.0]) - wh)
    index = torch.arange(images).repeat_interleave(rois_per_image).float()[:, None]
    boxes = torch.cat([index, xy, xy + wh], dim=1)
    grad = torch.randn(k, 512, OUT, OUT, generator=generator)
    return feat, boxes, grad


def _close(ours, anchor):
    """Outputs and the gradients both sides have; float32 sums in different orders."""
    if isinstance(ours, torch.Tensor):
        ours, anchor = (ours,), (anchor,)
    for a, b in zip(ours, anchor, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * max(1.0, b.abs().max().item()))


def _forward_backward(fn, feat, boxes, grad, box_grad: bool):
    x = feat.clone().requires_grad_()
    b = boxes.clone().requires_grad_(box_grad)

    def run():
        out = fn(x, b, OUT, SCALE, RATIO)
        grads = torch.autograd.grad(out, (x, b) if box_grad else (x,), grad)
        return (out, *grads)

    return run


@contextlib.contextmanager
def _deterministic_algorithms(enabled: bool):
    """torch.use_deterministic_algorithms(enabled) inside the block, the previous setting after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _deterministic(run):
    """run, with torch.use_deterministic_algorithms(True) around each call."""

    def wrapped():
        with _deterministic_algorithms(True):
            return run()

    return wrapped


def _emulated_counts(feat, boxes, grad) -> dict[str, float]:
    """Two counts of the input gradient's work on a GPU, from running our CUDA kernels on the grid
    emulator (a count, not a timing, so the same on any machine; nothing without the emulator, a
    build without MLKERNELS_EMULATOR=1):
    - its atomic additions over torchvision's: torchvision's four a valid sample of a bin and a
      channel (its CUDA backward adds each corner of each sample in [-1, H] x [-1, W]);
    - the deterministic kernel's walks of a bin's samples along one axis over the atomic kernel's
      (roi_align_axis_walks, rows plus columns), a thread's walks summed over the threads. The
      deterministic kernel's threads of a warp are 32 channels of one row and walk alike, so its
      warps make 1/32 of its count; the atomic kernel's threads of a warp walk as many rows but
      not always as many columns, so its warps make at least 1/32 of its count."""
    try:
        emulated_adds = torch.ops.mlkernels_emulated.atomic_adds
        emulated_walks = torch.ops.mlkernels_emulated.roi_align_axis_walks
    except (AttributeError, RuntimeError):
        return {}
    feat, boxes, grad = feat.cpu(), boxes.cpu(), grad.cpu()

    def counts(deterministic: bool) -> tuple[int, int]:  # one backward's atomics and walks
        with _deterministic_algorithms(deterministic):
            adds_before, walks_before = emulated_adds(), sum(emulated_walks())
            torch.ops.mlkernels_emulated.roi_align_backward(
                grad, feat, boxes, SCALE, OUT, OUT, RATIO, False, [True, False]
            )
            return emulated_adds() - adds_before, sum(emulated_walks()) - walks_before

    atomic_adds, atomic_walks = counts(False)
    _, deterministic_walks = counts(True)
    _, channels, height, width = feat.shape

    def valid_per_bin(low, high, extent):  # [K, OUT] valid samples of each bin along one axis
        start = low * SCALE
        bin_size = (high * SCALE - start).clamp(min=1) / OUT
        grid = torch.full_like(start, RATIO, dtype=torch.int64)
        _, valid = sample_positions(start, bin_size, grid, OUT, RATIO, extent)
        return valid.sum(dim=2)

    rows = valid_per_bin(boxes[:, 2], boxes[:, 4], height)
    cols = valid_per_bin(boxes[:, 1], boxes[:, 3], width)
    torchvision_adds = 4 * channels * int((rows[:, :, None] * cols[:, None, :]).sum())
    return {
        ATOMICS_MEASURE: atomic_adds / torchvision_adds,
        WALKS_MEASURE: deterministic_walks / atomic_walks,
    }


def deterministic_case(feat, boxes, grad, shape: str) -> Case:
    """Our forward+backward (no box gradients) with the deterministic input-gradient kernel
    against ours with the default, atomic one; the issue asks for at most 2x its time (a ratio of
    at least 0.5). A CUDA case: on the CPU both run the same deterministic kernel."""
    return Case(
        "roi_align",
        "fwd+bwd, deterministic input grads",
        shape,
        _deterministic(_forward_backward(mlkernels.ops.roi_align, feat, boxes, grad, False)),
        _forward_backward(mlkernels.ops.roi_align, feat, boxes, grad, False),
        "ours, atomic input grads (the default)",
        _close,
        target_ratio=0.5,
    )


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    """Every case runs on CUDA too: torchvision's roi_align and the affine_grid + grid_sample path
    have CUDA kernels. CUDA adds our deterministic backward against our default one."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 256)] if quick else [(1, 256), (8, 256)]
    out = []
    for images, per_image in shapes:
        feat, boxes, grad = (t.to(device) for t in _inputs(images, per_image, g))
        shape = f"{images}x512x38x50, {images * per_image} RoIs, 7x7, ratio 2"
        rlsd = images == 1

        out += [
            Case(
                "roi_align",
                "forward",
                shape,
                lambda f=feat, b=boxes: mlkernels.ops.roi_align(f, b, OUT, SCALE, RATIO),
                lambda f=feat, b=boxes: torchvision.ops.roi_align(f, b, OUT, SCALE, RATIO),
                "torchvision.ops.roi_align",
                _close,
                target_ratio=2.0 if rlsd else None,
            ),
        ]
        # (name, ours with box gradients?, anchor, its name, anchor with box gradients?, target)
        for name, box_grad, anchor, anchor_name, anchor_box_grad, target in (
            (
                "fwd+bwd, no box grads",
                False,
                torchvision.ops.roi_align,
                "torchvision.ops.roi_align",
                False,
                10.0 if rlsd else None,
            ),
            (
                "fwd+bwd (ours: +box grads)",
                True,
                torchvision.ops.roi_align,
                "torchvision.ops.roi_align (no box grads)",
                False,
                4.0 if rlsd else None,
            ),
            (
                "fwd+bwd, box grads both",
                True,
                roi_align_grid_sample,
                "affine_grid + grid_sample",
                True,
                None,
            ),
        ):
            out.append(
                Case(
                    "roi_align",
                    name,
                    shape,
                    _forward_backward(mlkernels.ops.roi_align, feat, boxes, grad, box_grad),
                    _forward_backward(anchor, feat, boxes, grad, anchor_box_grad),
                    anchor_name,
                    _close,
                    target_ratio=target,
                    measures=(
                        (lambda _row, f=feat, b=boxes, g=grad: _emulated_counts(f, b, g))
                        if rlsd and name == "fwd+bwd, no box grads"
                        else None
                    ),
                )
            )
        if is_cuda(device):
            out.append(deterministic_case(feat, boxes, grad, shape))
    return out
