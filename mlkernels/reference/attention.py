"""Pure-PyTorch scaled_dot_product_attention: the contract of
mlkernels.ops.scaled_dot_product_attention (torch.nn.functional.scaled_dot_product_attention's
semantics, plus fully masked rows that give zeros and finite gradients, NaN that propagates, and
the log-sum-exp of every query row).

The scores [..., Lq, Lk] are materialized in float32 (float16/bfloat16 inputs) or the inputs'
own dtype (float32, float64); a fully masked row is handled explicitly, so no gradient becomes
NaN. The argument checks are the ops wrapper's (mlkernels.ops.attention.check_attention_args)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..ops import _checks as C
from ..ops.attention import OP, check_attention_args


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
