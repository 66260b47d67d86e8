"""MultiheadAttention: drop-in for torch.nn.MultiheadAttention, built on
:func:`mlkernels.ops.scaled_dot_product_attention`, with attention weights recovered from the op's
log-sum-exp instead of torch's math path."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import _checks as C
from ..ops._checks import ShapeError, shape_str

_NAME = "MultiheadAttention"


class _ProbsFromLse(torch.autograd.Function):
    """``p = exp(scores - lse[..., None])``, with softmax's backward.

    ``lse`` is the op's log-sum-exp of ``scores`` over the last dim (no gradient needed from it):
    the backward is that of ``softmax(scores)``, ``p * (g - sum(g * p))``, so the weights have the
    gradient torch's weights have whether or not the op's ``lse`` is differentiable. A row with
    ``lse == -inf`` (every key masked) gives zeros, and zero gradient.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, lse: Tensor) -> Tensor:  # type: ignore[override]
        lse = lse.to(scores.dtype)
        lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        # In place: scores is the caller's own buffer of [N, H, L, S], as large as the weights;
        # a new one would cost an allocation of that size, and its page faults.
        ctx.mark_dirty(scores)
        probs = scores.sub_(lse.unsqueeze(-1)).exp_()
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (probs,) = ctx.saved_tensors
        grad_scores = probs * (grad - (grad * probs).sum(-1, keepdim=True))
        return grad_scores, None


def _append_key_columns(mask: Tensor | None, count: int, attend: Tensor | float) -> Tensor | None:
    """Append ``count`` key columns filled with ``attend`` (True for a bool mask that says
    "attend", 0.0 for an additive one) to the last dim of ``mask``."""
    if mask is None or count == 0:
        return mask
    extra = mask.new_full((*mask.shape[:-1], count), attend)
    return torch.cat([mask, extra], dim=-1)


class MultiheadAttention(nn.MultiheadAttention):
    r"""Multi-head attention; a drop-in for :class:`torch.nn.MultiheadAttention`.

    Same constructor (``embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
    add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None, dtype=None``), same
    parameters and parameter names (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``,
    ``bias_k``, ``bias_v``, ``out_proj``), so the state dict of a torch module loads unchanged and
    the other way round. The attention itself is :func:`mlkernels.ops.scaled_dot_product_attention`
    (equivalent PyTorch code: :func:`mlkernels.reference.scaled_dot_product_attention`).

    Shapes (``N`` batch, ``L`` target length, ``S`` source length, ``E`` = embed_dim, ``H`` heads):

    - ``query`` Tensor[L, N, E] (Tensor[N, L, E] with ``batch_first``) or Tensor[L, E] unbatched
    - ``key`` Tensor[S, N, kdim] / Tensor[N, S, kdim] / Tensor[S, kdim]
    - ``value`` Tensor[S, N, vdim] / Tensor[N, S, vdim] / Tensor[S, vdim]
    - ``key_padding_mask`` Tensor[N, S] (Tensor[S] unbatched): bool, True = key is padding
      (ignored), or float, added to the scores of that key
    - ``attn_mask`` Tensor[L, S] or Tensor[N*H, L, S] (Tensor[H, L, S] unbatched): bool, True =
      NOT allowed to attend (torch MHA's convention, the opposite of SDPA's), or float, added to
      the scores. A float mask gets gradients (a learnable bias).
    - returns ``attn_output`` shaped as ``query`` (last dim E), and ``attn_weights``:
      Tensor[N, L, S] averaged over heads (``average_attn_weights``) or Tensor[N, H, L, S]
      (Tensor[L, S] / Tensor[H, L, S] unbatched), or None when ``need_weights=False``. With
      ``add_bias_kv`` / ``add_zero_attn`` each adds one key column, S + 1 / S + 2 in the weights.

    Masks: both masks become one mask for the op, broadcast as [N, 1|H, L, S] without building
    [N, H, L, S] unless a 3-D ``attn_mask`` already is that size: key padding alone is passed as
    [N, 1, 1, S], a 2-D ``attn_mask`` alone as [L, S], both as [N, 1, L, S]. Two bool masks stay
    bool (SDPA's convention, True = attend); a float one makes the merged mask float, bool parts
    becoming -inf, as torch does.

    ``is_causal`` is a hint, as in torch: it needs ``attn_mask`` (the causal mask) as well. Without
    ``key_padding_mask``, ``add_bias_kv`` or ``add_zero_attn`` the op's causal mode (key j > query
    i masked) runs and ``attn_mask`` is not read; otherwise ``attn_mask`` is used.

    Attention weights: ``exp(scale * q @ k^T + mask - lse)`` from the op's float32 log-sum-exp
    (softmax's gradient flows through them); for float64 inputs ``lse`` is taken again from the
    scores in float64, so that the weights have float64's precision. Differences from torch: a
    row whose keys are all masked gives zero weights and a zero output row (torch gives NaN); in
    training with ``dropout > 0`` the weights returned are the probabilities before dropout
    (torch returns them after its dropout). torch's inference fast
    path (``torch._native_multi_head_attention``) is never taken.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # torch's constructor checks with bare asserts and messages without the class name.
        embed_dim = C.as_int(_NAME, "embed_dim", embed_dim)
        num_heads = C.as_int(_NAME, "num_heads", num_heads)
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(
                f"{_NAME}: embed_dim and num_heads must be positive with embed_dim divisible by "
                f"num_heads, got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        for name, dim in (("kdim", kdim), ("vdim", vdim)):
            if dim is not None and C.as_int(_NAME, name, dim) <= 0:
                raise ValueError(f"{_NAME}: {name} must be positive or None, got {dim}")
        p = C.as_float(_NAME, "dropout", dropout)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{_NAME}: dropout must be in [0, 1], got {dropout}")
        try:
            super().__init__(
                embed_dim,
                num_heads,
                p,
                bias,
                add_bias_kv,
                add_zero_attn,
                kdim,
                vdim,
                batch_first,
                device,
                dtype,
            )
        except (RuntimeError, TypeError) as error:  # parameters beyond memory or int64
            raise RuntimeError(
                f"{_NAME}: the parameters for embed_dim={embed_dim}, kdim={kdim}, vdim={vdim} "
                f"could not be allocated ({str(error).strip().splitlines()[0]})"
            ) from None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise ValueError(
                f"{_NAME}: is_causal is a hint that attn_mask is the causal mask, so it needs "
                "attn_mask too (torch.nn.Transformer.generate_square_subsequent_mask makes one), "
                "got attn_mask=None"
            )

        # Work batch-first: [N, L, E]. Keep "query is key is value" for the packed projection.
        same_kv = key is value
        same_qk = query is key
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if same_kv:
            value = key
            if same_qk:
                query = key

        batch, tgt_len, _ = query.shape
        src_len = key.shape[1]
        num_heads, head_dim = self.num_heads, self.head_dim
        q, k, v = self._in_projection(query, key, value)

        extra_keys = 0
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, self.embed_dim)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, self.embed_dim)], dim=1)
            extra_keys += 1
        # [N, len, E] -> [N, H, len, head_dim]
        q = q.view(batch, tgt_len, num_heads, head_dim).transpose(1, 2)
        k = k.view(batch, k.shape[1], num_heads, head_dim).transpose(1, 2)
        v = v.view(batch, v.shape[1], num_heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:
            zeros = q.new_zeros(batch, num_heads, 1, head_dim)
            k = torch.cat([k, zeros], dim=2)
            v = torch.cat([v, zeros], dim=2)
            extra_keys += 1

        use_causal = is_causal and key_padding_mask is None and extra_keys == 0
        if use_causal:
            mask = None
        else:
            mask = self._merge_masks(
                attn_mask, key_padding_mask, batch, tgt_len, src_len, extra_keys, query.dtype
            )

        scale = 1.0 / math.sqrt(head_dim)
        dropout_p = self.dropout if self.training else 0.0
        result = ops.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=use_causal,
            scale=scale,
            return_lse=need_weights,
        )
        out, lse = result if need_weights else (result, None)

        out = out.transpose(1, 2).reshape(batch, tgt_len, self.embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)

        weights = None
        if lse is not None:
            if use_causal:
                key_count = k.shape[2]
                causal = torch.ones(tgt_len, key_count, dtype=torch.bool, device=q.device)
                mask = causal.tril()
            weights = self._weights(q, k, mask, lse, scale)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    # ---- pieces -------------------------------------------------------------------------------

    def _check_inputs(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
    ) -> bool:
        """Torch's shape rules, our messages. Returns whether the input is batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            C.check_tensor(_NAME, name, t)
            if not t.is_floating_point():
                raise TypeError(
                    f"{_NAME}: {name} must be a floating tensor, got {C.dtype_str(t.dtype)}"
                )
        weight = self.out_proj.weight
        # Under autocast the projections cast their inputs, as torch's module allows.
        kind = query.device.type  # "meta" has no autocast: asking would raise
        autocast = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dtype != weight.dtype and not autocast:
                raise RuntimeError(
                    f"{_NAME}: {name} must have the module's dtype ({C.dtype_str(weight.dtype)}), "
                    f"got {C.dtype_str(t.dtype)}"
                )
        for name, t in (
            ("query", query),
            ("key", key),
            ("value", value),
            ("key_padding_mask", key_padding_mask),
            ("attn_mask", attn_mask),
        ):
            if t is None:
                continue
            C.check_tensor(_NAME, name, t)
            if t.device != weight.device:
                raise RuntimeError(
                    f"{_NAME}: {name} must be on the module's device ({weight.device}), "
                    f"got {t.device}"
                )
        if query.dim() not in (2, 3):
            raise ShapeError(
                f"{_NAME}: query must be Tensor[L, N, E], Tensor[N, L, E] (batch_first) or "
                f"Tensor[L, E] (unbatched), got {shape_str(query)}"
            )
        batched = query.dim() == 3
        kind = "batched (3-D)" if batched else "unbatched (2-D)"
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ShapeError(
                f"{_NAME}: for a {kind} query, key and value must be {query.dim()}-D, got key "
                f"{shape_str(key)} and value {shape_str(value)}"
            )
        seq_dim = 1 if batched and self.batch_first else 0
        batch_dim = 1 - seq_dim if batched else None
        if query.shape[-1] != self.embed_dim:
            raise ShapeError(
                f"{_NAME}: query's last dim must be embed_dim={self.embed_dim}, got "
                f"{shape_str(query)}"
            )
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ShapeError(
                f"{_NAME}: key's and value's last dims must be kdim={self.kdim} and "
                f"vdim={self.vdim}, got key {shape_str(key)} and value {shape_str(value)}"
            )
        if key.shape[:-1] != value.shape[:-1]:
            raise ShapeError(
                f"{_NAME}: key and value must agree in sequence and batch dims, got key "
                f"{shape_str(key)} and value {shape_str(value)}"
            )
        if batch_dim is not None and key.shape[batch_dim] != query.shape[batch_dim]:
            raise ShapeError(
                f"{_NAME}: key's batch dim must be query's, got query {shape_str(query)} and "
                f"key {shape_str(key)}"
            )
        tgt_len, src_len = query.shape[seq_dim], key.shape[seq_dim]
        batch = query.shape[batch_dim] if batch_dim is not None else 1
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
                raise TypeError(f"{_NAME}: {name} must be bool or floating, got {mask.dtype}")
        if key_padding_mask is not None:
            expected = (batch, src_len) if batched else (src_len,)
            if tuple(key_padding_mask.shape) != expected:
                raise ShapeError(
                    f"{_NAME}: key_padding_mask must be Tensor[{', '.join(map(str, expected))}] "
                    f"for query {shape_str(query)} and key {shape_str(key)}, got "
                    f"{shape_str(key_padding_mask)}"
                )
        if attn_mask is not None:
            shapes = [(tgt_len, src_len), (batch * self.num_heads, tgt_len, src_len)]
            if tuple(attn_mask.shape) not in shapes:
                allowed = " or ".join("Tensor[" + ", ".join(map(str, s)) + "]" for s in shapes)
                raise ShapeError(
                    f"{_NAME}: attn_mask must be {allowed} for query {shape_str(query)}, key "
                    f"{shape_str(key)} and {self.num_heads} heads, got {shape_str(attn_mask)}"
                )
        return batched

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
        """q, k, v projected to embed_dim, each [N, len, E]."""
        bias_q = bias_k = bias_v = None
        if self.in_proj_bias is not None:
            bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)
        if not self._qkv_same_embed_dim:
            return (
                F.linear(query, self.q_proj_weight, bias_q),
                F.linear(key, self.k_proj_weight, bias_k),
                F.linear(value, self.v_proj_weight, bias_v),
            )
        if query is key and key is value:  # self-attention: one matrix product
            return tuple(F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
        weight_q, weight_k, weight_v = self.in_proj_weight.chunk(3)
        return (
            F.linear(query, weight_q, bias_q),
            F.linear(key, weight_k, bias_k),
            F.linear(value, weight_v, bias_v),
        )

    def _merge_masks(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        batch: int,
        tgt_len: int,
        src_len: int,
        extra_keys: int,
        dtype: torch.dtype,
    ) -> Tensor | None:
        """One mask for the op, in SDPA's convention (bool True = attend, float added), that
        broadcasts to [N, H, L, S + extra_keys]: [L, S'], [N, 1, 1, S'], [N, 1, L, S'] or
        [N, H, L, S'] (only when attn_mask is 3-D). The extra key columns (bias_k, zero attention)
        are always attended."""
        masks = []
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.reshape(batch, self.num_heads, tgt_len, src_len)
            masks.append(attn_mask)
        if key_padding_mask is not None:
            masks.append(key_padding_mask.reshape(batch, 1, 1, src_len))
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            # torch MHA: True = masked; SDPA: True = attend.
            merged = ~masks[0] if len(masks) == 1 else ~(masks[0] | masks[1])
            return _append_key_columns(merged, extra_keys, True)
        additive = [
            m.to(dtype)
            if m.is_floating_point()
            else torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf"))
            for m in masks
        ]
        merged = additive[0] if len(additive) == 1 else additive[0] + additive[1]
        return _append_key_columns(merged, extra_keys, 0.0)

    def _weights(
        self, q: Tensor, k: Tensor, mask: Tensor | None, lse: Tensor, scale: float
    ) -> Tensor:
        """Per-head attention probabilities [N, H, L, S'] from the op's log-sum-exp."""
        compute = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
        # One buffer of [N, H, L, S] for the scores and then the weights, changed in place (the
        # same operations, so the same bits, as out-of-place ones); the product's backward needs
        # its inputs, not its output.
        scores = (q.to(compute) @ k.to(compute).transpose(-2, -1)).mul_(scale)
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill_(~mask, float("-inf"))
            else:
                scores = scores.add_(mask.to(compute))
        if compute == torch.float64:
            # The op's log-sum-exp is float32 (its contract): float64 weights take one more
            # reduction over the scores for theirs, or they would be float32-accurate only.
            lse = torch.logsumexp(scores.detach(), dim=-1)
        return _ProbsFromLse.apply(scores, lse).to(q.dtype)
