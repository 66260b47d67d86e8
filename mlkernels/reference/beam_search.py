"""Pure-PyTorch beam search over label sets: the contracts of mlkernels.ops.beam_search_step,
beam_search_advance, beam_search_backtrack and beam_search, written with plain, vectorized tensor
operations (add the scores, mask, flatten, top-k), as Hugging Face's beam search does a step,
plus the label pool and the threshold stop.

torch.topk promises no order among equal values, so the top-k runs on int64 keys that pack a
candidate's score (order-preserving bits) above its index: the order is then the contract's
strict total order (score descending, then beam, then label ascending), with no ties at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..ops.beam_search import (
    MAX_CANDIDATES,
    WORD_BITS,
    BeamAdvance,
    BeamSearchResult,
    BeamStep,
    StepFn,
    _settings,
    decode,
)


def _ordered_bits(scores: Tensor) -> Tensor:
    """float32 scores as int64 whose order is the scores' order (-0.0 and +0.0 equal)."""
    bits = (scores + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 becomes +0.0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def beam_search_step(
    log_probs: Tensor,
    scores: Tensor,
    used: Tensor,
    finished: Tensor,
    *,
    log_threshold: float = -math.inf,
    max_length: int | None = None,
) -> BeamStep:
    """One step of beam search over label sets; the contract of
    :func:`mlkernels.ops.beam_search_step`, with the same results to the bit."""
    B, K, num_labels = log_probs.shape
    limit = min(max_length if max_length is not None else num_labels, num_labels)
    count = K * (num_labels + 1)
    if count > MAX_CANDIDATES:
        raise ValueError("beam_search_step: K * (C + 1) must be at most 2**32")
    device = log_probs.device
    labels = torch.arange(num_labels, device=device)
    # The pool as [B, K, C] bools, from the bitsets.
    words = used[:, :, labels // WORD_BITS]
    in_pool = ((words >> (labels % WORD_BITS)) & 1) == 1
    lengths = in_pool.sum(-1)
    candidates = scores[:, :, None] + log_probs.float()  # NaN stays NaN: invalid below
    present = scores > -math.inf
    live = present & ~finished & (lengths < limit)
    valid = live[..., None] & ~in_pool & (candidates > -math.inf) & (candidates >= log_threshold)
    carried = present & (finished | ~valid.any(-1))
    # Slot 0 of each beam: the beam itself, carried; slot c + 1: extended by label c.
    all_scores = torch.cat([scores[..., None], candidates], -1).view(B, count)
    all_valid = torch.cat([carried[..., None], valid], -1).view(B, count)
    index = torch.arange(count, device=device)
    keys = _ordered_bits(all_scores) * 2**32 + (count - 1 - index)
    keys = keys.masked_fill(~all_valid, torch.iinfo(torch.int64).min)
    top, chosen = keys.topk(K, dim=1)  # keys are unique: no ties
    selected = top != torch.iinfo(torch.int64).min
    parents = chosen // (num_labels + 1)
    added = chosen % (num_labels + 1) - 1
    out_scores = all_scores.gather(1, chosen)
    out_used = used.gather(1, parents[..., None].expand(B, K, used.shape[2])).clone()
    extended = selected & (added >= 0)
    word = added.clamp(min=0) // WORD_BITS
    bit = torch.ones_like(added) << (added.clamp(min=0) % WORD_BITS)
    one_hot = torch.arange(used.shape[2], device=device) == word[..., None]
    out_used |= torch.where(one_hot & extended[..., None], bit[..., None], 0)
    out_finished = ~extended | (lengths.gather(1, parents) + 1 >= limit)
    return BeamStep(
        out_scores.masked_fill(~selected, -math.inf),
        parents.masked_fill(~selected, -1),
        added.masked_fill(~selected, -1),
        out_used.masked_fill(~selected[..., None], 0),
        out_finished,
    )


def beam_search_advance(
    log_probs: Tensor,
    scores: Tensor,
    used: Tensor,
    finished: Tensor,
    state: Sequence[Tensor] = (),
    *,
    log_threshold: float = -math.inf,
    max_length: int | None = None,
) -> BeamAdvance:
    """:func:`mlkernels.ops.beam_search_advance`: the step above, its parents as rows of the
    search, and every state tensor's rows picked by them."""
    B, K = log_probs.shape[:2]
    for i, t in enumerate(state):
        if t.dim() == 0 or t.shape[0] != B * K:
            raise RuntimeError(
                f"beam_search_advance: state[{i}] must have leading dimension B * K = {B * K}, "
                f"got Tensor[{', '.join(str(s) for s in t.shape)}]"
            )
    step = beam_search_step(
        log_probs, scores, used, finished, log_threshold=log_threshold, max_length=max_length
    )
    first_rows = torch.arange(0, B * K, K, device=scores.device)[:, None] if K else 0
    sources = (step.parents.clamp(min=0) + first_rows).reshape(-1)
    reordered = [t.index_select(0, sources.to(t.device)) for t in state]
    labels = step.labels.reshape(-1)
    done = step.finished.all()
    return BeamAdvance(step.scores, sources, labels, step.used, step.finished, reordered, done)


def beam_search(
    step_fn: StepFn,
    state: Any,
    *,
    batch_size: int,
    num_labels: int,
    beam_size: int = 5,
    max_length: int | None = None,
    threshold: float = 0.0,
) -> BeamSearchResult:
    """:func:`mlkernels.ops.beam_search` with the pure-PyTorch step above."""
    settings = _settings("beam_search", batch_size, num_labels, beam_size, max_length, threshold)
    return decode(
        beam_search_advance, beam_search_backtrack, step_fn, state, "beam_search", **settings
    )


def beam_search_backtrack(
    sources: Tensor, labels: Tensor, scores: Tensor, width: int
) -> tuple[Tensor, Tensor]:
    """:func:`mlkernels.ops.beam_search_backtrack`: the row each final beam occupied at every step,
    followed back one step at a time, then every label in one gather."""
    steps, rows = sources.shape
    B, K = scores.shape
    present = scores.reshape(-1) > -math.inf  # an empty slot (-inf or NaN) is not followed
    out = torch.full((B, K, width), -1, dtype=torch.int64, device=scores.device)
    if steps:
        followed = [torch.arange(rows, device=scores.device)]
        for t in range(steps - 1, 0, -1):
            source = sources[t].index_select(0, followed[-1])
            if bool((((source < 0) | (source >= rows)) & present).any()):
                raise IndexError(
                    f"beam_search_backtrack: sources must hold rows in [0, R = {rows}), got a "
                    "value outside it"
                )
            followed.append(source.clamp(0, rows - 1))
        followed.reverse()
        chosen = labels.gather(1, torch.stack(followed))  # [T, R]
        out[:, :, :steps] = chosen.t().reshape(B, K, steps)
    # An empty slot has no path; a carried step added no label (-1 already).
    out.masked_fill_(~present.reshape(B, K, 1), -1)
    return out, (out >= 0).sum(-1)
