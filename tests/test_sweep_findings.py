"""Regression tests for what a hostile sweep of the public ops found (issue 7), one test or more
per finding, plus the op-pattern properties that came with it: gradients only where asked,
autocast at the dispatcher, second derivatives that raise, symbolic shapes under torch.compile."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import ALL_IMPLS

import mlkernels
from mlkernels import nn, ops, reference

emulated = torch.ops.mlkernels_emulated


def _run_isolated(code: str, timeout: float = 120.0) -> str:
    """Runs ``code`` in a fresh interpreter (a hang fails the test instead of the whole suite)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# ---- hangs: boxes far larger than the map, huge sampling ratios ----


@pytest.mark.parametrize(
    "dtype, half, scale",
    [("float32", 1e12, 1.0), ("float64", 1e15, 1.0), ("float32", 20.0, 1e27)],
)
def test_roi_align_huge_adaptive_boxes_return_quickly(dtype, half, scale):
    # Before: adaptive sampling of such a box, centred on the map, ran for minutes or forever in
    # forward, backward and emulated kernels. Now the loops visit only samples that can reach the
    # map, and equal computed positions once.
    out = _run_isolated(
        f"""
        import torch, mlkernels
        from mlkernels import ops
        dtype = torch.{dtype}
        x = torch.rand(1, 3, 12, 10, dtype=dtype, requires_grad=True)
        b = torch.tensor([[0, -{half}, -{half}, {half}, {half}]], dtype=dtype, requires_grad=True)
        y = ops.roi_align(x, b, 3, spatial_scale={scale}, sampling_ratio=0)
        y.sum().backward()
        e = torch.ops.mlkernels_emulated.roi_align(x.detach(), b.detach(), {scale}, 3, 3, 0, False)
        gi, gb = torch.ops.mlkernels_emulated.roi_align_backward(
            torch.ones_like(y), x.detach(), b.detach(), {scale}, 3, 3, 0, False)
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), (y, x.grad)
        assert torch.isfinite(b.grad).all(), b.grad
        torch.testing.assert_close(e, y.detach(), rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(gi, x.grad, rtol=1e-5, atol=1e-12)
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_roi_align_ordinary_boxes_unchanged_by_run_compression():
    # A box a few times the map, adaptive: its window is wider than the map, so the run search is
    # on, but every computed position is distinct and the result is torchvision's to the bit.
    import torchvision

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 9, 11, generator=g)
    boxes = torch.tensor([[0, -30.0, -25.0, 41.0, 37.0], [1, 0.5, 0.25, 3.0, 2.0]])
    for ratio in (0, 64):
        ours = ops.roi_align(x, boxes, (3, 4), 1.0, ratio)
        theirs = torchvision.ops.roi_align(x, boxes, (3, 4), 1.0, ratio)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("ratio", [2**31, 100_000, 1025])
def test_roi_align_rejects_huge_sampling_ratio(ratio):
    x, b = torch.rand(1, 1, 4, 4), torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]])
    message = r"roi_align: sampling_ratio must be at most 1024 \(samples per bin each way"
    with pytest.raises(ValueError, match=message):
        ops.roi_align(x, b, 2, 1.0, ratio)
    with pytest.raises(ValueError, match=message):
        torch.ops.mlkernels.roi_align(x, b, 1.0, 2, 2, ratio, False)
    with pytest.raises(ValueError, match=message):
        emulated.roi_align(x, b, 1.0, 2, 2, ratio, False)


def test_roi_align_box_gradient_at_width_exactly_one_follows_torch_clamp():
    # Without `aligned`, a width (height) of exactly 1 is at the clamp: like torch.clamp(min=1),
    # no gradient passes through it; kernel, emulator and reference agree.
    x = torch.rand(1, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for row in ([0, 2.0, 2.0, 3.0, 5.5], [0, 2.25, 1.0, 5.0, 2.0], [0, 1.5, 1.5, 2.5, 2.5]):
        b = torch.tensor([row], dtype=torch.float64, requires_grad=True)
        for ratio in (2, 0):
            want = torch.autograd.grad(reference.roi_align(x, b, 2, 1.0, ratio).sum(), b)[0]
            got = torch.autograd.grad(ops.roi_align(x, b, 2, 1.0, ratio).sum(), b)[0]
            grad = torch.ones(1, 2, 2, 2, dtype=torch.float64)
            emu = emulated.roi_align_backward(grad, x, b.detach(), 1.0, 2, 2, ratio, False)[1]
            torch.testing.assert_close(got[:, 1:], want[:, 1:])
            torch.testing.assert_close(emu[:, 1:], want[:, 1:])


def test_clamped_coordinates_pass_no_gradient_even_through_infinite_values():
    # A width clamped to 1 and sample coordinates clamped to the border pass no box gradient;
    # with an infinite map value that must stay 0 (the reference's), not 0 * inf = NaN.
    x = torch.rand(1, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[0, 0, 0, 0] = float("inf")
    b = torch.tensor([[0, -0.5, -0.25, 0.0, 0.25]], dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(reference.roi_align(x, b, 1, 1.0, 2).sum(), b)[0]
    got = torch.autograd.grad(ops.roi_align(x, b, 1, 1.0, 2).sum(), b)[0]
    emu = emulated.roi_align_backward(
        torch.ones(1, 1, 1, 1, dtype=torch.float64), x, b.detach(), 1.0, 1, 1, 2, False
    )[1]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(emu, want)


def test_decode_and_propose_gradients_at_the_clamp_follow_torch_clamp():
    # dw exactly at `clamp`, and a proposal coordinate exactly on the image border: torch.clamp
    # passes no gradient at equality, so neither do the kernels.
    deltas = torch.tensor([[0.1, 0.2, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    got = torch.autograd.grad(ops.decode_boxes(deltas, anchors, clamp=2.0).sum(), deltas)[0]
    want = torch.autograd.grad(reference.decode_boxes(deltas, anchors, clamp=2.0).sum(), deltas)[0]
    torch.testing.assert_close(got, want)
    assert got[0, 2] == 0

    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)  # x1 = y1 = 0: border
    deltas = torch.zeros(1, 1, 4, dtype=torch.float64, requires_grad=True)
    objectness = torch.zeros(1, 1, dtype=torch.float64)
    got = torch.autograd.grad(ops.propose(anchors, deltas, objectness, [(10, 10)])[0].sum(), deltas)
    want = torch.autograd.grad(
        reference.propose(anchors, deltas, objectness, [(10, 10)])[0].sum(), deltas
    )
    torch.testing.assert_close(got[0], want[0])


# ---- second derivatives raise for every backward ----


def test_second_derivatives_raise_for_every_differentiable_op():
    deltas = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 5, dtype=torch.float64)
    (g,) = torch.autograd.grad(ops.decode_boxes(deltas, anchors).sum(), deltas, create_graph=True)
    with pytest.raises(RuntimeError, match="decode_boxes: second derivatives"):
        g.sum().backward()

    anchors = ops.generate_anchors((3, 3), 16, (32,), (1.0,), dtype=torch.float64)
    deltas = torch.zeros(1, anchors.shape[0], 4, dtype=torch.float64, requires_grad=True)
    objectness = torch.randn(1, anchors.shape[0], dtype=torch.float64)
    boxes, _, _ = ops.propose(anchors, deltas, objectness, [(48, 48)], post_nms_top_n=4)
    (g,) = torch.autograd.grad(boxes.sum(), deltas, create_graph=True)
    with pytest.raises(RuntimeError, match="propose: second derivatives"):
        g.sum().backward()

    x = torch.rand(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0, 0.5, 0.5, 3.5, 3.0]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(ops.roi_align(x, b, 2, 1.0, 2).sum(), b, create_graph=True)
    with pytest.raises(RuntimeError, match="roi_align: second derivatives"):
        g.sum().backward()


# ---- propose_backward with a repeated anchor: summed, the same on CPU and emulator ----


def test_propose_backward_sums_repeated_kept_anchors():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 30.0], [1, 2, 8, 9.0]])
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(2, 3, 4, generator=g) * 0.1
    sizes = torch.tensor([[40.0, 40.0], [40.0, 40.0]])
    kept = torch.tensor([[1, 1, 0, -1, 1], [2, -1, 2, 2, 0]])
    grad = torch.randn(2, 5, 4, generator=g)
    w, clamp = [1.0] * 4, 4.0
    got = torch.ops.mlkernels.propose_backward(grad, anchors, deltas, kept, sizes, w, clamp)
    emu = emulated.propose_backward(grad, anchors, deltas, kept, sizes, w, clamp)
    # Autograd of the per-row decode + clip, rows summed: what repeated rows must give.
    d = deltas.clone().requires_grad_()
    a = anchors.clone().requires_grad_()
    rows = []
    for image in range(2):
        for row in range(5):
            anchor = int(kept[image, row])
            if anchor < 0:
                rows.append(torch.zeros(4))
                continue
            box = reference.decode_boxes(d[image, anchor], a[anchor], w, clamp)
            rows.append(torch.stack([c.clamp(0, 40) for c in box.unbind()]))
    torch.autograd.backward(torch.stack(rows).view(2, 5, 4), grad)
    for ours in (got, emu):
        torch.testing.assert_close(ours[0], d.grad)
        torch.testing.assert_close(ours[1], a.grad)
    again = torch.ops.mlkernels.propose_backward(grad, anchors, deltas, kept, sizes, w, clamp)
    assert all(torch.equal(x, y) for x, y in zip(got, again, strict=True))


# ---- gradients only where asked ----


@pytest.mark.parametrize("runner", ["cpu", "emulated"])
def test_backward_ops_compute_only_the_gradients_asked_for(runner):
    ops_ns = torch.ops.mlkernels if runner == "cpu" else emulated
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 6, 7, generator=g, dtype=torch.float64)
    b = torch.tensor([[0, 0.5, 1.0, 4.0, 5.5], [1, 2.0, 0.0, 6.5, 3.0]], dtype=torch.float64)
    grad = torch.rand(2, 3, 2, 2, generator=g, dtype=torch.float64)
    full = ops_ns.roi_align_backward(grad, x, b, 1.0, 2, 2, 2, False)
    for mask in ([True, False], [False, True], [False, False]):
        part = ops_ns.roi_align_backward(grad, x, b, 1.0, 2, 2, 2, False, mask)
        for wanted, got, want in zip(mask, part, full, strict=True):
            if wanted:
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            else:
                assert got.shape == (0,)

    deltas = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 12.0]] * 5, dtype=torch.float64)
    grad = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    full = ops_ns.decode_boxes_backward(grad, deltas, anchors, [1.0] * 4, 4.0)
    only = ops_ns.decode_boxes_backward(grad, deltas, anchors, [1.0] * 4, 4.0, [True, False])
    torch.testing.assert_close(only[0], full[0], rtol=0, atol=0)
    assert only[1].shape == (0,)


def test_autograd_asks_only_for_what_requires_grad():
    x = torch.rand(1, 2, 5, 5, requires_grad=True)
    b = torch.tensor([[0, 0.5, 0.5, 3.5, 3.0]])
    ops.roi_align(x, b, 2, 1.0, 2).sum().backward()  # boxes need no gradient: none computed
    assert b.grad is None and x.grad is not None
    deltas = torch.randn(4, 4, requires_grad=True)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 12.0]] * 4, requires_grad=False)
    ops.decode_boxes(deltas, anchors).sum().backward()
    assert deltas.grad is not None and anchors.grad is None


# ---- autocast at the dispatcher ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_raw_op_under_autocast_matches_the_float32_computation(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 4, 8, 8, generator=g).to(dtype)
    b = torch.tensor([[0, 0.5, 1.0, 6.0, 7.5]])  # float32 boxes with a half map: autocast mixes
    with torch.autocast("cpu", dtype=dtype):
        got = torch.ops.mlkernels.roi_align(x, b, 1.0, 3, 3, 2, False)
    want = torch.ops.mlkernels.roi_align(x.float(), b, 1.0, 3, 3, 2, False).to(dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- fake kernels with symbolic shapes ----


def test_roi_align_compiles_with_dynamic_shapes():
    def fn(x, b):
        return ops.roi_align(x, b, 2, 0.5, 2) * 2

    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    for n, k in ((1, 3), (2, 5)):
        x = torch.rand(n, 3, 6 + n, 7)
        b = torch.cat([torch.zeros(k, 1), torch.rand(k, 2) * 4, torch.rand(k, 2) * 4 + 5], 1)
        torch.testing.assert_close(compiled(x, b), fn(x, b))


# ---- messages that name the op and the argument ----


def test_propose_huge_post_nms_top_n_is_refused_by_name():
    anchors = ops.generate_anchors((2, 2), 16, (32,), (1.0,))
    deltas, objectness = torch.zeros(1, 4, 4), torch.zeros(1, 4)
    message = r"propose: post_nms_top_n must be at most 16777216"
    with pytest.raises(ValueError, match=message):
        ops.propose(
            anchors,
            deltas,
            objectness,
            [(32, 32)],
            post_nms_top_n=2**63 - 1,
            append_whole_image=True,
        )
    with pytest.raises(ValueError, match=message):
        torch.ops.mlkernels.propose(
            anchors,
            deltas,
            objectness,
            torch.tensor([[32.0, 32.0]]),
            10,
            2**40,
            0.7,
            0.0,
            0.0,
            [1.0] * 4,
            4.0,
            True,
        )


def test_proposal_layer_on_an_empty_batch():
    layer = nn.ProposalLayer(4, (32,), (1.0,), hidden=8, post_nms_top_n=5)
    out = layer(torch.zeros(0, 4, 3, 3), torch.zeros(0, 2))
    assert out.boxes.shape == (0, 5, 4) and out.counts.shape == (0,)
    with pytest.raises(ValueError, match=r"ProposalLayer: features must be Tensor\[N, C, H, W\]"):
        layer(torch.zeros(4, 3, 3), torch.zeros(1, 2))


def test_propose_image_sizes_beyond_the_boxes_dtype_are_reported_as_given():
    anchors = ops.generate_anchors((2, 2), 16, (32,), (1.0,))
    deltas, objectness = torch.zeros(1, 4, 4), torch.zeros(1, 4)
    with pytest.raises(
        ValueError,
        match=r"propose: image_sizes must be finite, >= 0 and at most "
        r"the largest float32 .*got \(1e\+40, 32\) for image 0",
    ):
        ops.propose(anchors, deltas, objectness, [(1e40, 32)])


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: ops.nms(torch.zeros(1, 4), torch.zeros(1), None),
            "nms: iou_threshold must be a number, got None",
        ),
        (
            lambda: ops.batched_nms(
                torch.zeros(1, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long), "0.5"
            ),
            "batched_nms: iou_threshold must be a number, got '0.5'",
        ),
        (
            lambda: ops.decode_boxes(torch.zeros(1, 4), torch.ones(1, 4), clamp=None),
            "decode_boxes: clamp must be a number, got None",
        ),
        (
            lambda: ops.encode_boxes(torch.ones(1, 4), torch.ones(1, 4), weights="1111"),
            "encode_boxes: weights must be a sequence of numbers, got '1111'",
        ),
        (
            lambda: ops.roi_align(torch.zeros(1, 1, 2, 2), torch.zeros(1, 5), 2, None),
            "roi_align: spatial_scale must be a number, got None",
        ),
        (
            lambda: ops.roi_align(torch.zeros(1, 1, 2, 2), torch.zeros(1, 5), 2, 1.0, "2"),
            "roi_align: sampling_ratio must be an int, got '2'",
        ),
        (
            lambda: ops.propose(
                torch.zeros(0, 4),
                torch.zeros(1, 0, 4),
                torch.zeros(1, 0),
                [(1, 1)],
                pre_nms_top_n=None,
            ),
            "propose: pre_nms_top_n must be an int, got None",
        ),
        (
            lambda: ops.propose(
                torch.zeros(0, 4),
                torch.zeros(1, 0, 4),
                torch.zeros(1, 0),
                [(1, 1)],
                nms_threshold=0.5,
            ),
            r"propose: unknown setting\(s\) \['nms_threshold'\]",
        ),
    ],
)
def test_wrong_python_types_are_named(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def test_roi_align_output_too_large_to_allocate_is_named():
    x, b = torch.zeros(1, 1, 2, 2), torch.zeros(1, 5)
    with pytest.raises(
        RuntimeError, match=r"roi_align: the output Tensor\[1, 1, 1000000, 1000000\]"
    ):
        ops.roi_align(x, b, 10**6)


def test_registration_is_written_once():
    # Each family lists its ops once (register_<family> in <family>_kernels.h); the CPU, CUDA and
    # emulated registrations are that template over their runner, nothing else.
    import re
    from pathlib import Path

    root = Path(mlkernels.__file__).resolve().parent.parent / "csrc"
    if not root.is_dir():
        pytest.skip("no source tree (installed package)")
    families = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "common")
    assert families == ["attention", "beam_search", "boxes", "proposals", "roi_align"]
    for family in families:
        folder = root / family
        assert (folder / f"{family}_kernels.h").read_text().count("m.impl(") >= 1
        for name, runner in (
            ("cpu.cpp", "CpuParallelRunner"),
            ("cuda.cu", "CudaRunner"),
            ("emulated.cpp", "EmulatorRunner"),
        ):
            text = (folder / f"{family}_{name}").read_text()
            assert "m.impl(" not in text, f"{family}_{name} registers ops by hand"
            pattern = rf"register_{family}<mlk::{family}::Kernels<mlk::{runner}>>\(m\);"
            assert len(re.findall(pattern, text)) == 1, f"{family}_{name}"


@ALL_IMPLS
def test_roi_align_backward_of_an_empty_huge_map(impl):
    # The sweep: an expanded input with 2**40 images and width 0 made the CPU backward size its
    # per-image arrays by the image count (std::bad_alloc). An empty map takes no samples.
    x = torch.zeros(1, 3, 6, 0).expand(2**40, 3, 6, 0)
    rois = torch.tensor([[0.0, 1, 1, 4, 4], [1.0, 0, 0, 2, 2]])
    grad = torch.ones(2, 3, 2, 3)
    grad_input, grad_boxes = impl.call("roi_align_backward", grad, x, rois, 0.5, 2, 3, 1, False)
    assert grad_input.shape == x.shape and grad_boxes.shape == rois.shape
    assert not grad_boxes.any()


def test_box_iou_fake_names_the_op_when_the_output_cannot_exist():
    # The sweep: meta boxes of 2**40 rows each make an IoU matrix whose size overflows; the fake
    # kernel must fail as the C++ one does, naming the op.
    boxes = torch.zeros(1, 4, device="meta").expand(2**40, 4)
    with pytest.raises(RuntimeError, match=r"box_iou: the output Tensor\[1099511627776, "):
        ops.box_iou(boxes, boxes)


@pytest.mark.parametrize("backward", [False, True])
def test_attention_head_too_wide_for_a_buffer_is_named(backward):
    # The sweep: query and key expanded (stride 0) to E = 2**40 made the CPU kernel size its
    # per-thread copies of a head's keys by E (a bare std::bad_alloc, MemoryError in Python).
    q = torch.randn(1, 1, 3, 1).expand(1, 1, 3, 2**40)
    k = torch.randn(1, 1, 4, 1).expand(1, 1, 4, 2**40)
    v = torch.randn(1, 1, 4, 2)
    raw = torch.ops.mlkernels
    op = "scaled_dot_product_attention_backward" if backward else "scaled_dot_product_attention"
    with pytest.raises(RuntimeError, match=rf"{op}: a buffer of \d+ elements for one head"):
        if backward:
            out, lse = torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3)
            # Only dV: the other gradients are outputs of that width themselves.
            raw.scaled_dot_product_attention_backward(
                torch.ones(1, 1, 3, 2),
                q,
                k,
                v,
                None,
                out,
                lse,
                0.5,
                False,
                [False, False, True, False],
            )
        else:
            raw.scaled_dot_product_attention(q, k, v, None, 0.5, False)
