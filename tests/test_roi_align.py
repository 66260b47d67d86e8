"""roi_align: every implementation (CPU, the CUDA kernels' logic on the grid emulator, CUDA) against
torchvision and the reference, gradients w.r.t. the map and the boxes (gradcheck, the reference, an
affine_grid + grid_sample formulation), determinism, low precision, layouts, opcheck, bad and empty
input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from helpers import ALL_IMPLS, DEVICE_IMPLS, deterministic_algorithms, impl_params, run_opcheck
from hypothesis import assume, given
from hypothesis import strategies as st

from mlkernels import nn, ops, reference

DTYPES = [torch.float32, torch.float64]
RATIOS = [-1, 0, 1, 2, 3]


def _rois(
    seed: int,
    k: int,
    batch: int,
    height: int,
    width: int,
    kind: str,
    dtype=torch.float64,
    scale: float = 1.0,
) -> torch.Tensor:
    """k RoI rows (batch index, x1, y1, x2, y2) in input coordinates (map pixels / scale).

    kind: "inside" the map, "outside" (straddling or beyond its borders), "tiny" (sides below
    one pixel) or "degenerate" (x2 < x1 or y2 < y1, and zero sizes)."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([width, height], dtype=torch.float64)
    if kind == "inside":
        lo = torch.rand(k, 2, generator=g, dtype=torch.float64) * (size - 1)
        hi = lo + torch.rand(k, 2, generator=g, dtype=torch.float64) * (size - 1 - lo)
    elif kind == "outside":
        lo = torch.rand(k, 2, generator=g, dtype=torch.float64) * (size + 8) - 6
        hi = lo + torch.rand(k, 2, generator=g, dtype=torch.float64) * (size + 4)
    elif kind == "tiny":
        lo = torch.rand(k, 2, generator=g, dtype=torch.float64) * size
        hi = lo + torch.rand(k, 2, generator=g, dtype=torch.float64) * 0.9
    else:
        lo = torch.rand(k, 2, generator=g, dtype=torch.float64) * size
        hi = lo - torch.rand(k, 2, generator=g, dtype=torch.float64) * 4
        hi[::3] = lo[::3]
    index = torch.randint(0, max(batch, 1), (k, 1), generator=g).to(torch.float64)
    return torch.cat([index, lo / scale, hi / scale], dim=1).to(dtype)


def _map(seed: int, shape, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _kink_distance(rois, oh, ow, scale, ratio, aligned) -> float:
    """How close any sample of any RoI comes to a point where roi_align is not differentiable:
    a pixel border (bilinear kink), the [-1, size] cut-off or the clamp to the border, the
    width clamp at 1 (not aligned), or a jump of the adaptive sample count."""
    rois = rois.detach().double()
    if rois.shape[0] == 0:
        return math.inf
    off = 0.5 if aligned else 0.0
    best = math.inf
    for start_col, bins in ((1, ow), (2, oh)):
        start = rois[:, start_col] * scale - off
        length = rois[:, start_col + 2] * scale - off - start
        if not aligned:
            best = min(best, (length - 1).abs().min().item())
            length = length.clamp(min=1)
        if ratio > 0:
            grid = torch.full_like(length, ratio)
        else:
            grid = torch.ceil(length / bins)
            frac = length / bins
            best = min(best, (frac - frac.round()).abs().min().item() * bins)
        for k in range(rois.shape[0]):
            n = int(grid[k])
            if n <= 0:
                continue
            i = torch.arange(bins * n, dtype=torch.float64)
            coord = start[k] + (i + 0.5) / (bins * n) * length[k]
            # pixel borders; the cut-off at -1 and size and the clamps at 0 and size - 1 too
            best = min(best, (coord - coord.round()).abs().min().item())
    return best


# ---- forward: every implementation against torchvision and the reference ----


@ALL_IMPLS
@given(
    seed=st.integers(0, 2**31),
    k=st.integers(0, 12),
    batch=st.integers(1, 3),
    channels=st.integers(1, 6),
    height=st.integers(1, 14),
    width=st.integers(1, 14),
    oh=st.integers(1, 4),
    ow=st.integers(1, 4),
    ratio=st.sampled_from(RATIOS),
    aligned=st.booleans(),
    scale=st.sampled_from([1.0, 0.5, 0.25]),
    kind=st.sampled_from(["inside", "outside", "tiny", "degenerate"]),
    dtype=st.sampled_from(DTYPES),
)
def test_forward_matches_torchvision(
    impl, seed, k, batch, channels, height, width, oh, ow, ratio, aligned, scale, kind, dtype
):
    x = _map(seed, (batch, channels, height, width), dtype)
    rois = _rois(seed, k, batch, height, width, kind, dtype, scale)
    expected = torchvision.ops.roi_align(x, rois, (oh, ow), scale, ratio, aligned)
    ours = impl.call("roi_align", x, rois, scale, oh, ow, ratio, aligned)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(
        reference.roi_align(x, rois, (oh, ow), scale, ratio, aligned), expected
    )


def test_forward_list_of_boxes_matches_tensor_form():
    x = _map(0, (3, 4, 10, 12))
    per_image = [_rois(i, n, 1, 10, 12, "outside")[:, 1:] for i, n in enumerate((5, 0, 3))]
    expected = torchvision.ops.roi_align(x, per_image, 3, 1.0, 2)
    torch.testing.assert_close(ops.roi_align(x, per_image, 3, 1.0, 2), expected)
    torch.testing.assert_close(reference.roi_align(x, per_image, 3, 1.0, 2), expected)
    rows = torch.cat(
        [
            torch.cat([torch.full((5, 1), 0.0, dtype=torch.float64), per_image[0]], 1),
            torch.cat([torch.full((3, 1), 2.0, dtype=torch.float64), per_image[2]], 1),
        ]
    )
    torch.testing.assert_close(ops.roi_align(x, rows, 3, 1.0, 2), expected)


def test_rlsd_like_shape_matches_torchvision():
    x = _map(3, (2, 64, 38, 50), torch.float32)
    rois = _rois(3, 100, 2, 600, 800, "outside", torch.float32)
    for ratio in (2, -1):
        expected = torchvision.ops.roi_align(x, rois, 7, 1 / 16, ratio)
        torch.testing.assert_close(ops.roi_align(x, rois, 7, 1 / 16, ratio), expected)


def test_layouts_give_the_same_result():
    x = _map(4, (2, 24, 9, 11), torch.float32)
    rois = _rois(4, 30, 2, 9, 11, "outside", torch.float32)
    expected = torchvision.ops.roi_align(x, rois, (2, 3), 1.0, 2, True)
    cl = x.contiguous(memory_format=torch.channels_last)
    strided = torch.cat([x, x], dim=3)[..., : x.shape[3]]  # not contiguous in any format
    assert not strided.is_contiguous() and not strided.is_contiguous(
        memory_format=torch.channels_last
    )
    strided_rois = torch.cat([rois, rois], 1)[:, ::2]
    assert not strided_rois.is_contiguous()
    for inp in (cl, strided):
        torch.testing.assert_close(ops.roi_align(inp, rois, (2, 3), 1.0, 2, True), expected)
    torch.testing.assert_close(
        ops.roi_align(x, strided_rois, (2, 3), 1.0, 2, True),
        torchvision.ops.roi_align(x, strided_rois.contiguous(), (2, 3), 1.0, 2, True),
    )
    # gradients do not depend on the layout either
    grads = []
    for inp in (x, cl):
        inp = inp.clone().requires_grad_()
        r = rois.clone().requires_grad_()
        ops.roi_align(inp, r, (2, 3), 1.0, 2, True).sum().backward()
        grads.append((inp.grad, r.grad))
    torch.testing.assert_close(grads[0], grads[1])


# ---- gradients ----


@DEVICE_IMPLS
@given(
    seed=st.integers(0, 2**31),
    k=st.integers(1, 4),
    ratio=st.sampled_from(RATIOS),
    aligned=st.booleans(),
    scale=st.sampled_from([1.0, 0.5]),
    kind=st.sampled_from(["inside", "outside", "tiny"]),
)
def test_gradcheck_input_and_boxes(impl, seed, k, ratio, aligned, scale, kind):
    h, w, oh, ow = 7, 8, 2, 3
    rois = _rois(seed, k, 2, h, w, kind, scale=scale)
    assume(_kink_distance(rois, oh, ow, scale, ratio, aligned) > 1e-4)
    rois = impl.to(rois)
    x = impl.to(_map(seed, (2, 2, h, w))).requires_grad_()
    index, coords = rois[:, :1], rois[:, 1:].clone().requires_grad_()  # the index must stay whole

    def fn(a, b):
        return ops.roi_align(a, torch.cat([index, b], 1), (oh, ow), scale, ratio, aligned)

    assert torch.autograd.gradcheck(fn, (x, coords))


@DEVICE_IMPLS
@given(
    seed=st.integers(0, 2**31),
    k=st.integers(0, 10),
    ratio=st.sampled_from(RATIOS),
    aligned=st.booleans(),
    kind=st.sampled_from(["inside", "outside", "tiny", "degenerate"]),
)
def test_gradients_match_reference_autograd(impl, seed, k, ratio, aligned, kind):
    h, w = 9, 11
    x = _map(seed, (2, 3, h, w))
    rois = _rois(seed, k, 2, h, w, kind, scale=0.5)
    assume(_kink_distance(rois, 3, 2, 0.5, ratio, aligned) > 1e-6)
    grad = _map(seed + 7, (k, 3, 3, 2))
    results = []
    for fn, device in ((ops.roi_align, impl.device), (reference.roi_align, "cpu")):
        a, b = (t.to(device).requires_grad_() for t in (x.clone(), rois.clone()))
        fn(a, b, (3, 2), 0.5, ratio, aligned).backward(grad.to(device))
        results.append((a.grad.cpu(), b.grad.cpu()))
    torch.testing.assert_close(results[0], results[1])
    assert torch.isfinite(results[0][1]).all()
    if k:
        assert (results[0][1][:, 0] == 0).all()  # no gradient to the batch index


@pytest.mark.parametrize("k", [1, 3, 40])
def test_many_channels_match_reference(k):
    """70 channels: the CPU kernels split them into ranges (forward, few RoIs) and blocks
    (backward), the last one partial."""
    x = _map(k, (2, 70, 9, 10))
    rois = _rois(k, k, 2, 9, 10, "outside")
    grad = _map(k + 1, (k, 70, 3, 3))
    results = []
    for fn in (ops.roi_align, reference.roi_align):
        a, b = x.clone().requires_grad_(), rois.clone().requires_grad_()
        out = fn(a, b, 3, 1.0, -1, True)
        out.backward(grad)
        results.append((out, a.grad, b.grad))
    torch.testing.assert_close(results[0][0], torchvision.ops.roi_align(x, rois, 3, 1.0, -1, True))
    torch.testing.assert_close(results[0], results[1])


@DEVICE_IMPLS
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_box_gradient_matches_affine_grid_sample(impl, aligned, ratio):
    """An independent formulation: affine_grid + grid_sample, differentiated by autograd. It is
    exact where every sample of a RoI lies in [-1, size]; RoIs reaching beyond are left out."""
    h, w = 10, 13
    x = _map(ratio, (2, 3, h, w))
    rois = _rois(ratio + 10, 16, 2, h - 1, w - 1, "inside", scale=0.5)
    rois[:, 3:] = torch.maximum(rois[:, 3:], rois[:, 1:3] + 2.5)  # sides >= 1 map pixel
    inside = _samples_inside(rois, 2, 4, 0.5, ratio, aligned, h, w)
    assert inside.sum() >= 4
    rois = rois[inside]
    grad = _map(ratio + 20, (rois.shape[0], 3, 2, 4))
    results = []
    for fn, device in ((ops.roi_align, impl.device), (reference.roi_align_grid_sample, "cpu")):
        a, b = (t.to(device).requires_grad_() for t in (x.clone(), rois.clone()))
        out = fn(a, b, (2, 4), 0.5, ratio, aligned)
        out.backward(grad.to(device))
        results.append((out.detach().cpu(), a.grad.cpu(), b.grad.cpu()))
    torch.testing.assert_close(results[0], results[1])
    assert results[0][2][:, 1:].abs().min() > 0


def _samples_inside(rois, oh, ow, scale, ratio, aligned, height, width):
    """Per RoI: every sample lies in [-1, size] (where grid_sample's border padding is exact)."""
    off = 0.5 if aligned else 0.0
    ok = torch.ones(rois.shape[0], dtype=torch.bool)
    for col, bins, size in ((1, ow, width), (2, oh, height)):
        start = rois[:, col] * scale - off
        length = rois[:, col + 2] * scale - off - start
        i = torch.arange(bins * ratio, dtype=torch.float64)
        coord = start[:, None] + (i + 0.5) / (bins * ratio) * length[:, None]
        ok &= ((coord >= -1) & (coord <= size)).all(1)
    return ok


@DEVICE_IMPLS
def test_degenerate_and_outside_boxes_have_finite_gradients(impl):
    x = impl.to(_map(5, (1, 2, 6, 6))).requires_grad_()
    rois = torch.tensor(
        [
            [0, 3.0, 3.0, 1.0, 1.0],  # x2 < x1
            [0, 2.0, 2.0, 2.0, 2.0],  # a point
            [0, -50.0, -50.0, -40.0, -40.0],  # entirely outside
            [0, 1e3, 1e3, 2e3, 2e3],  # far outside
            [0, -3.0, 1.0, 10.0, 4.0],  # straddling
        ],
        dtype=torch.float64,
        device=impl.device,
        requires_grad=True,
    )
    for ratio in (-1, 2):
        for aligned in (False, True):
            out = ops.roi_align(x, rois, 3, 1.0, ratio, aligned)
            x_cpu, rois_cpu = x.detach().cpu(), rois.detach().cpu()
            torch.testing.assert_close(
                out.cpu(), torchvision.ops.roi_align(x_cpu, rois_cpu, 3, 1.0, ratio, aligned)
            )
            gx, gb = torch.autograd.grad(out.sum(), (x, rois))
            assert torch.isfinite(gx).all() and torch.isfinite(gb).all()
            assert (gb[2:4] == 0).all()  # nothing sampled, nothing to move
    # A box 10^6 times the map: adaptive sampling asks for ~10^11 samples a bin; those that
    # cannot reach the map are skipped, so this returns at once (torchvision runs out of memory).
    huge = torch.tensor(
        [[0, -1e6, -1e6, 1e6, 1e6]], dtype=torch.float64, device=impl.device, requires_grad=True
    )
    out = ops.roi_align(x, huge, 2, 1.0, -1, True)
    assert torch.isfinite(out).all()
    assert torch.isfinite(torch.autograd.grad(out.sum(), huge)[0]).all()


@ALL_IMPLS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size,output_size,ratio", [(1e9, 2, -1), (3.0, 1, 1024)])
def test_huge_boxes_and_sample_grids(impl, dtype, size, output_size, ratio):
    """Boxes and sample grids far beyond the map: adaptive grids of 5 * 10^8 samples a side, and
    the largest explicit grid (1024 a side, 2^20 samples a bin; larger ones are refused). On a
    map of ones a bin is a mean of samples worth 1 or 0, so it lies in [0, 1]; each of these bins
    reaches the map, so > 0."""
    ones = torch.ones(1, 2, 6, 6, dtype=dtype)
    box = torch.tensor([[0, -size, -size, size, size]], dtype=dtype)
    out = impl.call("roi_align", ones, box, 1.0, output_size, output_size, ratio, True)
    assert ((out > 0) & (out <= 1)).all(), out


@ALL_IMPLS
@pytest.mark.parametrize("aligned", [False, True])
def test_infinite_box_coordinates_give_zero(impl, aligned):
    """An infinite coordinate puts every sample at +-inf or NaN: the bins are 0 (a mean over an
    infinite box), gradients finite, and the call returns at once (the adaptive grid of an
    infinite box is capped, never looped over)."""
    inf = float("inf")
    x = _map(32, (1, 2, 6, 7))
    rois = torch.tensor(
        [[0, 1, 1, inf, 3], [0, -inf, -inf, inf, inf], [0, inf, inf, inf, inf], [0, 1, -inf, 3, 2]],
        dtype=torch.float64,
    )
    grad = _map(33, (4, 2, 2, 2))
    for ratio in (-1, 8):
        out = impl.call("roi_align", x, rois, 1.0, 2, 2, ratio, aligned)
        assert (out == 0).all()
        gi, gb = impl.call("roi_align_backward", grad, x, rois, 1.0, 2, 2, ratio, aligned)
        assert (gi == 0).all() and (gb == 0).all()


@ALL_IMPLS
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("column", [1, 2, 3, 4])
def test_nan_box_coordinate_gives_nan(impl, aligned, column):
    """A NaN coordinate has no sample position: its RoI's bins and box gradient are NaN (not 0,
    not the bins of a width clamped to 1); the other RoIs are untouched. torchvision crashes."""
    x = _map(30, (2, 3, 6, 7))
    rois = _rois(30, 4, 2, 6, 7, "inside")
    rois[1, column] = float("nan")
    grad = _map(31, (4, 3, 2, 2))
    keep = torch.tensor([0, 2, 3])
    expected = torchvision.ops.roi_align(x, rois[keep], 2, 1.0, 2, aligned)
    for ratio in (-1, 2):
        for out in (
            impl.call("roi_align", x, rois, 1.0, 2, 2, ratio, aligned),
            reference.roi_align(x, rois, 2, 1.0, ratio, aligned),
        ):
            assert out[1].isnan().all()
            if ratio == 2:
                torch.testing.assert_close(out[keep], expected)
        gb = impl.call("roi_align_backward", grad, x, rois, 1.0, 2, 2, ratio, aligned)[1]
        assert gb[1, 1:].isnan().all() and gb[1, 0] == 0
        assert torch.isfinite(gb[keep]).all()


@DEVICE_IMPLS
def test_double_backward_raises_instead_of_returning_zeros(impl):
    x = impl.to(_map(41, (1, 2, 6, 6))).requires_grad_()
    rois = torch.tensor(
        [[0, 1.0, 1, 4, 4]], dtype=torch.float64, device=impl.device, requires_grad=True
    )
    out = ops.roi_align(x, rois, 2, 1.0, 2, True)
    (gb,) = torch.autograd.grad(out.square().sum(), rois, create_graph=True)
    with pytest.raises(RuntimeError, match="roi_align: second derivatives"):
        torch.autograd.grad(gb.sum(), x)
    # first derivatives are unaffected by create_graph
    (plain,) = torch.autograd.grad(ops.roi_align(x, rois, 2, 1.0, 2, True).square().sum(), rois)
    torch.testing.assert_close(gb.detach(), plain)


# ---- determinism ----


def test_cpu_backward_is_bitwise_deterministic_across_runs_and_threads():
    x = _map(6, (2, 80, 12, 15), torch.float32)  # 80 channels: several channel blocks
    rois = _rois(6, 60, 2, 12 * 8, 15 * 8, "outside", torch.float32)
    grad = _map(7, (60, 80, 4, 4), torch.float32)
    threads = torch.get_num_threads()

    def run():
        out = ops.roi_align(x, rois, 4, 1 / 8, -1)
        gi, gb = torch.ops.mlkernels.roi_align_backward(grad, x, rois, 1 / 8, 4, 4, -1, False)
        return out, gi, gb

    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(2)
        runs = [run() for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    for other in runs:
        for a, b in zip(single, other, strict=True):
            assert torch.equal(a, b)


# ---- the backward op: every implementation against the reference ----


@ALL_IMPLS
@given(
    seed=st.integers(0, 2**31),
    k=st.integers(0, 8),
    ratio=st.sampled_from(RATIOS),
    aligned=st.booleans(),
    kind=st.sampled_from(["inside", "outside", "tiny", "degenerate"]),
    deterministic=st.booleans(),
)
def test_backward_op_matches_reference(impl, seed, k, ratio, aligned, kind, deterministic):
    h, w = 8, 9
    x = _map(seed, (2, 3, h, w))
    rois = _rois(seed, k, 2, h, w, kind, scale=2.0)
    assume(_kink_distance(rois, 2, 3, 2.0, ratio, aligned) > 1e-6)
    grad = _map(seed + 3, (k, 3, 2, 3))
    a, b = x.clone().requires_grad_(), rois.clone().requires_grad_()
    reference.roi_align(a, b, (2, 3), 2.0, ratio, aligned).backward(grad)
    with deterministic_algorithms(deterministic):  # the CUDA kernels' input-gradient variants
        gi, gb = impl.call("roi_align_backward", grad, x, rois, 2.0, 2, 3, ratio, aligned)
    torch.testing.assert_close(gi, a.grad)
    torch.testing.assert_close(gb, b.grad)


@pytest.mark.parametrize("impl", impl_params("emulated", "cuda"))
def test_deterministic_and_atomic_variants_agree(impl):
    # 40 channels x 9 bins: more (channel, bin) elements than a box-gradient block's 256
    # threads, so a RoI has two chunks (plain_chunk_phase) for BoxGradBlock to add up
    x = _map(8, (2, 40, 10, 10), torch.float32)
    rois = _rois(8, 20, 2, 10, 10, "outside", torch.float32)
    grad = _map(9, (20, 40, 3, 3), torch.float32)
    args = (grad, x, rois, 1.0, 3, 3, 2, True)
    with deterministic_algorithms(False):
        atomic = impl.call("roi_align_backward", *args)
    with deterministic_algorithms(True):
        ordered = impl.call("roi_align_backward", *args)
    cpu = torch.ops.mlkernels.roi_align_backward(*args)
    for a, b, c in zip(atomic, ordered, cpu, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    assert atomic[1].abs().sum() > 0


# ---- float16 / bfloat16 ----


@ALL_IMPLS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ratio", [-1, 2])
def test_low_precision_error_within_twice_torchvisions(impl, dtype, ratio):
    x = _map(10, (2, 16, 20, 24), dtype)
    rois = _rois(10, 40, 2, 20 * 4, 24 * 4, "outside", dtype)
    # the fp32 truth on the very same (rounded) inputs
    truth = torchvision.ops.roi_align(x.float(), rois.float(), 5, 0.25, ratio)
    if dtype == torch.float16:
        theirs = torchvision.ops.roi_align(x, rois, 5, 0.25, ratio).float()
    else:  # torchvision has no bfloat16 CPU kernel: the error of rounding the truth itself
        theirs = truth.to(dtype).float()
    ours = impl.call("roi_align", x, rois, 0.25, 5, 5, ratio, False)
    assert ours.dtype == dtype
    err = (ours.float() - truth).abs().max().item()
    their_err = (theirs - truth).abs().max().item()
    assert err <= 2 * their_err + 1e-6, (err, their_err)
    # gradients: float32 accumulation, then one rounding
    grad = _map(11, (40, 16, 5, 5), torch.float32)
    gi, gb = impl.call("roi_align_backward", grad.to(dtype), x, rois, 0.25, 5, 5, ratio, False)
    gi32, gb32 = torch.ops.mlkernels.roi_align_backward(
        grad.to(dtype).float(), x.float(), rois.float(), 0.25, 5, 5, ratio, False
    )
    assert gi.dtype == dtype and gb.dtype == dtype
    if impl.name == "cpu":  # the CPU kernels: exactly the float32 result, rounded once
        torch.testing.assert_close(gi.float(), gi32.to(dtype).float(), rtol=0, atol=0)
        torch.testing.assert_close(gb.float(), gb32.to(dtype).float(), rtol=0, atol=0)
    else:  # the CUDA kernels accumulate in float32 too, in another order: within one rounding
        for ours, exact in ((gi, gi32), (gb, gb32)):
            err = (ours.float() - exact).abs()
            rounding = (exact.to(dtype).float() - exact).abs()
            assert (err <= 2 * rounding + 1e-4 * exact.abs().max()).all()


@DEVICE_IMPLS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_mixes_dtypes_as_torchvision(impl, dtype):
    """Under autocast a conv gives a low-precision map while the boxes stay float32; torchvision
    computes in float32 and returns the map's dtype. So must a drop-in."""
    x = impl.to(_map(40, (2, 3, 10, 12), torch.float32))
    conv = torch.nn.Conv2d(3, 4, 1).to(impl.device)
    rois = impl.to(_rois(40, 7, 2, 10, 12, "outside", torch.float32)).requires_grad_()
    with torch.autocast(impl.device, dtype=dtype):
        feat = conv(x)
        assert feat.dtype == dtype and rois.dtype == torch.float32
        theirs = torchvision.ops.roi_align(feat, rois, 3, 1.0, 2, True)
        ours = ops.roi_align(feat, rois, 3, 1.0, 2, True)
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs)
    ours.float().sum().backward()
    assert rois.grad is not None and rois.grad.dtype == torch.float32
    assert rois.grad[:, 1:].abs().sum() > 0


# ---- empty inputs ----


@DEVICE_IMPLS
def test_empty_inputs(impl):
    device = impl.device
    x = torch.randn(2, 3, 5, 5, device=device, requires_grad=True)
    none = torch.zeros(0, 5, device=device, requires_grad=True)
    out = ops.roi_align(x, none, 2)
    assert out.shape == (0, 3, 2, 2)
    out.sum().backward()
    assert (x.grad == 0).all() and none.grad.shape == (0, 5)
    assert ops.roi_align(x, [], 2).shape == (0, 3, 2, 2)
    assert ops.roi_align(x, [torch.zeros(0, 4, device=device)] * 2, 2).shape == (0, 3, 2, 2)
    no_channels = torch.zeros(2, 0, 5, 5, device=device)
    boxes = torch.tensor([[1.0, 0, 0, 2, 2]], device=device)
    assert ops.roi_align(no_channels, boxes, 3).shape == (1, 0, 3, 3)
    no_pixels = torch.zeros(2, 3, 0, 4, device=device)
    assert (ops.roi_align(no_pixels, boxes, 3) == 0).all()


@ALL_IMPLS
def test_empty_inputs_raw(impl):
    x, none = torch.randn(2, 3, 5, 5), torch.zeros(0, 5)
    assert impl.call("roi_align", x, none, 1.0, 2, 2, -1, False).shape == (0, 3, 2, 2)
    gi, gb = impl.call("roi_align_backward", torch.zeros(0, 3, 2, 2), x, none, 1.0, 2, 2, -1, False)
    assert (gi == 0).all() and gi.shape == x.shape and gb.shape == (0, 5)
    boxes = torch.tensor([[1.0, 0, 0, 2, 2]])
    assert impl.call("roi_align", x[:, :0], boxes, 1.0, 3, 3, 2, False).shape == (1, 0, 3, 3)
    assert (impl.call("roi_align", x[:, :, :0], boxes, 1.0, 3, 3, 2, False) == 0).all()


# ---- nn.RoIAlign ----


def test_module_is_a_drop_in_for_torchvision():
    ours = nn.RoIAlign((3, 2), 0.5, 2, aligned=True)
    theirs = torchvision.ops.RoIAlign((3, 2), 0.5, 2, aligned=True)
    assert repr(ours) == repr(theirs)
    x = _map(12, (2, 4, 8, 8), torch.float32)
    rois = _rois(12, 9, 2, 16, 16, "outside", torch.float32)
    torch.testing.assert_close(ours(x, rois), theirs(x, rois))
    r = rois.clone().requires_grad_()
    ours(x, r).sum().backward()
    assert r.grad.abs().sum() > 0


# ---- opcheck, torch.compile ----


def _opcheck_samples():
    x = _map(13, (2, 3, 6, 7))
    rois = _rois(13, 5, 2, 6, 7, "outside")
    yield (
        "roi_align",
        (x.clone().requires_grad_(), rois.clone().requires_grad_(), 1.0, 2, 3, 2, False),
    )
    yield "roi_align", (x, rois, 0.5, 3, 3, -1, True)
    yield "roi_align", (x.float(), rois[:0].float(), 1.0, 2, 2, 1, False)
    grad = _map(14, (5, 3, 2, 3))
    yield "roi_align_backward", (grad, x, rois, 1.0, 2, 3, 0, True)


@DEVICE_IMPLS
@pytest.mark.parametrize(
    "name,args", list(_opcheck_samples()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_opcheck(impl, name, args):
    run_opcheck(impl, name, args)


def test_torch_compile():
    x = _map(15, (2, 3, 6, 7), torch.float32)
    rois = _rois(15, 5, 2, 6, 7, "outside", torch.float32)
    compiled = torch.compile(lambda a, b: ops.roi_align(a, b, 2, 1.0, 2).relu(), fullgraph=True)
    torch.testing.assert_close(compiled(x, rois), ops.roi_align(x, rois, 2, 1.0, 2).relu())


# ---- bad input: clear errors, the same from the fake kernels ----

X = torch.zeros(2, 3, 5, 5)
BOX = torch.tensor([[0.0, 0, 0, 2, 2]])
BAD_CASES = [
    (
        (X, torch.zeros(3, 4), 2),
        RuntimeError,
        r"roi_align: boxes must be Tensor\[K, 5\] or list of Tensor\[L, 4\], got Tensor\[3, 4\]",
    ),
    (
        (X, [torch.zeros(3, 5)], 2),
        RuntimeError,
        r"roi_align: boxes must be Tensor\[K, 5\] or list of Tensor\[L, 4\], got list containing "
        r"Tensor\[3, 5\]",
    ),
    (
        (torch.zeros(3, 5, 5), BOX, 2),
        RuntimeError,
        r"roi_align: input must be Tensor\[N, C, H, W\], got Tensor\[3, 5, 5\]",
    ),
    (
        (X, BOX.double(), 2),
        RuntimeError,
        r"roi_align: boxes must have the dtype of input \(float32\), got float64",
    ),
    (
        (X.long(), BOX.long(), 2),
        RuntimeError,
        "roi_align: input must be float16, bfloat16, float32 or float64, got int64",
    ),
    (
        (X, BOX.to("meta"), 2),
        RuntimeError,
        r"roi_align: boxes must be on the device of input \(cpu\), got meta",
    ),
    ((X, BOX, (0, 2)), ValueError, r"roi_align: output_size must be positive, got \(0, 2\)"),
    ((X, BOX, 2, -1.0), ValueError, "roi_align: spatial_scale must be finite and positive, got -1"),
]


@pytest.mark.parametrize("args,error,message", BAD_CASES)
@pytest.mark.parametrize("mode", ["eager", "fake"])
def test_bad_input_messages(args, error, message, mode):
    if mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        def fake(a, m):
            if isinstance(a, torch.Tensor):
                return m.from_tensor(a)
            if isinstance(a, list):
                return [fake(t, m) for t in a]
            return a

        with FakeTensorMode() as fake_mode:
            args = tuple(fake(a, fake_mode) for a in args)
            with pytest.raises(error, match=message):
                ops.roi_align(*args)
    else:
        with pytest.raises(error, match=message):
            ops.roi_align(*args)


# The CPU checks the column before it starts (no sync there) and names the smallest or largest bad
# value; the CUDA kernels check each index where they read it (a device-side assert, see
# tests/test_no_sync.py), and the emulator, which runs their code, raises the same check's error.
_BAD_INDEX_CPU = r"roi_align: boxes\[:, 0\] \(batch index\) must be "
_BAD_INDEX_KERNEL = (
    r"roi_align: boxes\[:, 0\] \(batch index\) must be an integer in \[0, N\), "
    r"N = input.size\(0\), got "
)


@pytest.mark.parametrize("impl", impl_params("cpu", "emulated"))
@pytest.mark.parametrize(
    "index,cpu_message,got",
    [
        (2.0, r"in \[0, 2\), got 2", "2"),
        (-1.0, r"in \[0, 2\), got -1", "-1"),
        (0.5, r"integers, got 0.5", "0.5"),
        (float("nan"), r"integers, got nan", "nan"),
        (1e30, r"in \[0, 2\), got 1e\+30", r"1e\+30"),
    ],
)
def test_bad_batch_index(impl, index, cpu_message, got):
    boxes = torch.tensor([[0.0, 0, 0, 2, 2], [index, 0, 0, 2, 2]])
    if impl.emulated:
        message = backward_message = _BAD_INDEX_KERNEL + got + r" \(N = 2\)"
    else:
        message = _BAD_INDEX_CPU + cpu_message
        backward_message = message.replace("roi_align", "roi_align_backward")
        with pytest.raises(RuntimeError, match=message):
            ops.roi_align(X, boxes, 2)
    with pytest.raises(RuntimeError, match=message):
        impl.call("roi_align", X, boxes, 1.0, 2, 2, 2, False)
    for deterministic in (False, True):  # the two input-gradient kernels
        with deterministic_algorithms(deterministic):
            with pytest.raises(RuntimeError, match=backward_message):
                impl.call(
                    "roi_align_backward", torch.zeros(2, 3, 2, 2), X, boxes, 1.0, 2, 2, 2, False
                )
    # the box-gradient kernel alone
    with pytest.raises(RuntimeError, match=backward_message):
        impl.call(
            "roi_align_backward",
            torch.zeros(2, 3, 2, 2),
            X,
            boxes,
            1.0,
            2,
            2,
            2,
            False,
            [False, True],
        )


def test_output_size_accepts_any_integer_type():
    # torchvision takes numpy and tensor integers (e.g. sizes read from a config array).
    expected = ops.roi_align(X, BOX, (2, 3))
    for size in [(np.int64(2), 3), (torch.tensor(2), np.int32(3))]:
        torch.testing.assert_close(ops.roi_align(X, BOX, size), expected, rtol=0, atol=0)
    assert ops.roi_align(X, BOX, np.int64(2)).shape[-2:] == (2, 2)


def test_bad_argument_types():
    with pytest.raises(TypeError, match="roi_align: input must be a Tensor, got list"):
        ops.roi_align([[1.0]], BOX, 2)
    for bad in [(2, 2, 2), 2.0, True, (2, 2.5), torch.tensor(2.0)]:
        with pytest.raises(TypeError, match=r"roi_align: output_size must be an int or a pair"):
            ops.roi_align(X, BOX, bad)
    with pytest.raises(TypeError, match=r"roi_align: boxes must be Tensor\[K, 5\] or list"):
        ops.roi_align(X, "boxes", 2)
    with pytest.raises(
        RuntimeError, match=r"roi_align_backward: grad must be Tensor\[1, 3, 2, 2\]"
    ):
        torch.ops.mlkernels.roi_align_backward(torch.zeros(1, 3, 2, 3), X, BOX, 1.0, 2, 2, 2, False)


@pytest.mark.parametrize("impl", impl_params("emulated"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("kind", "ratio", "aligned"),
    [
        ("outside", 2, False),
        ("inside", -1, True),
        ("tiny", 3, False),
        ("degenerate", 2, True),
        ("huge", -1, False),
    ],
)
def test_deterministic_input_gradient_is_the_cpus_to_the_bit(impl, dtype, kind, ratio, aligned):
    # The row-owner kernel adds each pixel's terms in the CPU kernel's order (RoIs of an image by
    # index, bins, samples, corners); the emulator, like the CPU, does not fuse multiply-adds.
    x = _map(10, (3, 5, 11, 13), dtype)
    rois = _rois(10, 24, 3, 11 * 4, 13 * 4, "outside" if kind == "huge" else kind, dtype)
    if kind == "huge":  # adaptive grids of ~10^5 samples a side, nearly all off the map
        rois[::4, 3:] *= 1e5
    grad = _map(11, (24, 5, 3, 4), dtype)
    args = (grad, x, rois, 0.25, 3, 4, ratio, aligned)
    with deterministic_algorithms(True):
        ordered = impl.call("roi_align_backward", *args)
    cpu = torch.ops.mlkernels.roi_align_backward(*args)
    assert torch.equal(ordered[0], cpu[0])
    assert ordered[0].abs().sum() > 0


def _plain_edge_boxes(oh: int, ow: int, dtype) -> torch.Tensor:
    """Boxes on either side of the condition that picks the CUDA kernels' plain walk (PlainWalk in
    roi_align_math.h: at most the map's side + 8 samples a bin side; others take the general
    walk), for a 6 x 9 map and oh x ow bins at scale 1: adaptive grids of 14 / 15 rows and 17 / 18
    columns, both sides over the limit, grids of 5 to 14 samples whose windows the general walk
    narrows, ordinary, degenerate and NaN boxes, and an infinite one (a grid of 2^62: general)."""
    rows, cols = 14 * oh, 17 * ow
    return torch.tensor(
        [
            [1, 1.0, -10.0, 5.0, -10.0 + rows],  # 14 rows: plain
            [1, 1.0, -10.0, 5.0, -10.0 + rows + 0.5],  # 15 rows: general
            [0, -20.0, 1.0, -20.0 + cols, 4.0],  # 17 columns: plain
            [1, -20.0, 1.0, -20.0 + cols + 0.25, 4.0],  # 18 columns: general
            [0, -30.0, -30.0, -29.5 + cols, -29.5 + rows],  # both general
            [1, -3.0, -3.0, -3.0 + 12 * ow, -3.0 + 8 * oh],  # 12 x 8: plain, windows narrowed
            [0, 1.0, 0.5, 7.3, 5.2],
            [1, 4.0, 3.0, 2.0, 3.0],
            [0, 1.0, float("nan"), 3.0, 4.0],
            [1, 1.0, 2.0, float("inf"), 4.0],
        ],
        dtype=dtype,
    )


def _plain_walk_fits(boxes, oh, ow, ratio, aligned, height, width) -> torch.Tensor:
    """roi_geometry's grids against PlainWalk's limit, per box."""
    sizes = boxes[:, 3:5] - boxes[:, 1:3]  # the offset of `aligned` cancels here
    if not aligned:
        sizes = sizes.clamp(min=1)
    if ratio > 0:
        grids = torch.full_like(sizes, ratio)
    else:
        grids = torch.ceil(sizes / torch.tensor([ow, oh], dtype=sizes.dtype)).nan_to_num(0)
    return (grids <= torch.tensor([width + 8, height + 8], dtype=sizes.dtype)).all(dim=1)


@pytest.mark.parametrize("impl", impl_params("emulated"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [-1, 14, 15])
def test_plain_and_general_walks_give_the_cpus_bits(impl, dtype, aligned, ratio):
    # The forward: every output is computed alone, so the emulated CUDA kernels (plain walk for
    # some boxes, general for others) give the CPU kernel's bits (general walk) and torchvision's.
    x = _map(20, (2, 3, 6, 9), dtype)
    boxes = _plain_edge_boxes(2, 3, dtype)
    plain = _plain_walk_fits(boxes, 2, 3, ratio, aligned, 6, 9)
    assert {-1: plain.any() and not plain.all(), 14: plain.all(), 15: not plain.any()}[ratio]
    args = (1.0, 2, 3, ratio, aligned)
    out = impl.call("roi_align", x, boxes, *args)
    cpu = torch.ops.mlkernels.roi_align(x, boxes, *args)
    torch.testing.assert_close(out, cpu, rtol=0, atol=0, equal_nan=True)  # to the bit
    # torchvision: finite boxes, but not a zero height past the limit (the general walk
    # collapses its equal positions into one sample of weight 15: for_each_sample's runs)
    same = boxes.isfinite().all(dim=1) & (plain | (boxes[:, 4] != boxes[:, 2]))
    expected = torchvision.ops.roi_align(x, boxes[same], (2, 3), 1.0, ratio, aligned)
    assert torch.equal(out[same], expected)
    # The atomic input gradient: with one bin and one RoI a call, each pixel of a channel gets its
    # one term from one thread, the product of the bin's two axis sums (for_each_bin_pixel), as
    # the CPU kernel computes it, with either walk: the CPU's bits.
    boxes = _plain_edge_boxes(1, 1, dtype)
    plain = _plain_walk_fits(boxes, 1, 1, ratio, aligned, 6, 9)
    assert {-1: plain.any() and not plain.all(), 14: plain.all(), 15: not plain.any()}[ratio]
    args = (1.0, 1, 1, ratio, aligned)
    grad = _map(21, (1, 3, 1, 1), dtype)
    with deterministic_algorithms(False):
        for box in boxes:
            cpu = torch.ops.mlkernels.roi_align_backward(grad, x, box[None], *args)
            for mask in ([True, False], [True, True]):  # the atomic kernels; the fused pass
                got = impl.call("roi_align_backward", grad, x, box[None], *args, mask)
                assert torch.equal(got[0], cpu[0])


def _box_axis(lo: float, hi: float, bins: int, extent: int, ratio: int, aligned: bool):
    """For each bin along one axis of a box from lo to hi: its bounds, its valid samples, and the
    map pixels their corners fall on (positions as torchvision computes them, here in float64;
    sizes, grids and clamps as its kernels take them)."""
    size = hi - lo if aligned else max(hi - lo, 1.0)
    grid = ratio if ratio > 0 else math.ceil(size / bins)
    start = lo - (0.5 if aligned else 0.0)
    bounds, valid, pixels = [], [], []
    for b in range(bins):
        base, bin_size = start + b * size / bins, size / bins
        at = [base + (i + 0.5) * bin_size / grid for i in range(grid)]
        on_map = [v for v in at if -1 <= v <= extent]
        corners = set()
        for v in on_map:
            low = int(max(v, 0.0))
            corners |= {extent - 1} if low >= extent - 1 else {low, low + 1}
        bounds.append((base, base + bin_size))
        valid.append(len(on_map))
        pixels.append(len(corners))
    return bounds, valid, pixels


# Boxes for the emulator's counts of the input gradient's work, on a 6 x 9 map.
_COUNT_BOXES = torch.tensor(
    [
        [0, 2.0, 1.0, 4.0, 2.0],  # bins under a pixel: their samples share corners
        [0, 0.3, 0.2, 5.7, 5.1],
        [0, -2.5, 3.1, 3.2, 8.0],  # partly outside the map: clamped and invalid samples
        [0, 7.2, -1.8, 12.0, 1.4],
        [0, 1.0, 1.0, 8.9, 5.9],  # bins over a pixel: few shared corners
    ],
    dtype=torch.float64,
)


@pytest.mark.parametrize("impl", impl_params("emulated"))
@pytest.mark.parametrize(("ratio", "aligned"), [(2, False), (-1, False), (3, True)])
def test_atomic_input_gradient_adds_once_a_pixel_a_bin(impl, ratio, aligned):
    # The plain atomic kernels (input gradient alone, and the fused pass) make one atomic addition
    # for each pixel a bin's samples' corners fall on (add_bin_input_grad), where torchvision
    # makes one for each corner of each valid sample; counted by the emulator, which counts every
    # atomic_add, against a count from the sample positions here. The gradient is the CPU's.
    channels, oh, ow, height, width = 2, 2, 3, 6, 9
    x = _map(24, (1, channels, height, width))
    boxes = _COUNT_BOXES
    corner_adds = pixel_adds = 0
    for _, x1, y1, x2, y2 in boxes.tolist():
        _, valid_y, pixels_y = _box_axis(y1, y2, oh, height, ratio, aligned)
        _, valid_x, pixels_x = _box_axis(x1, x2, ow, width, ratio, aligned)
        corner_adds += sum(4 * a * b for a in valid_y for b in valid_x)
        pixel_adds += sum(a * b for a in pixels_y for b in pixels_x)
    assert 0 < pixel_adds < corner_adds
    adds = torch.ops.mlkernels_emulated.atomic_adds
    grad = _map(25, (len(boxes), channels, oh, ow))
    args = (grad, x, boxes, 1.0, oh, ow, ratio, aligned)
    cpu = torch.ops.mlkernels.roi_align_backward(*args)
    with deterministic_algorithms(False):
        for mask in ([True, False], [True, True]):
            before = adds()
            got = impl.call("roi_align_backward", *args, mask)
            assert adds() - before == channels * pixel_adds
            torch.testing.assert_close(got[0], cpu[0])


@pytest.mark.parametrize("impl", impl_params("emulated"))
@pytest.mark.parametrize(("ratio", "aligned"), [(2, False), (-1, False), (3, True)])
def test_deterministic_rows_walk_only_the_bins_on_their_row(impl, ratio, aligned):
    # The deterministic kernel's thread of row r walks a bin's columns only where the bin has a
    # corner on r: as many column walks as the atomic kernel, which walks a bin's columns once for
    # each row it touches. It walks a bin row's y axis once for each row within two of the bin row
    # (more would be every row of the map for every bin). Counted by the emulator
    # (roi_align_axis_walks: [row walks, column walks]) against counts from the sample positions.
    channels, oh, ow, height, width = 3, 2, 3, 6, 9
    x = _map(28, (1, channels, height, width))
    boxes = _COUNT_BOXES
    bins = column_walks = near_rows = 0
    for _, _, y1, _, y2 in boxes.tolist():
        bounds_y, _, pixels_y = _box_axis(y1, y2, oh, height, ratio, aligned)
        bins += oh * ow
        column_walks += ow * sum(pixels_y)
        for low, high in bounds_y:
            near_rows += sum(low - 2.001 <= r <= high + 2.001 for r in range(height))
    walks = torch.ops.mlkernels_emulated.roi_align_axis_walks
    grad = _map(29, (len(boxes), channels, oh, ow))
    args = (grad, x, boxes, 1.0, oh, ow, ratio, aligned, [True, False])
    counts = {}
    for deterministic in (False, True):
        with deterministic_algorithms(deterministic):
            before = walks()
            impl.call("roi_align_backward", *args)
            counts[deterministic] = [b - a for a, b in zip(before, walks(), strict=True)]
    assert counts[False] == [channels * bins, channels * column_walks]
    rows, columns = counts[True]
    assert columns == channels * column_walks
    assert rows <= channels * near_rows < channels * bins * height


@ALL_IMPLS
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [-1, 2, 15])
@pytest.mark.parametrize("deterministic", [False, True])
def test_input_gradient_is_the_forwards_adjoint(impl, aligned, ratio, deterministic):
    # roi_align is linear in the map, so its input gradient is the forward's adjoint:
    # <roi_align(x), g> = <x, grad_input(g)>. The forward walks samples, the input gradient a
    # bin's pixels with summed axis weights (for_each_bin_pixel), both walks, runs of equal
    # positions collapsed on either side (a zero-height box at ratio 15, a box of 10^9): this ties
    # the two together on every path (atomic, fused, deterministic rows) and device.
    x = _map(26, (2, 3, 6, 9)).to(impl.device)
    edge = _plain_edge_boxes(2, 3, torch.float64)
    huge = torch.tensor([[0, -1e9, -1e9, 1e9, 1e9], [1, 2.0, 3.5, 2.0, 3.5]], dtype=torch.float64)
    boxes = torch.cat([edge[edge[:, 1:].isnan().any(dim=1).logical_not()], huge]).to(impl.device)
    args = (1.0, 2, 3, ratio, aligned)
    out = impl.call("roi_align", x, boxes, *args)
    grad = _map(27, tuple(out.shape)).to(impl.device)
    with deterministic_algorithms(deterministic):
        for mask in ([True, False], [True, True]):
            gi = impl.call("roi_align_backward", grad, x, boxes, *args, mask)[0]
            torch.testing.assert_close((x * gi).sum(), (out * grad).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("impl", impl_params("emulated"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio", [-1, 2])
def test_deterministic_rows_of_plain_and_general_images_are_the_cpus(impl, dtype, ratio):
    # The deterministic input gradient's two launches: the plain row kernel does the images whose
    # RoIs all fit the plain walk, and marks the others, whose rows the general kernel redoes from
    # zero. Images 0 and 1 get the edge boxes (ratio -1: some general), image 2 only plain ones;
    # every row is the CPU kernel's to the bit either way.
    x = _map(22, (3, 4, 6, 9), dtype)
    edge = _plain_edge_boxes(2, 3, dtype)
    plain_only = edge[_plain_walk_fits(edge, 2, 3, ratio, False, 6, 9)].clone()
    plain_only[:, 0] = 2
    boxes = torch.cat([edge, plain_only])
    assert (boxes[:, 0] == 2).any()
    if ratio == -1:
        assert not _plain_walk_fits(edge, 2, 3, ratio, False, 6, 9).all()
    grad = _map(23, (len(boxes), 4, 2, 3), dtype)
    args = (grad, x, boxes, 1.0, 2, 3, ratio, False)
    with deterministic_algorithms(True):
        ordered = impl.call("roi_align_backward", *args)
    cpu = torch.ops.mlkernels.roi_align_backward(*args)
    torch.testing.assert_close(ordered[0], cpu[0], rtol=0, atol=0, equal_nan=True)  # to the bit
    assert ordered[0][2].abs().sum() > 0  # image 2's rows: the plain kernel's


@pytest.mark.parametrize("impl", impl_params("emulated"))
@pytest.mark.parametrize(
    ("channels", "oh", "ow"),
    [(130, 3, 3), (1400, 7, 7)],  # 5 chunks of 256 outputs a RoI; 268 (more than 256 threads)
)
def test_backward_paths_agree(impl, channels, oh, ow):
    # Each output mask takes its own kernels (input only: the atomic kernels; box only: the plain
    # chunks and BoxGradBlock; both: the fused pass; deterministic: the row kernel and the box
    # kernels). The box gradient is the same tree sums in all of them: the same bits. (float64:
    # 68,600 terms a RoI summed in another order than the CPU's can differ by more than float32's
    # default tolerance)
    x = _map(30, (2, channels, 7, 6), torch.float64)
    rois = torch.cat(
        [_rois(30, 6, 2, 7, 6, "outside", torch.float64), _plain_edge_boxes(oh, ow, torch.float64)]
    )
    grad = _map(31, (rois.shape[0], channels, oh, ow), torch.float64)
    args = (grad, x, rois, 1.0, oh, ow, -1, False)
    with deterministic_algorithms(False):
        input_only = impl.call("roi_align_backward", *args, [True, False])
        boxes_only = impl.call("roi_align_backward", *args, [False, True])
        both = impl.call("roi_align_backward", *args, [True, True])
    with deterministic_algorithms(True):
        ordered = impl.call("roi_align_backward", *args, [True, True])
    cpu = torch.ops.mlkernels.roi_align_backward(*args)
    for got in (input_only[0], both[0], ordered[0]):
        torch.testing.assert_close(got, cpu[0])
    for got in (both[1], ordered[1]):
        torch.testing.assert_close(got, boxes_only[1], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(boxes_only[1], cpu[1], equal_nan=True)
    assert boxes_only[1].isnan().any() and boxes_only[1].nan_to_num().abs().sum() > 0


# ---- CUDA (skipped without a GPU) ----


@pytest.mark.parametrize("impl", impl_params("cuda"))
@pytest.mark.parametrize("deterministic", [False, True])
def test_large_inputs_match_cpu(impl, deterministic):
    x = _map(16, (2, 32, 20, 24), torch.float32)
    rois = _rois(16, 64, 2, 80, 96, "outside", torch.float32)
    grad = _map(17, (64, 32, 7, 7), torch.float32)
    expected = ops.roi_align(x, rois, 7, 0.25, 2)
    torch.testing.assert_close(ops.roi_align(*impl.to(x, rois), 7, 0.25, 2).cpu(), expected)
    args = (grad, x, rois, 0.25, 7, 7, 2, False)
    with deterministic_algorithms(deterministic):
        got = impl.call("roi_align_backward", *args)
    cpu = torch.ops.mlkernels.roi_align_backward(*args)
    for a, b in zip(got, cpu, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if deterministic:  # the promise of use_deterministic_algorithms: bitwise, run to run
        with deterministic_algorithms(True):
            again = impl.call("roi_align_backward", *args)
        for a, b in zip(got, again, strict=True):
            assert torch.equal(a, b)
