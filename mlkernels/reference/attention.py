"""Pure-PyTorch scaled_dot_product_attention: the contract of
mlkernels.ops.scaled_dot_product_attention (torch.nn.functional.scaled_dot_product_attention's
semantics, plus fully masked rows that give zeros and finite gradients, NaN that propagates, and
the log-sum-exp of every query row).

The scores [..., Lq, Lk] are materialized in float32 (float16/bfloat16 inputs) or the inputs'
own dtype (float32, float64); a fully masked row is handled explicitly, so no gradient becomes
NaN. ``check_attention_args`` holds the argument checks, shared with the ops wrapper."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..ops import _checks as C

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
    """softmax(scale * query @ key^T + mask) @ value, the math written out.

    Args:
        query (Tensor[..., Lq, E]): the leading dims ``...`` are none, (B,) or (B, H).
        key (Tensor[..., Lk, E]): the same leading dims as query (no broadcasting).
        value (Tensor[..., Lk, Ev]).
        attn_mask (Tensor, optional): broadcastable to [..., Lq, Lk] (2-D to 4-D); bool (True =
            attend) or query's float dtype (added to the scaled scores; may require grad, its
            gradient is summed over the dims it was broadcast along).
        dropout_p (float): dropout on the attention probabilities (``F.dropout``, training).
        is_causal (bool): key j is masked for query i when j > i (top-left aligned); not
            together with attn_mask.
        scale (float, optional): default 1 / sqrt(E) (1 when E = 0: the scores are then 0).
        return_lse (bool): also return the log-sum-exp.

    Returns:
        Tensor[..., Lq, Ev] in query's dtype, and with ``return_lse`` a float32 Tensor[..., Lq]:
        log(sum_j exp(scale * q_i . k_j + mask_ij)) over the keys not masked, -inf for a fully
        masked row.

    A fully masked row (all keys masked by False, -inf or is_causal, or Lk = 0) gives zeros and
    zero gradients. NaN in query, an unmasked key or value, or the float mask propagates to the
    rows that read it. float16/bfloat16 are computed in float32, the output rounded once.
    """
    check_attention_args(OP, query, key, value, attn_mask, dropout_p, is_causal, scale)
    out_dtype = query.dtype
    dtype = torch.float32 if query.dtype in C.HALF_TYPES else query.dtype
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    e, lq, lk = q.shape[-1], q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(e) if e > 0 else 1.0

    scores = torch.matmul(q, k.transpose(-2, -1)) * float(scale)  # [..., Lq, Lk]
    attend = None  # bool, broadcastable to scores: where keys may be attended
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attend = attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask.to(dtype)
    elif is_causal:
        attend = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
    if attend is not None:
        scores = scores.masked_fill(~attend, -math.inf)

    # A softmax that keeps fully masked rows (every score -inf) finite in value and gradient.
    if lk > 0:
        row_max = scores.detach().amax(dim=-1, keepdim=True)
    else:
        row_max = scores.new_full((*scores.shape[:-1], 1), -math.inf)
    row_max = row_max.masked_fill(row_max == -math.inf, 0.0)  # NaN stays NaN
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    empty = total == 0  # only fully masked rows: an attended key's weight at the max is 1
    probs = weights / total.masked_fill(empty, 1.0)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=float(dropout_p), training=True)
    out = torch.matmul(probs, v).to(out_dtype)
    if not return_lse:
        return out
    lse = (row_max + torch.log(total.masked_fill(empty, 1.0))).masked_fill(empty, -math.inf)
    return out, lse.squeeze(-1).to(torch.float32)
