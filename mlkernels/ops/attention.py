"""Fused masked attention: scaled_dot_product_attention with a learnable, broadcast bias.

Kernels: csrc/attention (CPU, CUDA); pure-PyTorch equivalent:
mlkernels.reference.scaled_dot_product_attention.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks as C

OP = "scaled_dot_product_attention"
# Leading dims of query, key and value: none, batch, or batch and heads.
MAX_LEADING_DIMS = 2


def _dims_str(sizes) -> str:
    return "[" + ", ".join(str(s) for s in sizes) + "]"


def check_attention_args(
    op: str,
    query: object,
    key: object,
    value: object,
    attn_mask: object,
    dropout_p: object,
    is_causal: object,
    scale: object,
) -> None:
    """Raise unless the arguments fit the contract: TypeError for a wrong kind of argument,
    RuntimeError for a dtype or device that does not fit, mlkernels.ShapeError (a RuntimeError)
    for shapes, ValueError for values out of range. Messages: "<op>: <argument> must be
    <expected>, got <what came>"; they are built only on failure."""
    C.check_tensor(op, "query", query)
    C.check_tensor(op, "key", key)
    C.check_tensor(op, "value", value)
    if attn_mask is not None:
        C.check_tensor(op, "attn_mask", attn_mask)

    # kinds and values of the scalar arguments
    p = C.as_float(op, "dropout_p", dropout_p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1], got {C.num_str(p)}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"{op}: is_causal must be a bool, got {is_causal!r}")
    if scale is not None:
        s = C.as_float(op, "scale", scale)
        if not math.isfinite(s):
            raise ValueError(f"{op}: scale must be a finite number or None, got {C.num_str(s)}")
    if is_causal and attn_mask is not None:
        raise ValueError(
            f"{op}: attn_mask must be None when is_causal=True (is_causal builds its own mask), "
            f"got {C.shape_str(attn_mask)}"
        )

    # dtypes and devices
    C.check_floating(op, "query", query, allow_half=True)
    C.check_same_dtype(op, "query", query, "key", key)
    C.check_same_dtype(op, "query", query, "value", value)
    C.check_same_device(op, "query", query, "key", key)
    C.check_same_device(op, "query", query, "value", value)
    if attn_mask is not None:
        if not (attn_mask.dtype == torch.bool or attn_mask.dtype == query.dtype):
            raise RuntimeError(
                f"{op}: attn_mask must be bool or {C.dtype_str(query.dtype)} (query's dtype), "
                f"got {C.dtype_str(attn_mask.dtype)}"
            )
        C.check_same_device(op, "query", query, "attn_mask", attn_mask)

    if scale is not None and query.dtype != torch.float64:
        # float32 is the accumulation type of every other dtype: a larger scale would be inf.
        if abs(float(scale)) > torch.finfo(torch.float32).max:
            raise ValueError(
                f"{op}: scale must be finite in the inputs' accumulation type (float32), "
                f"got {C.num_str(float(scale))}"
            )

    # shapes
    if not 2 <= query.dim() <= 2 + MAX_LEADING_DIMS:
        raise C.ShapeError(
            f"{op}: query must be Tensor[..., Lq, E] with at most {MAX_LEADING_DIMS} leading "
            f"dims (batch, heads), got {C.shape_str(query)}"
        )
    leading = query.shape[:-2]
    e = query.shape[-1]
    if key.dim() != query.dim() or key.shape[:-2] != leading:
        raise C.ShapeError(
            f"{op}: key must be Tensor[..., Lk, E] with leading dims {_dims_str(leading)} "
            f"(query's), got {C.shape_str(key)}"
        )
    if key.shape[-1] != e:
        raise C.ShapeError(
            f"{op}: key must be Tensor[..., Lk, E] with E = {e} (query's), got {C.shape_str(key)}"
        )
    if value.dim() != query.dim() or value.shape[:-2] != leading:
        raise C.ShapeError(
            f"{op}: value must be Tensor[..., Lk, Ev] with leading dims {_dims_str(leading)} "
            f"(query's), got {C.shape_str(value)}"
        )
    if value.shape[-2] != key.shape[-2]:
        raise C.ShapeError(
            f"{op}: value must be Tensor[..., Lk, Ev] with Lk = {key.shape[-2]} (key's), "
            f"got {C.shape_str(value)}"
        )
    if attn_mask is not None:
        scores = (*leading, query.shape[-2], key.shape[-2])
        fits = 2 <= attn_mask.dim() <= len(scores)
        if fits:
            tail = scores[len(scores) - attn_mask.dim() :]
            fits = all(m == 1 or m == s for m, s in zip(attn_mask.shape, tail, strict=True))
        if not fits:
            raise C.ShapeError(
                f"{op}: attn_mask must be 2-D to {len(scores)}-D and broadcastable to "
                f"Tensor{_dims_str(scores)} ([..., Lq, Lk]), got {C.shape_str(attn_mask)}"
            )


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(scale * query @ key^T + mask) @ value, fused (``torch.nn.functional.
    scaled_dot_product_attention``'s semantics, with gradients for a float mask).

    Args:
        query (Tensor[..., Lq, E]): the leading dims ``...`` are none, (B,) or (B, H).
        key (Tensor[..., Lk, E]): the same leading dims as query (no broadcasting).
        value (Tensor[..., Lk, Ev]).
        attn_mask (Tensor, optional): broadcastable to [..., Lq, Lk] (2-D to 4-D); bool (True =
            attend) or query's float dtype (added to the scaled scores). A float mask may
            require grad: its gradient is summed over the dims it was broadcast along, without
            a [..., Lq, Lk] buffer for a broadcast mask.
        dropout_p: dropout on the attention probabilities; above 0 the call takes the math
            path (:func:`mlkernels.reference.scaled_dot_product_attention`), not the kernels.
        is_causal: key j is masked for query i when j > i (top-left aligned); not together
            with attn_mask.
        scale: default 1 / sqrt(E).
        return_lse: also return each query row's log-sum-exp.

    Returns:
        Tensor[..., Lq, Ev] in query's dtype, and with ``return_lse`` a float32
        Tensor[..., Lq]: log(sum_j exp(scale * q_i . k_j + mask_ij)) over the keys not masked,
        -inf for a fully masked row. The log-sum-exp carries no gradient.

    A fully masked row gives zeros and zero gradients (never NaN); a NaN score makes its row
    NaN, as the softmax would. float16/bfloat16 are computed in float32. Differentiable w.r.t.
    query, key, value and a float mask (only the gradients asked for are computed); second
    derivatives raise. Deterministic on CPU (at a given thread count) and CUDA (no atomics).
    Under ``torch.autocast`` the inputs are cast to the autocast dtype, as torch's own.
    Equivalent PyTorch code: :func:`mlkernels.reference.scaled_dot_product_attention`.
    """
    check_attention_args(OP, query, key, value, attn_mask, dropout_p, is_causal, scale)
    if dropout_p > 0:
        # The reference imports this module's checks: imported here, not at the top.
        from ..reference.attention import scaled_dot_product_attention as _math_attention

        return _math_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, return_lse=return_lse
        )
    e = query.shape[-1]
    scale = (1.0 / math.sqrt(e) if e > 0 else 1.0) if scale is None else float(scale)
    leading, lq, ev = query.shape[:-2], query.shape[-2], value.shape[-1]
    bias = None
    if attn_mask is not None:
        bias = attn_mask
        if attn_mask.dtype == torch.bool:  # the mask's own shape, not the scores'
            bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
            bias = bias.masked_fill(~attn_mask, -math.inf)
        bias = bias[(None,) * (4 - bias.dim())]
    out, lse = torch.ops.mlkernels.scaled_dot_product_attention(
        *(t[(None,) * (4 - t.dim())] for t in (query, key, value)), bias, scale, is_causal
    )
    out = out.view(*leading, lq, ev)
    if not return_lse:
        return out
    return out, lse.view(*leading, lq).to(torch.float32)


# ---- fake kernels: the C++ checks, repeated, and the output shapes ----


def _check_inputs(op, query, key, value, bias, scale):
    """The checks of csrc/attention/attention.h check_inputs."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        C.check_defined(op, name, t)
    C.check(query.dim() == 4, f"{op}: query must be Tensor[B, H, Lq, E], got {C.shape_str(query)}")
    C.check_floating(op, "query", query, allow_half=True)
    b, h, lq, e = query.shape
    C.check(
        key.dim() == 4 and key.shape[0] == b and key.shape[1] == h and key.shape[3] == e,
        f"{op}: key must be Tensor[{b}, {h}, Lk, {e}] (query's batch, heads and E), "
        f"got {C.shape_str(key)}",
    )
    C.check(
        value.dim() == 4 and tuple(value.shape[:3]) == tuple(key.shape[:3]),
        f"{op}: value must be Tensor[{key.shape[0]}, {key.shape[1]}, {key.shape[2]}, Ev] "
        f"(key's batch, heads and Lk), got {C.shape_str(value)}",
    )
    C.check_same_dtype(op, "query", query, "key", key)
    C.check_same_dtype(op, "query", query, "value", value)
    C.check_same_device(op, "query", query, "key", key)
    C.check_same_device(op, "query", query, "value", value)
    if bias is not None:
        scores = (b, h, lq, key.shape[2])
        ok = bias.dim() == 4 and all(
            s == 1 or s == t for s, t in zip(bias.shape, scores, strict=True)
        )
        C.check(
            ok,
            f"{op}: bias must broadcast to the scores Tensor[{', '.join(map(str, scores))}] "
            f"(each dimension 1 or that size), got {C.shape_str(bias)}",
        )
        C.check_same_dtype(op, "query", query, "bias", bias)
        C.check_same_device(op, "query", query, "bias", bias)
    acc = "float64" if query.dtype == torch.float64 else "float32"
    largest = torch.finfo(_accumulation_type(query.dtype)).max
    C.check(
        math.isfinite(scale) and abs(scale) <= largest,
        f"{op}: scale must be finite in the inputs' accumulation type ({acc}), "
        f"got {C.num_str(scale)}",
        ValueError,
    )


def _accumulation_type(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("mlkernels::scaled_dot_product_attention")
def _attention_fake(query, key, value, bias, scale, is_causal):
    _check_inputs(OP, query, key, value, bias, scale)
    acc = _accumulation_type(query.dtype)
    out = query.new_empty((*query.shape[:3], value.shape[3]))
    return out, query.new_empty(tuple(query.shape[:3]), dtype=acc)


@torch.library.register_fake("mlkernels::scaled_dot_product_attention_backward")
def _attention_backward_fake(
    grad, query, key, value, bias, out, lse, scale, is_causal, output_mask=(True,) * 4
):
    op = "scaled_dot_product_attention_backward"
    _check_inputs(op, query, key, value, bias, scale)
    out_shape = (*query.shape[:3], value.shape[3])
    for name, t in (("grad", grad), ("out", out)):
        C.check_defined(op, name, t)
        C.check(
            tuple(t.shape) == out_shape,
            f"{op}: {name} must be Tensor[{', '.join(map(str, out_shape))}] (the output's "
            f"shape), got {C.shape_str(t)}",
        )
        C.check_same_dtype(op, "query", query, name, t)
        C.check_same_device(op, "query", query, name, t)
    C.check_defined(op, "lse", lse)
    acc = _accumulation_type(query.dtype)
    C.check(
        tuple(lse.shape) == out_shape[:3] and lse.dtype == acc,
        f"{op}: lse must be {C.dtype_str(acc)} Tensor[{', '.join(map(str, out_shape[:3]))}] "
        f"(the forward's), got {C.dtype_str(lse.dtype)} {C.shape_str(lse)}",
    )
    C.check_same_device(op, "query", query, "lse", lse)
    like_bias = bias if bias is not None else query.new_empty((0,))
    mask = list(output_mask)
    if bias is None and len(mask) == 4:
        mask[3] = False
    return C.masked_outputs(op, mask, query, key, value, like_bias)


# ---- autograd ----


def _setup(ctx, inputs, output):
    query, key, value, bias, scale, is_causal = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, bias, out, lse)
    ctx.scale, ctx.is_causal = scale, is_causal
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, bias, out, lse = ctx.saved_tensors
    mask = [bool(m) for m in ctx.needs_input_grad[:4]]
    grads = torch.ops.mlkernels.scaled_dot_product_attention_backward(
        grad_out.contiguous(), query, key, value, bias, out, lse, ctx.scale, ctx.is_causal, mask
    )
    return (*(g if wanted else None for g, wanted in zip(grads, mask, strict=True)), None, None)


torch.library.register_autograd(
    "mlkernels::scaled_dot_product_attention", _backward, setup_context=_setup
)
C.no_double_backward("scaled_dot_product_attention_backward")
