"""mlkernels.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights: every
argument combination (layout, kdim/vdim, bias, bias_kv, zero attention, both masks in bool and
float, 2-D and 3-D attn_mask, is_causal, weights per head or averaged, unbatched), gradients,
state dicts both ways, fully masked rows (zeros, where torch gives NaN), bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

from mlkernels import nn
from mlkernels.ops._checks import ShapeError

EMBED, HEADS, KDIM, VDIM = 16, 4, 12, 10
BATCH, TGT, SRC = 2, 5, 7
TOL = {"rtol": 1e-5, "atol": 1e-5}

# Module configurations: constructor kwargs beyond (EMBED, HEADS).
CONFIGS = {
    "default": {},
    "batch_first": {"batch_first": True},
    "kdim_vdim": {"kdim": KDIM, "vdim": VDIM},
    "no_bias": {"bias": False},
    "bf_kdim_nobias": {"batch_first": True, "kdim": KDIM, "vdim": VDIM, "bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True, "batch_first": True},
    "bias_kv_zero_attn_kdim": {"add_bias_kv": True, "add_zero_attn": True, "kdim": KDIM},
}
KPM_KINDS = [None, "bool", "float"]
ATTN_KINDS = [None, "bool2d", "bool3d", "float2d", "float3d"]
WEIGHT_MODES = {
    "no_weights": (False, True),
    "avg_weights": (True, True),
    "head_weights": (True, False),
}


def make_pair(seed: int = 0, **kwargs) -> tuple[torch.nn.MultiheadAttention, nn.MultiheadAttention]:
    """A torch module and ours with the torch module's state (eval mode, dropout off)."""
    torch.manual_seed(seed)
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, **kwargs)
    ours = nn.MultiheadAttention(EMBED, HEADS, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():  # make the biases nonzero (torch initializes them to zero)
        for module in (theirs, ours):
            torch.manual_seed(seed + 1)
            for name, param in module.named_parameters():
                if "bias" in name:
                    param.normal_()
    return theirs.eval(), ours.eval()


def make_inputs(kwargs: dict, batch: int = BATCH, tgt: int = TGT, src: int = SRC, seed: int = 0):
    """query, key, value in the module's layout (batch < 0: unbatched)."""
    gen = torch.Generator().manual_seed(seed)
    kdim, vdim = kwargs.get("kdim", EMBED), kwargs.get("vdim", EMBED)

    def seq(length: int, dim: int) -> torch.Tensor:
        if batch < 0:
            shape = (length, dim)
        elif kwargs.get("batch_first"):
            shape = (batch, length, dim)
        else:
            shape = (length, batch, dim)
        return torch.randn(shape, generator=gen)

    return seq(tgt, EMBED), seq(src, kdim), seq(src, vdim)


def make_key_padding_mask(kind, batch: int = BATCH, src: int = SRC, seed: int = 1):
    """torch's convention: bool True = ignore the key. Key 0 is never masked (no empty rows)."""
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    shape = (src,) if batch < 0 else (batch, src)
    masked = torch.rand(shape, generator=gen) < 0.4
    masked[..., 0] = False
    if kind == "bool":
        return masked
    values = torch.randn(shape, generator=gen)
    return values.masked_fill(masked, float("-inf"))


def make_attn_mask(kind, batch: int = BATCH, tgt: int = TGT, src: int = SRC, seed: int = 2):
    """torch MHA's convention: bool True = NOT allowed. Key 0 is never masked."""
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    lead = max(batch, 1) * HEADS
    shape = (tgt, src) if kind.endswith("2d") else (lead, tgt, src)
    masked = torch.rand(shape, generator=gen) < 0.4
    masked[..., 0] = False
    if kind.startswith("bool"):
        return masked
    values = torch.randn(shape, generator=gen)
    return values.masked_fill(masked, float("-inf"))


def run_both(theirs, ours, *args, **kwargs):
    with warnings.catch_warnings():
        # torch deprecates a bool key_padding_mask with a float attn_mask; we accept it silently.
        warnings.filterwarnings("ignore", message="Support for mismatched")
        expected = theirs(*args, **kwargs)
    return expected, ours(*args, **kwargs)


def assert_same(expected, got, need_weights: bool) -> None:
    torch.testing.assert_close(got[0], expected[0], **TOL)
    if need_weights:
        assert got[1] is not None
        torch.testing.assert_close(got[1], expected[1], **TOL)
    else:
        assert got[1] is None


# ---- outputs and weights ---------------------------------------------------------------------


@pytest.mark.parametrize("weights", WEIGHT_MODES)
@pytest.mark.parametrize("attn", ATTN_KINDS)
@pytest.mark.parametrize("kpm", KPM_KINDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_torch(config, kpm, attn, weights):
    kwargs = CONFIGS[config]
    need_weights, average = WEIGHT_MODES[weights]
    theirs, ours = make_pair(**kwargs)
    query, key, value = make_inputs(kwargs)
    expected, got = run_both(
        theirs,
        ours,
        query,
        key,
        value,
        key_padding_mask=make_key_padding_mask(kpm),
        attn_mask=make_attn_mask(attn),
        need_weights=need_weights,
        average_attn_weights=average,
    )
    assert_same(expected, got, need_weights)
    if need_weights:
        src = SRC + kwargs.get("add_bias_kv", False) + kwargs.get("add_zero_attn", False)
        shape = (BATCH, TGT, src) if average else (BATCH, HEADS, TGT, src)
        assert got[1].shape == shape


@pytest.mark.parametrize("weights", WEIGHT_MODES)
@pytest.mark.parametrize("attn", [None, "bool2d", "bool3d", "float2d", "float3d"])
@pytest.mark.parametrize("kpm", KPM_KINDS)
def test_unbatched_matches_torch(kpm, attn, weights):
    kwargs = {"kdim": KDIM, "vdim": VDIM}
    need_weights, average = WEIGHT_MODES[weights]
    theirs, ours = make_pair(**kwargs)
    query, key, value = make_inputs(kwargs, batch=-1)
    assert query.dim() == 2
    expected, got = run_both(
        theirs,
        ours,
        query,
        key,
        value,
        key_padding_mask=make_key_padding_mask(kpm, batch=-1),
        attn_mask=make_attn_mask(attn, batch=-1),
        need_weights=need_weights,
        average_attn_weights=average,
    )
    assert_same(expected, got, need_weights)
    assert got[0].shape == (TGT, EMBED)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("weights", WEIGHT_MODES)
def test_self_attention_matches_torch(batch_first, weights):
    """query is key is value: the packed projection (and, under no_grad, torch's fast path)."""
    need_weights, average = WEIGHT_MODES[weights]
    theirs, ours = make_pair(batch_first=batch_first)
    x, _, _ = make_inputs({"batch_first": batch_first}, tgt=6)
    kpm = make_key_padding_mask("bool", src=6)
    with torch.no_grad():
        expected, got = run_both(
            theirs,
            ours,
            x,
            x,
            x,
            key_padding_mask=kpm,
            need_weights=need_weights,
            average_attn_weights=average,
        )
    assert_same(expected, got, need_weights)


def causal_mask(tgt: int, src: int, kind: str) -> torch.Tensor:
    """torch MHA's convention (True = not allowed); key j > query i masked (top-left)."""
    masked = torch.ones(tgt, src, dtype=torch.bool).triu(1)
    if kind == "bool":
        return masked
    return torch.zeros(tgt, src).masked_fill(masked, float("-inf"))


@pytest.mark.parametrize("weights", WEIGHT_MODES)
@pytest.mark.parametrize("kpm", [None, "bool"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize(
    "config", ["default", "batch_first", "bias_kv", "zero_attn", "bias_kv_zero_attn_kdim"]
)
@pytest.mark.parametrize("tgt,src", [(6, 6), (4, 7)])
def test_is_causal_matches_torch(tgt, src, config, mask_kind, kpm, weights):
    kwargs = CONFIGS[config]
    need_weights, average = WEIGHT_MODES[weights]
    theirs, ours = make_pair(**kwargs)
    query, key, value = make_inputs(kwargs, tgt=tgt, src=src)
    mask = causal_mask(tgt, src, mask_kind)
    extra_keys = kwargs.get("add_bias_kv", False) or kwargs.get("add_zero_attn", False)
    if extra_keys and not need_weights and kpm is None:
        # torch then drops attn_mask and runs SDPA's causal mode over the S + 1 or S + 2 keys,
        # which masks the bias_k / zero columns for the first rows; we keep attn_mask (those
        # columns always attended), which is what torch does itself with need_weights=True.
        # Compare with that.
        expected = theirs(query, key, value, attn_mask=mask, need_weights=True, is_causal=True)[0]
        got = ours(query, key, value, attn_mask=mask, need_weights=False, is_causal=True)
        torch.testing.assert_close(got[0], expected, **TOL)
        return
    expected, got = run_both(
        theirs,
        ours,
        query,
        key,
        value,
        key_padding_mask=make_key_padding_mask(kpm, src=src),
        attn_mask=mask,
        need_weights=need_weights,
        average_attn_weights=average,
        is_causal=True,
    )
    assert_same(expected, got, need_weights)


def test_is_causal_without_attn_mask_raises_like_torch():
    theirs, ours = make_pair()
    query, key, value = make_inputs({})
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        theirs(query, key, value, is_causal=True)
    with pytest.raises(ValueError, match="MultiheadAttention: is_causal .* needs attn_mask"):
        ours(query, key, value, is_causal=True)


def test_training_without_dropout_matches_torch():
    theirs, ours = make_pair(batch_first=True)
    theirs.train(), ours.train()
    query, key, value = make_inputs({"batch_first": True})
    kpm = make_key_padding_mask("bool")
    assert_same(theirs(query, key, value, kpm), ours(query, key, value, kpm), True)


def test_dropout_only_in_training():
    _, ours = make_pair(dropout=0.5)
    query, key, value = make_inputs({})
    ours.eval()
    first = ours(query, key, value, need_weights=False)[0]
    torch.testing.assert_close(ours(query, key, value, need_weights=False)[0], first)
    ours.train()
    torch.manual_seed(0)
    dropped, weights = ours(query, key, value)
    assert torch.isfinite(dropped).all() and torch.isfinite(weights).all()
    assert not torch.allclose(dropped, first)
    # The weights are the probabilities before dropout: rows still sum to one.
    torch.testing.assert_close(weights.sum(-1), torch.ones(BATCH, TGT))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("tgt,src", [(0, 3), (3, 0), (0, 0)])
def test_empty_sequences_match_torch(tgt, src, need_weights):
    theirs, ours = make_pair(batch_first=True)
    query, key, value = make_inputs({"batch_first": True}, tgt=tgt, src=src)
    # torch fails at S = 0 with a key_padding_mask and need_weights=False; an all-False mask is
    # no mask, so compare with torch's output without one.
    kpm = torch.zeros(BATCH, src, dtype=torch.bool)
    expected = theirs(query, key, value, need_weights=need_weights)
    got = ours(query, key, value, key_padding_mask=kpm, need_weights=need_weights)
    assert_same(expected, got, need_weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_torchs(dtype):
    """Against torch in float32: our error at most 2x torch's own error in that dtype."""
    theirs, ours = make_pair(batch_first=True)
    inputs = make_inputs({"batch_first": True}, tgt=8, src=24)
    attn = make_attn_mask("float2d", tgt=8, src=24)
    kpm = make_key_padding_mask("float", src=24)
    with torch.no_grad():
        expected = theirs(*inputs, key_padding_mask=kpm, attn_mask=attn)
        low = [t.to(dtype) for t in inputs]
        masks = {"key_padding_mask": kpm.to(dtype), "attn_mask": attn.to(dtype)}
        theirs_low = theirs.to(dtype)(*low, **masks)
        got = ours.to(dtype)(*low, **masks)
    for index in (0, 1):
        assert got[index].dtype == dtype
        torch_error = (theirs_low[index].float() - expected[index]).abs().max().item()
        our_error = (got[index].float() - expected[index]).abs().max().item()
        assert our_error <= 2 * torch_error + 1e-3, (index, our_error, torch_error)


def test_autocast_takes_mixed_dtypes_like_torch():
    """Under bf16 autocast a float32 module takes bf16 and float32 inputs, as torch's does (its
    projections cast them); outside autocast the mismatch is an error naming the argument."""
    theirs, ours = make_pair(batch_first=True)
    query, key, value = make_inputs({"batch_first": True}, tgt=8, src=24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = theirs(query.bfloat16(), key, value)
        got = ours(query.bfloat16(), key, value)
    for index in (0, 1):
        assert got[index].dtype == expected[index].dtype == torch.bfloat16
        torch.testing.assert_close(got[index].float(), expected[index].float(), atol=2e-2, rtol=0)
    with pytest.raises(RuntimeError, match="query must have the module's dtype"):
        ours(query.bfloat16(), key, value)


def test_non_contiguous_masks():
    theirs, ours = make_pair()
    query, key, value = make_inputs({})
    kpm = make_key_padding_mask("bool").t().contiguous().t()
    attn = make_attn_mask("float3d").transpose(1, 2).contiguous().transpose(1, 2)
    assert not kpm.is_contiguous() and not attn.is_contiguous()
    expected, got = run_both(theirs, ours, query, key, value, key_padding_mask=kpm, attn_mask=attn)
    assert_same(expected, got, True)


# ---- gradients -------------------------------------------------------------------------------

GRAD_CASES = {
    "packed_kpm_bool_attn_float2d": ({}, "bool", "float2d", (True, True)),
    "kdim_bf_attn_bool3d_head_weights": (
        {"batch_first": True, "kdim": KDIM, "vdim": VDIM},
        None,
        "bool3d",
        (True, False),
    ),
    "bias_kv_zero_attn_kpm_float_no_weights": (
        {"add_bias_kv": True, "add_zero_attn": True},
        "float",
        "float3d",
        (False, True),
    ),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_match_torch(case):
    kwargs, kpm_kind, attn_kind, (need_weights, average) = GRAD_CASES[case]
    theirs, ours = make_pair(**kwargs)
    inputs = make_inputs(kwargs)
    kpm = make_key_padding_mask(kpm_kind)
    attn = make_attn_mask(attn_kind)
    gen = torch.Generator().manual_seed(5)

    def grads(module):
        leaves = [t.clone().requires_grad_() for t in inputs]
        mask = attn
        if attn is not None and attn.is_floating_point():  # a learnable bias
            mask = attn.clone().requires_grad_()
            leaves.append(mask)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Support for mismatched")
            out, weights = module(
                *leaves[:3],
                key_padding_mask=kpm,
                attn_mask=mask,
                need_weights=need_weights,
                average_attn_weights=average,
            )
        loss = (out * torch.randn(out.shape, generator=gen.manual_seed(5))).sum()
        if weights is not None:
            loss = loss + (weights * torch.randn(weights.shape, generator=gen)).sum()
        params = [p for _, p in sorted(module.named_parameters())]
        result = torch.autograd.grad(loss, leaves + params, allow_unused=True)
        return [torch.zeros(()) if g is None else g for g in result]

    expected, got = grads(theirs), grads(ours)
    assert len(expected) == len(got)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["float", "bool"])
@pytest.mark.parametrize("average", [True, False])
def test_float64_weights_pass_gradcheck(mask_kind, average):
    # The weights of a float64 module have float64's precision (the op's log-sum-exp is float32,
    # so the module takes it again from the scores): fp64 gradcheck of both outputs, with respect
    # to query, key, value and a learnable float mask. With the float32 log-sum-exp it failed.
    torch.manual_seed(0)
    module = nn.MultiheadAttention(8, 2, batch_first=True).double()
    q = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    if mask_kind == "float":
        inputs = (q, k, v, torch.randn(3, 5, dtype=torch.float64, requires_grad=True))
    else:  # key 2 masked for every query, and every key of query 1: a row of zero weights
        mask = torch.ones(3, 5, dtype=torch.bool)
        mask[:, 2] = False
        mask[1] = False
        inputs = (q, k, v, mask)

    def both(q, k, v, mask):
        return module(q, k, v, attn_mask=mask, need_weights=True, average_attn_weights=average)

    assert torch.autograd.gradcheck(both, inputs)


# ---- state dicts and construction --------------------------------------------------------------


@pytest.mark.parametrize("config", ["default", "kdim_vdim", "no_bias", "bias_kv_zero_attn_kdim"])
def test_state_dict_and_init_are_torchs(config):
    kwargs = CONFIGS[config]
    torch.manual_seed(3)
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, **kwargs)
    torch.manual_seed(3)
    ours = nn.MultiheadAttention(EMBED, HEADS, **kwargs)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    state, our_state = theirs.state_dict(), ours.state_dict()
    assert list(our_state) == list(state)
    for name, value in state.items():  # same _reset_parameters, same seed: same values
        torch.testing.assert_close(our_state[name], value, rtol=0, atol=0)
    # Loading works both ways, strictly.
    torch.manual_seed(4)
    other = nn.MultiheadAttention(EMBED, HEADS, **kwargs)
    other.load_state_dict(theirs.state_dict())
    back = torch.nn.MultiheadAttention(EMBED, HEADS, **kwargs)
    back.load_state_dict(other.state_dict())
    for name, value in back.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)


# ---- fully masked rows -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("bias", [False, True])
def test_fully_masked_rows_give_zeros_not_nan(kind, bias):
    _, ours = make_pair(bias=bias)
    query, key, value = [t.requires_grad_() for t in make_inputs({})]
    kpm = make_key_padding_mask(kind)
    attn = make_attn_mask("bool2d")
    kpm[1] = True if kind == "bool" else float("-inf")  # batch 1: every key is padding
    attn[2] = True  # query 2: no key allowed, in every batch
    if kind == "float":
        attn = torch.zeros(attn.shape).masked_fill(attn, float("-inf"))
    out, weights = ours(
        query, key, value, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=False
    )
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    # The attention rows are zero, so the output rows are the output projection's bias.
    empty = out.new_zeros(EMBED) if not bias else ours.out_proj.bias
    torch.testing.assert_close(out[:, 1], empty.expand(TGT, EMBED), rtol=0, atol=0)
    torch.testing.assert_close(out[2], empty.expand(BATCH, EMBED), rtol=0, atol=0)
    assert (weights[1] == 0).all() and (weights[:, :, 2] == 0).all()
    # Other rows are proper distributions.
    torch.testing.assert_close(weights[0, :, [0, 1, 3, 4]].sum(-1), torch.ones(HEADS, 4))
    (out.sum() + weights.sum()).backward()
    for t in (query, key, value):
        assert torch.isfinite(t.grad).all()
    assert torch.isfinite(ours.in_proj_weight.grad).all()


# ---- bad input -------------------------------------------------------------------------------


def test_bad_input_messages():
    _, ours = make_pair()
    query, key, value = make_inputs({})
    with pytest.raises(ShapeError, match=r"query must be .* got Tensor\[2, 16\]|key and value"):
        ours(query, key[0], value[0])
    with pytest.raises(ShapeError, match=r"query must be Tensor\[L, N, E\].*got Tensor\[16\]"):
        ours(query[0, 0], key, value)
    with pytest.raises(ShapeError, match=r"query's last dim must be embed_dim=16"):
        ours(query[..., :8], key, value)
    with pytest.raises(ShapeError, match=r"key_padding_mask must be Tensor\[2, 7\]"):
        ours(query, key, value, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ShapeError, match=r"attn_mask must be Tensor\[5, 7\] or Tensor\[8, 5, 7\]"):
        ours(query, key, value, attn_mask=torch.zeros(2, 5, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool or floating, got torch.int64"):
        ours(query, key, value, attn_mask=torch.zeros(5, 7, dtype=torch.long))
    with pytest.raises(ShapeError, match="key's batch dim must be query's"):
        ours(query, key[:, :1], value[:, :1])


# ---- CUDA --------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_matches_torch_on_cuda():
    theirs, ours = make_pair(batch_first=True, kdim=KDIM, vdim=VDIM)
    theirs, ours = theirs.cuda(), ours.cuda()
    inputs = [t.cuda() for t in make_inputs({"batch_first": True, "kdim": KDIM, "vdim": VDIM})]
    kpm = make_key_padding_mask("bool").cuda()
    attn = make_attn_mask("float2d").cuda()
    expected, got = run_both(
        theirs, ours, *inputs, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=False
    )
    assert_same(expected, got, True)
