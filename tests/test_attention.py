"""scaled_dot_product_attention: every implementation in IMPLEMENTATIONS against a float64 math
expression written here (every mask form, is_causal, fully masked rows, log-sum-exp), against
torch's SDPA where both apply, fp64 gradcheck for query, key, value and a (broadcast) float mask,
float16/bfloat16 error within 2x of torch's, dropout, empty sequences, NaN and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import mlkernels
from mlkernels import reference
from mlkernels.ops.attention import check_attention_args

OP = "scaled_dot_product_attention"

# (name, function): the implementations under test, all with the reference's signature.
IMPLEMENTATIONS = [
    ("reference", reference.scaled_dot_product_attention),
    ("ops", mlkernels.ops.scaled_dot_product_attention),
]

SDPA = pytest.mark.parametrize(
    "sdpa", [fn for _, fn in IMPLEMENTATIONS], ids=[name for name, _ in IMPLEMENTATIONS]
)
DTYPES = [torch.float32, torch.float64]
# assert_close tolerances against the float64 math, by the dtype computed in
TOLERANCES = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.float64: {"rtol": 1e-9, "atol": 1e-12},
}


def _randn(seed: int, shape, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _inputs(seed: int, leading, lq: int, lk: int, e: int, ev: int, dtype=torch.float64):
    q = _randn(seed, (*leading, lq, e), dtype)
    k = _randn(seed + 1, (*leading, lk, e), dtype)
    v = _randn(seed + 2, (*leading, lk, ev), dtype)
    return q, k, v


def _mask_shape(scores_shape, ndim: int, broadcast: list[bool]) -> tuple[int, ...]:
    """The last ``ndim`` dims of the scores' shape, those flagged in ``broadcast`` set to 1."""
    tail = scores_shape[len(scores_shape) - ndim :]
    return tuple(1 if b else s for s, b in zip(tail, broadcast, strict=False))


def _attend(seed: int, shape, keep: float, full_rows: bool) -> torch.Tensor:
    """A bool mask (True = attend) of ``shape``, True with probability ``keep``; every row has
    an attended key unless ``full_rows``, which also masks every other row completely."""
    g = torch.Generator().manual_seed(seed + 3)
    attend = torch.rand(*shape, generator=g) < keep
    if shape[-1] > 0:
        first = torch.randint(0, shape[-1], shape[:-1], generator=g)
        attend.scatter_(-1, first.unsqueeze(-1), True)
    if full_rows and len(shape) >= 2 and shape[-2] > 0:
        attend[..., ::2, :] = False
    return attend


def _float_mask(seed: int, shape, attend: torch.Tensor, dtype) -> torch.Tensor:
    """A float mask: a random bias, -inf where ``attend`` is False."""
    bias = _randn(seed + 4, shape) * 2
    return bias.masked_fill(~attend, -math.inf).to(dtype)


def _math(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """softmax(scale * q @ k^T + bias) @ v in float64, fully masked rows zeroed; and the
    log-sum-exp of each row (torch.logsumexp: -inf for a fully masked row)."""
    q, k, v = q.double(), k.double(), v.double()
    if scale is None:
        scale = 1 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    scores = q @ k.transpose(-2, -1) * scale
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, -math.inf)
    elif attn_mask is not None:
        scores = scores + attn_mask.double()
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, -math.inf)
    masked_row = (scores == -math.inf).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(masked_row, 0.0), dim=-1).masked_fill(masked_row, 0)
    return probs @ v, torch.logsumexp(scores, dim=-1)


def _check_output(out, lse, q, v, expected, expected_lse, tolerances):
    assert out.shape == (*q.shape[:-1], v.shape[-1]) and out.dtype == q.dtype
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, **tolerances)
    lse_tolerances = TOLERANCES[torch.float32]  # the log-sum-exp is float32
    torch.testing.assert_close(lse.double(), expected_lse.float().double(), **lse_tolerances)


# ---- forward: against the float64 math, every mask form ----


@st.composite
def _cases(draw, fully_masked_rows: bool = True):
    """A random attention problem: (q, k, v, mask, is_causal, scale) in float64."""
    leading = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    lq, lk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    e, ev = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**30))
    q, k, v = _inputs(seed, leading, lq, lk, e, ev)
    kind = draw(st.sampled_from(["none", "causal", "bool", "float"]))
    mask = None
    if kind in ("bool", "float"):
        scores_shape = (*leading, lq, lk)
        ndim = draw(st.integers(2, len(scores_shape)))
        broadcast = draw(st.lists(st.booleans(), min_size=ndim, max_size=ndim))
        shape = _mask_shape(scores_shape, ndim, broadcast)
        keep = draw(st.sampled_from([0.1, 0.5, 1.0]))
        full_rows = fully_masked_rows and draw(st.booleans())
        attend = _attend(seed, shape, keep, full_rows)
        mask = attend if kind == "bool" else _float_mask(seed, shape, attend, torch.float64)
    scale = draw(st.sampled_from([None, 0.3, 1.0, -0.5]))
    return q, k, v, mask, kind == "causal", scale


@SDPA
@given(case=_cases(), dtype=st.sampled_from(DTYPES))
def test_forward_matches_math(sdpa, case, dtype):
    q, k, v, mask, is_causal, scale = case
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    expected, expected_lse = _math(q, k, v, mask, is_causal, scale)
    out, lse = sdpa(q, k, v, mask, is_causal=is_causal, scale=scale, return_lse=True)
    _check_output(out, lse, q, v, expected, expected_lse, TOLERANCES[dtype])
    plain = sdpa(q, k, v, mask, is_causal=is_causal, scale=scale)
    torch.testing.assert_close(plain, out, rtol=0, atol=0)


@SDPA
@given(case=_cases(fully_masked_rows=False), dtype=st.sampled_from(DTYPES))
def test_forward_matches_torch(sdpa, case, dtype):
    q, k, v, mask, is_causal, scale = case
    # torch's CPU kernel scales masked (-inf) scores too: with a negative scale they become +inf
    # and its rows NaN (torch 2.14: is_causal with scale=-0.5 gives NaN). Compare elsewhere.
    assume(scale is None or scale > 0 or (mask is None and not is_causal))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    expected = F.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, scale=scale)
    torch.testing.assert_close(sdpa(q, k, v, mask, is_causal=is_causal, scale=scale), expected)


@SDPA
@pytest.mark.parametrize(
    "mask_shape",
    [(7, 9), (3, 7, 9), (2, 1, 7, 9), (1, 3, 7, 9), (2, 1, 1, 9), (1, 1, 7, 1), (2, 3, 7, 9)],
    ids=["LqLk", "HLqLk", "B1LqLk", "1HLqLk", "key_padding", "query_column", "full"],
)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_forms(sdpa, mask_shape, kind):
    q, k, v = _inputs(5, (2, 3), 7, 9, 6, 5)
    attend = _attend(5, mask_shape, 0.5, full_rows=False)
    mask = attend if kind == "bool" else _float_mask(5, mask_shape, attend, torch.float64)
    expected, expected_lse = _math(q, k, v, mask)
    out, lse = sdpa(q, k, v, mask, return_lse=True)
    _check_output(out, lse, q, v, expected, expected_lse, TOLERANCES[torch.float64])
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, mask))


@SDPA
@pytest.mark.parametrize("lq,lk", [(1, 1), (5, 9), (9, 5), (8, 8)])
def test_causal_is_top_left(sdpa, lq, lk):
    q, k, v = _inputs(6, (2,), lq, lk, 5, 3)
    out = sdpa(q, k, v, is_causal=True)
    lower = torch.ones(lq, lk, dtype=torch.bool).tril()
    torch.testing.assert_close(out, sdpa(q, k, v, lower))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    torch.testing.assert_close(out[:, 0], v[:, 0].expand(2, 3))  # row 0 sees key 0 only


@SDPA
def test_lse_is_logsumexp_of_scores(sdpa):
    q, k, v = _inputs(7, (2, 3), 6, 11, 8, 4)
    bias = _randn(8, (6, 11))
    _, lse = sdpa(q, k, v, bias, scale=0.7, return_lse=True)
    expected = torch.logsumexp(q @ k.transpose(-2, -1) * 0.7 + bias, dim=-1)
    torch.testing.assert_close(lse, expected.float())


# ---- fully masked rows ----


@SDPA
@pytest.mark.parametrize("kind", ["bool", "float", "empty_keys"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fully_masked_rows_give_zeros_and_finite_gradients(sdpa, kind, dtype):
    lk = 0 if kind == "empty_keys" else 6
    q, k, v = (t.to(dtype).requires_grad_() for t in _inputs(9, (2, 3), 5, lk, 4, 3))
    attend = _attend(9, (2, 1, 5, lk), 0.5, full_rows=True)  # rows 0, 2, 4 fully masked
    mask = None
    if kind == "bool":
        mask = attend
    elif kind == "float":
        mask = _float_mask(9, (2, 1, 5, lk), attend, dtype).requires_grad_()
    out, lse = sdpa(q, k, v, mask, return_lse=True)
    masked = [0, 2, 4] if lk > 0 else [0, 1, 2, 3, 4]
    assert (out[..., masked, :] == 0).all()
    assert (lse[..., masked] == -math.inf).all()
    assert out.isfinite().all() and not lse.isnan().any()
    finite_lse = lse.masked_fill(lse == -math.inf, 0)
    (out.float().square().sum() + finite_lse.sum()).backward()
    inputs = [q, k, v] + ([mask] if kind == "float" else [])
    for t in inputs:
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.isfinite().all()
    assert (q.grad[..., masked, :] == 0).all()
    if kind == "float":
        assert (mask.grad[..., masked, :] == 0).all()
        assert (mask.grad[~attend.expand_as(mask)] == 0).all()


# ---- gradients ----


GRAD_MASKS = {
    "none": None,
    "causal": None,
    "bool": (2, 3, 4, 5),
    "float": (2, 3, 4, 5),
    "float_LqLk": (4, 5),
    "float_key_padding": (2, 1, 1, 5),
    "float_HLqLk": (3, 4, 5),
}


@SDPA
@pytest.mark.parametrize("form", list(GRAD_MASKS))
def test_gradcheck(sdpa, form):
    q, k, v = (t.requires_grad_() for t in _inputs(10, (2, 3), 4, 5, 3, 2))
    shape = GRAD_MASKS[form]
    mask = None
    if shape is not None:
        attend = _attend(10, shape, 0.6, full_rows=form == "bool")
        if form == "bool":
            mask = attend
        else:
            mask = _float_mask(10, shape, attend, torch.float64).requires_grad_()
    is_causal = form == "causal"

    def fn(q, k, v, *mask_arg):
        m = mask_arg[0] if mask_arg else mask
        return sdpa(q, k, v, m, is_causal=is_causal, scale=0.8)

    args = (q, k, v) + ((mask,) if mask is not None and mask.requires_grad else ())
    assert torch.autograd.gradcheck(fn, args)


@SDPA
@pytest.mark.parametrize("mask_shape", [(6, 7), (2, 1, 1, 7), (3, 6, 7), (1, 3, 1, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_gradient_is_summed_over_broadcast_dims(sdpa, mask_shape, dtype):
    inputs = [t.to(dtype) for t in _inputs(11, (2, 3), 6, 7, 5, 4)]
    attend = _attend(11, mask_shape, 0.7, full_rows=False)
    bias = _float_mask(11, mask_shape, attend, dtype)
    grad = _randn(12, (2, 3, 6, 4), dtype)
    results = []
    for fn in (sdpa, lambda *a: _math(*a)[0]):
        leaves = [t.clone().requires_grad_() for t in (*inputs, bias)]
        (fn(*leaves) * grad).sum().backward()
        results.append([t.grad for t in leaves])
    for ours, expected in zip(*results, strict=True):
        assert ours.shape == expected.shape and ours.dtype == dtype
        torch.testing.assert_close(ours.double(), expected.double(), **TOLERANCES[dtype])


# ---- float16 / bfloat16 ----


@SDPA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "causal", "bool", "float"])
def test_low_precision_error_within_twice_torchs(sdpa, dtype, kind):
    q, k, v = (t.to(dtype) for t in _inputs(13, (2, 4), 24, 33, 16, 12))
    mask = None
    if kind in ("bool", "float"):
        attend = _attend(13, (2, 1, 24, 33), 0.6, full_rows=False)
        mask = attend if kind == "bool" else _float_mask(13, attend.shape, attend, dtype)
    is_causal = kind == "causal"
    # the fp32 truth on the very same (rounded) inputs
    mask32 = mask if mask is None or mask.dtype == torch.bool else mask.float()
    truth = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), mask32, is_causal=is_causal
    )
    theirs = F.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal)
    ours, lse = sdpa(q, k, v, mask, is_causal=is_causal, return_lse=True)
    assert ours.dtype == dtype and lse.dtype == torch.float32
    # the largest and the mean error: one rounding of an exact float32 result each
    for reduce in (torch.amax, torch.mean):
        err = reduce((ours.float() - truth).abs()).item()
        their_err = reduce((theirs.float() - truth).abs()).item()
        assert err <= 2 * their_err + 1e-5, (reduce.__name__, err, their_err)


# ---- dropout ----


@SDPA
def test_dropout(sdpa):
    q, k, v = _inputs(14, (2, 3), 8, 10, 6, 5)
    attend = _attend(14, (8, 10), 0.5, full_rows=True)
    plain = sdpa(q, k, v, attend)
    torch.testing.assert_close(sdpa(q, k, v, attend, dropout_p=0.0), plain, rtol=0, atol=0)
    torch.manual_seed(0)
    dropped = sdpa(q, k, v, attend, dropout_p=0.5)
    assert dropped.shape == plain.shape and dropped.isfinite().all()
    assert not torch.equal(dropped, plain)
    assert (dropped[..., ::2, :] == 0).all()  # fully masked rows stay zero
    assert (sdpa(q, k, v, attend, dropout_p=1.0) == 0).all()
    # without a mask: the mean over many draws is the output without dropout
    q, k, v = _inputs(15, (), 3, 4, 2, 2)
    torch.manual_seed(1)
    mean = torch.stack([sdpa(q, k, v, dropout_p=0.3) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, sdpa(q, k, v), rtol=0, atol=0.1)


# ---- empty sequences ----


@SDPA
@pytest.mark.parametrize(
    "leading,lq,lk", [((2, 3), 0, 5), ((2, 3), 4, 0), ((2, 3), 0, 0), ((0, 3), 4, 5), ((), 0, 0)]
)
@pytest.mark.parametrize("kind", ["none", "causal", "bool", "float"])
def test_empty(sdpa, leading, lq, lk, kind):
    q, k, v = (t.requires_grad_() for t in _inputs(16, leading, lq, lk, 4, 3))
    mask = None
    if kind == "bool":
        mask = torch.ones(lq, lk, dtype=torch.bool)
    elif kind == "float":
        mask = torch.zeros(lq, lk, dtype=torch.float64, requires_grad=True)
    out, lse = sdpa(q, k, v, mask, is_causal=kind == "causal", return_lse=True)
    assert out.shape == (*leading, lq, 3) and lse.shape == (*leading, lq)
    if lk == 0:
        assert (out == 0).all() and (lse == -math.inf).all()
    out.sum().backward()
    for t in (q, k, v) + ((mask,) if kind == "float" else ()):
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


# ---- NaN ----


@SDPA
@pytest.mark.parametrize("where", ["query", "key", "value", "float_mask"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_nan_propagates(sdpa, where, dtype):
    q, k, v = _inputs(17, (2,), 5, 6, 4, 3, dtype)
    mask = _randn(18, (5, 6), dtype) if where == "float_mask" else None
    target = {"query": q, "key": k, "value": v, "float_mask": mask}[where]
    if where == "float_mask":
        target[1, 2] = math.nan
    else:
        target[0, 1, 2] = math.nan
    out, lse = sdpa(q, k, v, mask, return_lse=True)
    nan = torch.zeros(2, 5, 3, dtype=torch.bool)  # where the output must be NaN
    if where == "query":  # row 1 of batch 0
        nan[0, 1] = True
    elif where == "float_mask":  # row 1 of every batch
        nan[:, 1] = True
    elif where == "key":  # every row of batch 0 scores key 1
        nan[0] = True
    else:  # column 2 of every row of batch 0
        nan[0, :, 2] = True
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(lse.isnan(), nan.any(-1) if where != "value" else nan.all(-1))


# ---- bad input ----

Q, K, V = _inputs(19, (2, 8), 10, 12, 64, 32, torch.float32)

BAD_CASES = [
    (
        (Q, torch.zeros(2, 8, 12, 32), V),
        {},
        RuntimeError,
        rf"{OP}: key must be Tensor\[\.\.\., Lk, E\] with E = 64 \(query's\), "
        r"got Tensor\[2, 8, 12, 32\]",
    ),
    (
        (Q, torch.zeros(2, 4, 12, 64), V),
        {},
        RuntimeError,
        rf"{OP}: key must be Tensor\[\.\.\., Lk, E\] with leading dims \[2, 8\] \(query's\), "
        r"got Tensor\[2, 4, 12, 64\]",
    ),
    (
        (Q, K[0], V),
        {},
        RuntimeError,
        r"key must be Tensor\[\.\.\., Lk, E\] with leading dims \[2, 8\] \(query's\), "
        r"got Tensor\[8, 12, 64\]",
    ),
    (
        (Q, K, torch.zeros(2, 8, 11, 32)),
        {},
        RuntimeError,
        rf"{OP}: value must be Tensor\[\.\.\., Lk, Ev\] with Lk = 12 \(key's\), "
        r"got Tensor\[2, 8, 11, 32\]",
    ),
    (
        (Q, K, torch.zeros(1, 8, 12, 32)),
        {},
        RuntimeError,
        rf"{OP}: value must be Tensor\[\.\.\., Lk, Ev\] with leading dims \[2, 8\]",
    ),
    (
        (torch.zeros(1, 2, 8, 10, 64),) * 3,
        {},
        RuntimeError,
        rf"{OP}: query must be Tensor\[\.\.\., Lq, E\] with at most 2 leading dims "
        r"\(batch, heads\), got Tensor\[1, 2, 8, 10, 64\]",
    ),
    (
        (torch.zeros(64),) * 3,
        {},
        RuntimeError,
        rf"{OP}: query must be Tensor\[\.\.\., Lq, E\] .*got Tensor\[64\]",
    ),
    (
        (Q, K, V, torch.zeros(10, 11)),
        {},
        RuntimeError,
        rf"{OP}: attn_mask must be 2-D to 4-D and broadcastable to Tensor\[2, 8, 10, 12\] "
        r"\(\[\.\.\., Lq, Lk\]\), got Tensor\[10, 11\]",
    ),
    (
        (Q, K, V, torch.zeros(3, 1, 10, 12)),
        {},
        RuntimeError,
        rf"{OP}: attn_mask must be .* got Tensor\[3, 1, 10, 12\]",
    ),
    (
        (Q, K, V, torch.zeros(1, 2, 8, 10, 12)),
        {},
        RuntimeError,
        rf"{OP}: attn_mask must be .* got Tensor\[1, 2, 8, 10, 12\]",
    ),
    (
        (Q, K, V, torch.zeros(12)),
        {},
        RuntimeError,
        rf"{OP}: attn_mask must be 2-D to 4-D .* got Tensor\[12\]",
    ),
    (
        (Q[0, 0], K[0, 0], V[0, 0], torch.zeros(1, 10, 12)),
        {},
        RuntimeError,
        rf"{OP}: attn_mask must be 2-D to 2-D and broadcastable to Tensor\[10, 12\]",
    ),
    (
        (Q, K.double(), V),
        {},
        RuntimeError,
        rf"{OP}: key must have the dtype of query \(float32\), got float64",
    ),
    (
        (Q, K, V.half()),
        {},
        RuntimeError,
        rf"{OP}: value must have the dtype of query \(float32\), got float16",
    ),
    (
        (Q.long(), K.long(), V.long()),
        {},
        RuntimeError,
        rf"{OP}: query must be float16, bfloat16, float32 or float64, got int64",
    ),
    (
        (Q, K, V, torch.zeros(10, 12, dtype=torch.int32)),
        {},
        RuntimeError,
        rf"{OP}: attn_mask must be bool or float32 \(query's dtype\), got int32",
    ),
    (
        (Q, K, V, torch.zeros(10, 12, dtype=torch.float64)),
        {},
        RuntimeError,
        rf"{OP}: attn_mask must be bool or float32 \(query's dtype\), got float64",
    ),
    (
        (Q, K.to("meta"), V),
        {},
        RuntimeError,
        rf"{OP}: key must be on the device of query \(cpu\), got meta",
    ),
    (
        (Q, K, V, torch.zeros(10, 12, device="meta")),
        {},
        RuntimeError,
        rf"{OP}: attn_mask must be on the device of query \(cpu\), got meta",
    ),
    (
        (Q, K, V, torch.ones(10, 12, dtype=torch.bool)),
        {"is_causal": True},
        ValueError,
        rf"{OP}: attn_mask must be None when is_causal=True .*got Tensor\[10, 12\]",
    ),
    ((Q, K, V), {"dropout_p": 1.5}, ValueError, rf"{OP}: dropout_p must be in \[0, 1\], got 1.5"),
    ((Q, K, V), {"dropout_p": -0.1}, ValueError, rf"{OP}: dropout_p must be in \[0, 1\]"),
    ((Q, K, V), {"dropout_p": "0.1"}, TypeError, rf"{OP}: dropout_p must be a number, got '0.1'"),
    ((Q, K, V), {"is_causal": 1}, TypeError, rf"{OP}: is_causal must be a bool, got 1"),
    ((Q, K, V), {"scale": math.inf}, ValueError, rf"{OP}: scale must be a finite number"),
    ((Q, K, V), {"scale": "x"}, TypeError, rf"{OP}: scale must be a number, got 'x'"),
    ((Q.tolist(), K, V), {}, TypeError, rf"{OP}: query must be a Tensor, got list"),
    ((Q, None, V), {}, TypeError, rf"{OP}: key must be a Tensor, got NoneType"),
    ((Q, K, V, 1.0), {}, TypeError, rf"{OP}: attn_mask must be a Tensor, got float"),
]


@SDPA
@pytest.mark.parametrize(
    "args,kwargs,error,message", BAD_CASES, ids=[str(i) for i in range(len(BAD_CASES))]
)
def test_bad_input_messages(sdpa, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        sdpa(*args, **kwargs)


def test_shape_errors_are_shape_errors():
    from mlkernels import ShapeError

    with pytest.raises(ShapeError):
        reference.scaled_dot_product_attention(Q, K[..., :32], V)
    with pytest.raises(ShapeError):
        check_attention_args(OP, Q, K, V, torch.zeros(3, 10, 12), 0.0, False, None)
    assert check_attention_args(OP, Q, K, V, None, 0.0, False, None) is None


@SDPA
def test_zero_head_dim_is_uniform_attention(sdpa):
    # E = 0: every score is 0 (an empty dot product), so each row averages the attended values
    q, k, v = _inputs(20, (2,), 4, 5, 0, 3)
    attend = _attend(20, (4, 5), 0.5, full_rows=False)
    expected = (attend.double() / attend.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(sdpa(q, k, v), v.mean(-2, keepdim=True).expand(2, 4, 3))
    torch.testing.assert_close(sdpa(q, k, v, attend), expected)
    torch.testing.assert_close(sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))
