"""The raw attention ops on every implementation (CPU, the CUDA kernels on the grid emulator, CUDA):
the emulator and CUDA against the CPU kernels (within tolerance: they add in other orders), the
CPU kernel's tiling at several thread counts, the CUDA kernels' tiling, output masks, opcheck,
determinism, autograd edges.
The public function's contract is tested in test_attention.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import ALL_IMPLS, DEVICE_IMPLS, run_opcheck
from hypothesis import given
from hypothesis import strategies as st

from mlkernels import ops, reference

OP = "scaled_dot_product_attention"


def _inputs(seed, b, h, lq, lk, e, ev, bias_shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    q, k, v = rand(b, h, lq, e), rand(b, h, lk, e), rand(b, h, lk, ev)
    bias = None
    if bias_shape is not None:
        bias = rand(*bias_shape)
        if bias.numel():
            bias.view(-1)[:: max(1, bias.numel() // 5)] = -math.inf  # some masked entries
    return q, k, v, bias


bias_shapes = st.sampled_from(["none", "full", "2d", "key", "head"])


def _bias_shape(kind, b, h, lq, lk):
    return {
        "none": None,
        "full": (b, h, lq, lk),
        "2d": (1, 1, lq, lk),
        "key": (b, 1, 1, lk),
        "head": (1, h, lq, 1),
    }[kind]


@ALL_IMPLS
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    lq=st.integers(0, 9),
    lk=st.integers(0, 9),
    e=st.integers(1, 7),
    ev=st.integers(1, 5),
    kind=bias_shapes,
    causal=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_raw_ops_match_cpu_and_reference(impl, seed, b, h, lq, lk, e, ev, kind, causal, dtype):
    """Forward and backward of every implementation: the CPU kernels' values and the
    reference's."""
    shape = _bias_shape(kind, b, h, lq, lk)
    q, k, v, bias = _inputs(seed, b, h, lq, lk, e, ev, shape, dtype)
    causal = causal and bias is None
    scale = 0.7
    out, lse = impl.call(OP, q, k, v, bias, scale, causal)
    # The CPU kernels (BLAS products, vectorized rows) and the CUDA ones (tiles, or a thread per
    # row) add in different orders: the same values within the dtype's tolerance, not bitwise.
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    cpu_out, cpu_lse = torch.ops.mlkernels.scaled_dot_product_attention(
        q, k, v, bias, scale, causal
    )
    torch.testing.assert_close(out, cpu_out, **tol)
    torch.testing.assert_close(lse, cpu_lse, **tol)
    expected, expected_lse = reference.scaled_dot_product_attention(
        q,
        k,
        v,
        None if bias is None else bias.squeeze(0).squeeze(0) if kind == "2d" else bias,
        is_causal=causal,
        scale=scale,
        return_lse=True,
    )
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(lse.float(), expected_lse, **tol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    args = (grad, q, k, v, bias, out, lse, scale, causal)
    grads = impl.call(f"{OP}_backward", *args)
    cpu_grads = torch.ops.mlkernels.scaled_dot_product_attention_backward(*args)
    for got, want in zip(grads, cpu_grads, strict=True):
        torch.testing.assert_close(got, want, **tol)
    # Each gradient alone equals the same gradient computed with the others.
    for i in range(4):
        mask = [j == i for j in range(4)]
        alone = impl.call(f"{OP}_backward", *args, mask)
        for j in range(4):
            if j == i and (j < 3 or bias is not None):
                assert torch.equal(alone[j], grads[j])
            else:
                assert alone[j].shape == (0,)


@pytest.mark.parametrize("kind", ["full", "2d", "key", "head"])
def test_gradcheck_with_broadcast_bias(kind):
    b, h, lq, lk = 2, 2, 4, 5
    q, k, v, bias = _inputs(3, b, h, lq, lk, 3, 2, _bias_shape(kind, b, h, lq, lk))
    bias = torch.randn_like(bias)  # no -inf: gradcheck perturbs every entry
    inputs = tuple(t.requires_grad_() for t in (q, k, v, bias))

    def fn(q, k, v, bias):
        return torch.ops.mlkernels.scaled_dot_product_attention(q, k, v, bias, 0.6, False)[0]

    assert torch.autograd.gradcheck(fn, inputs)


def test_backward_is_deterministic():
    """Run to run at a given thread count (a broadcast bias's gradient adds up per thread)."""
    q, k, v, bias = _inputs(4, 2, 4, 33, 47, 16, 8, (1, 1, 33, 47), torch.float32)
    inputs = [t.requires_grad_() for t in (q, k, v, bias)]

    def grads():
        out = ops.scaled_dot_product_attention(*inputs[:3], inputs[3][0, 0])
        return torch.autograd.grad(out.square().sum(), inputs)

    first = grads()
    for a, b in zip(first, grads(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "shape, kind, causal",
    [
        # One head, 3000 float64 keys: 21 query rows per tile, so the rows go in blocks of 17
        # (the last shorter), and the backward splits them in parts that add up key gradients.
        ((1, 1, 50, 3000, 8, 4), "2d", False),
        ((1, 1, 50, 3000, 8, 4), "head", True),
        ((1, 2, 50, 3000, 8, 4), "key", False),
        # Many small heads: several heads per tile, a bias shared between tiles.
        ((3, 5, 7, 9, 4, 3), "2d", True),
        ((3, 5, 7, 9, 4, 3), "full", False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_tiling_matches_reference(threads, shape, kind, causal, dtype):
    """The CPU kernel cuts the work by heads and query rows depending on the thread count and
    the sizes, and its products into register blocks (float32 with AVX-512: 6 rows x 64
    columns, then 4, 2 and 1 rows, and 16-column strips): every cut gives the reference's values
    (computed in float64 from the same inputs)."""
    b, h, lq, lk, e, ev = shape
    q, k, v, bias = _inputs(7, b, h, lq, lk, e, ev, _bias_shape(kind, b, h, lq, lk), dtype)
    grad = torch.randn(b, h, lq, ev, generator=torch.Generator().manual_seed(8)).to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for sdpa, cast in (
            (ops.scaled_dot_product_attention, dtype),
            (reference.scaled_dot_product_attention, torch.float64),
        ):
            inputs = [t.detach().to(cast).requires_grad_() for t in (q, k, v, bias)]
            mask = inputs[3] if not causal else None
            out = sdpa(*inputs[:3], mask, is_causal=causal)
            wanted = inputs if not causal else inputs[:3]
            results.append((out, *torch.autograd.grad(out, wanted, grad.to(cast))))
    finally:
        torch.set_num_threads(previous)
    # float32: sums of up to 3000 products, each gradient scaled by its largest entry.
    for ours, want in zip(*results, strict=True):
        if dtype == torch.float64:
            torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-12)
        else:
            scale = max(1.0, want.abs().max().item())
            torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-5 * scale)


_VARIANT_SCRIPT = """
import torch
from mlkernels import ops, reference

g = torch.Generator().manual_seed(3)
q, k, v = (torch.randn(2, 3, n, e, generator=g) for n, e in ((37, 64), (101, 64), (101, 40)))
bias = torch.randn(37, 101, generator=g)
grad = torch.randn(2, 3, 37, 40, generator=g)
results = []
for fn, dtype in ((ops.scaled_dot_product_attention, torch.float32),
                  (reference.scaled_dot_product_attention, torch.float64)):
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v, bias)]
    out = fn(*inputs)
    results.append((out, *torch.autograd.grad(out, inputs, grad.to(dtype))))
for ours, want in zip(*results):
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-5 * scale)
"""


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_cpu_product_variants(capability):
    """The CPU kernel's products are compiled for AVX-512, AVX2 and the baseline; the machine
    runs the best it has, MLKERNELS_CPU_CAPABILITY caps it: each variant against the reference
    (6 x 64 / 6 x 16 / 2 x 16 blocks, E = 64 and Ev = 40 padded)."""
    env = {**os.environ, "MLKERNELS_CPU_CAPABILITY": capability}
    result = subprocess.run(
        [sys.executable, "-c", _VARIANT_SCRIPT], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "shape",
    [
        (2, 2, 40, 70, 16, 8),  # 32 x 32 tiles: 2 query tiles, 3 key tiles, both partial
        (1, 3, 17, 9, 5, 3),  # 16-row query tiles and 16-key tiles, the last ones partial
        (1, 1, 3, 5, 700, 700),  # no tile fits in shared memory: one thread per row
    ],
)
@pytest.mark.parametrize("kind", ["none", "full", "2d", "key", "head"])
@pytest.mark.parametrize("causal", [False, True])
def test_emulated_tiles_match_cpu(shape, kind, causal):
    """The CUDA kernels' tiling (several tiles per head, partial last tiles, causal tiles
    skipped) and their fallback for heads too wide for shared memory, on the emulator."""
    b, h, lq, lk, e, ev = shape
    # float64: the kernels add in other orders, and E = 700 in float32 rounds past the default
    # tolerance; float32 tiles are in test_raw_ops_match_cpu_and_reference.
    q, k, v, bias = _inputs(11, b, h, lq, lk, e, ev, _bias_shape(kind, b, h, lq, lk))
    causal = causal and bias is None
    emulated = torch.ops.mlkernels_emulated
    args = (q, k, v, bias, 0.3, causal)
    out, lse = emulated.scaled_dot_product_attention(*args)
    cpu_out, cpu_lse = torch.ops.mlkernels.scaled_dot_product_attention(*args)
    torch.testing.assert_close(out, cpu_out)
    torch.testing.assert_close(lse, cpu_lse)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(12), dtype=out.dtype)
    backward_args = (grad, q, k, v, bias, out, lse, 0.3, causal)
    grads = emulated.scaled_dot_product_attention_backward(*backward_args)
    cpu_grads = torch.ops.mlkernels.scaled_dot_product_attention_backward(*backward_args)
    for got, want in zip(grads, cpu_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_double_backward_raises():
    q, k, v, _ = _inputs(5, 1, 1, 3, 3, 2, 2, None)
    q.requires_grad_()
    out = ops.scaled_dot_product_attention(q, k, v)
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        g.sum().backward()


def _opcheck_samples():
    q, k, v, bias = _inputs(6, 2, 2, 5, 6, 4, 3, (2, 1, 1, 6), torch.float32)
    grad = torch.randn(2, 2, 5, 3)
    yield OP, (q.requires_grad_(), k.requires_grad_(), v, bias.requires_grad_(), 0.5, False)
    yield OP, (q.detach(), k.detach(), v, None, 0.5, True)
    with torch.no_grad():
        out, lse = torch.ops.mlkernels.scaled_dot_product_attention(q, k, v, bias, 0.5, False)
    yield f"{OP}_backward", (grad, q.detach(), k.detach(), v, bias.detach(), out, lse, 0.5, False)


@DEVICE_IMPLS
@pytest.mark.parametrize(
    "name,args", list(_opcheck_samples()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_opcheck(impl, name, args):
    run_opcheck(impl, name, args)


@DEVICE_IMPLS
def test_wrapper_on_device_matches_reference(impl):
    q, k, v, bias = _inputs(7, 2, 3, 6, 9, 5, 4, (2, 1, 1, 9), torch.float32)
    bias = bias.requires_grad_()
    inputs = [t.requires_grad_() for t in (q, k, v)] + [bias]
    on_device = [impl.to(t.detach()).requires_grad_() for t in inputs]
    out = ops.scaled_dot_product_attention(*on_device)
    expected = reference.scaled_dot_product_attention(*inputs)
    torch.testing.assert_close(out.cpu(), expected)
    grads = torch.autograd.grad(out.square().sum(), on_device)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a.cpu(), b, equal_nan=True)


@ALL_IMPLS
def test_raw_op_bad_input(impl):
    q, k, v, _ = _inputs(8, 1, 2, 3, 4, 5, 6, None, torch.float32)
    call = impl.op(OP)
    with pytest.raises(RuntimeError, match=rf"{OP}: query must be Tensor\[B, H, Lq, E\], got"):
        call(q[0], k, v, None, 1.0, False)
    with pytest.raises(RuntimeError, match=rf"{OP}: key must be Tensor\[1, 2, Lk, 5\]"):
        call(q, k[..., :4], v, None, 1.0, False)
    with pytest.raises(RuntimeError, match=rf"{OP}: value must be Tensor\[1, 2, 4, Ev\]"):
        call(q, k, v[:, :, :3], None, 1.0, False)
    with pytest.raises(RuntimeError, match=rf"{OP}: bias must broadcast to the scores"):
        call(q, k, v, torch.zeros(1, 1, 2, 4), 1.0, False)
    with pytest.raises(RuntimeError, match=rf"{OP}: key must have the dtype of query"):
        call(q, k.double(), v, None, 1.0, False)
    with pytest.raises(
        ValueError,
        match=rf"{OP}: scale must be finite in the inputs' accumulation type \(float32\), got nan",
    ):
        call(q, k, v, None, float("nan"), False)
