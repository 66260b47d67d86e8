"""scaled_dot_product_attention vs torch's SDPA and the plain math expression, at CMSG's shapes
(issue 9): batch 16, 8 heads, E=64, 80 label queries, Lk = 80 (label-to-label attention under
the label-correlation bias), 196 and 1024 (label queries to the spatial positions).

- forward with a non-learnable float mask [Lq, Lk] (some -inf, no fully masked row) vs torch SDPA
  with the same mask; its GFLOP/s (4*B*H*Lq*Lk*E) as a share of a 2048^3 fp32 torch.mm timed in
  the same run (the machine's practical limit);
- forward+backward with a learnable broadcast bias [Lq, Lk] and q, k, v requiring grad, vs torch
  SDPA (its math path, since the mask needs a gradient) and vs softmax(q @ k^T * scale + bias) @ v;
  the peak extra memory of one call of each side (CPU: from torch.profiler's allocation events,
  see harness.cpu_peak_extra_mb; CUDA: torch.cuda.max_memory_allocated).

- nn.MultiheadAttention vs torch.nn.MultiheadAttention with the same weights (embed 512 = 8 heads
  of 64), a forward without gradients, with need_weights True (torch's default; ours computes
  the weights as a second product of q and k) and False: the whole module, its projections
  included, as a user who swaps the layer sees it.

The peak memory counts what a call returns: for forward+backward the output and the four
gradients, (2*B*H*Lq*E + 2*B*H*Lk*E + Lq*Lk) floats, shown as "results MB". One float32
[B, H, Lq, Lk] buffer of scores is 3.1 MiB at Lk=80, 7.7 MiB at 196 and 40 MiB at 1024: a peak
beyond the results of a few of those is O(B*H*Lq*Lk); the issue asks for O(B*H*Lq) (the lse)."""

from __future__ import annotations

import functools
import math

import torch
from harness import Case, median_seconds

import mlkernels

B, H, LQ, E = 16, 8, 80, 64
LKS = (80, 196, 1024)
MATMUL_N = 2048


def _scores_mask(lq: int, lk: int, g: torch.Generator, masked: float = 0.1) -> torch.Tensor:
    """A float mask [Lq, Lk]: N(0, 1) values and about ``masked`` of the entries -inf, but
    never a whole row (each row keeps one random key)."""
    mask = torch.randn(lq, lk, generator=g)
    drop = torch.rand(lq, lk, generator=g) < masked
    keep = torch.randint(lk, (lq,), generator=g)
    drop[torch.arange(lq), keep] = False
    return mask.masked_fill(drop, -math.inf)


def _assert_close(ours, anchor, rtol: float, atol: float) -> None:
    """Each tensor close, atol scaled by the anchor's magnitude (float32, sums in other orders)."""
    if isinstance(ours, torch.Tensor):
        ours, anchor = (ours,), (anchor,)
    assert len(ours) == len(anchor), (len(ours), len(anchor))
    names = ("out", "grad query", "grad key", "grad value", "grad bias")
    for name, a, b in zip(names, ours, anchor, strict=False):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(
            a, b, rtol=rtol, atol=atol * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


def _forward_close(ours, anchor):
    _assert_close(ours, anchor, rtol=1e-5, atol=1e-5)


def _gradients_close(ours, anchor):
    # The bias gradient sums B*H = 128 products per entry, the key/value ones Lq = 80: the
    # float32 rounding of different summation orders is above the forward's 1e-5.
    _assert_close(ours, anchor, rtol=1e-4, atol=1e-5)


def _modules_close(ours, anchor):
    """The module's output and its weights (or None for both)."""
    for a, b in zip(ours, anchor, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _module_cases(batch: int, lk: int, device: str) -> list[Case]:
    """nn.MultiheadAttention against torch's, the same weights, need_weights True and False. Its
    own generators, so that the op cases' inputs are what they were."""
    g = torch.Generator().manual_seed(lk)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = torch.nn.MultiheadAttention(H * E, H, batch_first=True).to(device).eval()
    ours = mlkernels.nn.MultiheadAttention(H * E, H, batch_first=True).to(device).eval()
    ours.load_state_dict(theirs.state_dict())
    query = torch.randn(batch, LQ, H * E, generator=g).to(device)
    memory = torch.randn(batch, lk, H * E, generator=g).to(device)

    def call(module, need_weights):
        with torch.no_grad():
            return module(query, memory, memory, need_weights=need_weights)

    return [
        Case(
            "attention",
            f"nn.MultiheadAttention, need_weights={need_weights}",
            f"{batch}x{LQ}x{H * E}, {H} heads, Lk={lk}",
            functools.partial(call, ours, need_weights),
            functools.partial(call, theirs, need_weights),
            "torch.nn.MultiheadAttention",
            _modules_close,
        )
        for need_weights in (True, False)
    ]


def _math_expression(q, k, v, bias, scale):
    return torch.softmax(q @ k.transpose(-2, -1) * scale + bias, dim=-1) @ v


def _forward_backward(fn, q, k, v, bias, grad):
    """One call: the output and the gradients of q, k, v and the bias for ``grad``."""
    q, k, v, bias = (t.detach().clone().requires_grad_() for t in (q, k, v, bias))

    def run():
        out = fn(q, k, v, bias)
        return (out, *torch.autograd.grad(out, (q, k, v, bias), grad))

    return run


@functools.cache
def _matmul_gflops(device: str) -> float:
    """The practical fp32 GFLOP/s of this device: a MATMUL_N^3 torch.mm (2*N^3 flops), timed once
    per run (the first attention case that reports GFLOP/s measures it, later ones reuse it).
    On CUDA, TF32 stays as torch's default (off for matmul): a fp32 product."""
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(MATMUL_N, MATMUL_N, generator=g).to(device) for _ in range(2))
    seconds = median_seconds(lambda: torch.mm(a, b), 0.5, device)
    return 2 * MATMUL_N**3 / seconds / 1e9


# The matrix products of one forward+backward without an O(Lq*Lk) buffer per (batch, head): the
# forward's q k^T and p v, the backward's recomputed q k^T, dO v^T, p^T dO, dS k and dS^T q.
FWD_BWD_PRODUCTS = 7


def _roofline(row: dict, products_flops: float, reference) -> dict[str, float]:
    """What the machine allows a forward+backward: its FWD_BWD_PRODUCTS matrix products at the
    fp32 matrix product's GFLOP/s (``reference``, the same run's) take at least "floor ms";
    "largest reachable ratio" is the row's anchor time over that floor, and "share of matmul
    speed 2x needs" the GFLOP/s that half the anchor's time asks for, as a share of the matrix
    product's: above 1, no kernel on this machine reaches 2x."""
    floor_ms = FWD_BWD_PRODUCTS * products_flops / (reference() * 1e9) * 1e3
    measured = {"floor ms": floor_ms}
    if row.get("anchor_ms"):
        measured["largest reachable ratio"] = row["anchor_ms"] / floor_ms
        measured["share of matmul speed 2x needs"] = 2 * floor_ms / row["anchor_ms"]
    return measured


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    """Every case runs on CUDA too: torch's SDPA (with a learnable bias it takes the efficient or
    math path there) and the math expression are plain tensor code."""
    g = torch.Generator().manual_seed(0)
    batch = 4 if quick else B
    lks = LKS[:1] if quick else LKS
    scale = 1 / math.sqrt(E)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ours = mlkernels.ops.scaled_dot_product_attention
    reference = functools.partial(_matmul_gflops, str(torch.device(device)))
    out = []
    for lk in lks:
        # Drawn on the CPU generator as for the CPU run, then moved (a no-op on the CPU).
        q = torch.randn(batch, H, LQ, E, generator=g)
        k = torch.randn(batch, H, lk, E, generator=g)
        v = torch.randn(batch, H, lk, E, generator=g)
        mask = _scores_mask(LQ, lk, g)
        bias = torch.randn(LQ, lk, generator=g)
        grad = torch.randn(batch, H, LQ, E, generator=g)
        q, k, v, mask, bias, grad = (t.to(device) for t in (q, k, v, mask, bias, grad))
        shape = f"{batch}x{H}x{LQ}x{E}, Lk={lk}"

        out.append(
            Case(
                "attention",
                "forward, float mask",
                f"{shape}, mask {LQ}x{lk}",
                lambda q=q, k=k, v=v, m=mask: ours(q, k, v, m),
                lambda q=q, k=k, v=v, m=mask: sdpa(q, k, v, m),
                "torch SDPA",
                _forward_close,
                target_ratio=1.0,
                flops=4 * batch * H * LQ * lk * E,
                reference_gflops=reference,
                target_share=0.5 if lk == 1024 else None,
            )
        )
        product_flops = 2 * batch * H * LQ * lk * E  # one [Lq, E] x [E, Lk] product per (b, h)
        for name, anchor, anchor_name, target in (
            ("fwd+bwd, learnable bias", sdpa, "torch SDPA (math path)", 2.0),
            (
                "fwd+bwd, learnable bias",
                functools.partial(_math_expression, scale=scale),
                "math expression",
                None,
            ),
        ):
            out.append(
                Case(
                    "attention",
                    name,
                    f"{shape}, bias {LQ}x{lk}",
                    _forward_backward(ours, q, k, v, bias, grad),
                    _forward_backward(anchor, q, k, v, bias, grad),
                    anchor_name,
                    _gradients_close,
                    target_ratio=target,
                    peak_memory=True,
                    measures=None
                    if target is None
                    else functools.partial(
                        _roofline, products_flops=product_flops, reference=reference
                    ),
                    measure_targets=None
                    if target is None
                    else {"share of matmul speed 2x needs": "<= 1 (else 2x is out of reach)"},
                )
            )
        out += _module_cases(batch, lk, device)
    return out
