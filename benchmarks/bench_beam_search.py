"""beam_search_step vs the vectorized pure-PyTorch step (mlkernels.reference.beam_search_step: add
the scores, mask the pools and the threshold, flatten, top-k; Hugging Face's step plus the label
pool), at the Order-Free RNN's shapes (issue 10):

- one step at (B=256, K=8, C=80) (COCO's labels) and (B=64, K=16, C=1000), from a state in the
  middle of a search (all beams live, pools of 0-4 labels, some beams finished); target 10x;
- a full decode (ops.beam_search vs reference.beam_search, the same driver) of 32 images with a
  small LSTM step function (embedding 64, hidden 256, C=80, K=5, 8 steps), reporting the share of
  ours' time spent outside step_fn, i.e. in the search itself; target at most 10%.

Each case checks first that both sides give the same result, to the bit.
"""

from __future__ import annotations

import math
import time

import torch
from harness import Case, is_cuda

import mlkernels
from mlkernels.ops.beam_search import pool_words


def _mid_search_state(B: int, K: int, C: int, g: torch.Generator):
    log_probs = torch.randn(B, K, C, generator=g).log_softmax(-1)
    scores = -torch.rand(B, K, generator=g).sort(-1).values * 10
    used = torch.zeros(B, K, pool_words(C), dtype=torch.int64)
    for _ in range(4):  # up to 4 labels per pool
        label = torch.randint(0, C, (B, K), generator=g)
        used |= torch.nn.functional.one_hot(label // 64, pool_words(C)) << (label % 64)[..., None]
    finished = torch.rand(B, K, generator=g) < 0.1
    return log_probs, scores, used, finished


def _same_bits(ours, anchor) -> None:
    for a, b in zip(ours, anchor, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), (a, b)


class LstmLabeler:
    """The Order-Free RNN's decoder, small: image features initialize an LSTM cell whose input is
    the last label's embedding (label -1: a start token); a linear layer gives the label logits."""

    def __init__(self, num_labels: int, features: int = 512, embed: int = 64, hidden: int = 256):
        torch.manual_seed(0)
        self.init = torch.nn.Linear(features, hidden)
        self.embed = torch.nn.Embedding(num_labels + 1, embed)
        self.cell = torch.nn.LSTMCell(embed, hidden)
        self.head = torch.nn.Linear(hidden, num_labels)
        self.inside_s = 0.0  # seconds spent in step()

    @torch.no_grad()
    def initial_state(self, features: torch.Tensor, beams: int):
        h = torch.tanh(self.init(features)).repeat_interleave(beams, 0)
        return h, torch.zeros_like(h)

    @torch.no_grad()
    def step(self, last: torch.Tensor, state):
        start = time.perf_counter()
        h, c = self.cell(self.embed(last + 1), state)
        out = self.head(h).log_softmax(-1), (h, c)
        if h.is_cuda:
            torch.cuda.synchronize()
        self.inside_s += time.perf_counter() - start
        return out


def _search_share(search, model: LstmLabeler, device: str, runs: int = 20) -> float:
    """The share of search()'s time spent outside the model's step (median of runs); on CUDA up
    to the end of the search's last kernel (the final backtrack is queued, not waited for)."""
    shares = []
    for _ in range(runs):
        model.inside_s = 0.0
        start = time.perf_counter()
        search()
        if is_cuda(device):
            torch.cuda.synchronize()
        total = time.perf_counter() - start
        shares.append(1.0 - model.inside_s / total)
    return sorted(shares)[len(shares) // 2]


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    g = torch.Generator().manual_seed(0)
    out = []
    shapes = [(256, 8, 80), (64, 16, 1000)] if not quick else [(64, 8, 80), (16, 16, 1000)]
    for B, K, C in shapes:
        inputs = tuple(t.to(device) for t in _mid_search_state(B, K, C, g))
        settings = {"log_threshold": math.log(1e-4), "max_length": 10}
        out.append(
            Case(
                "beam_search",
                "step",
                f"B={B}, K={K}, C={C}",
                lambda i=inputs, s=settings: mlkernels.ops.beam_search_step(*i, **s),
                lambda i=inputs, s=settings: mlkernels.reference.beam_search_step(*i, **s),
                "reference step (add, mask, flatten, topk)",
                _same_bits,
                target_ratio=10.0,
            )
        )
    B, K, C = (32, 5, 80) if not quick else (8, 5, 80)
    model = LstmLabeler(C)
    for part in (model.init, model.embed, model.cell, model.head):
        part.to(device)
    features = torch.randn(B, 512, generator=g).to(device)
    args = {"batch_size": B, "num_labels": C, "beam_size": K, "max_length": 8}

    state = model.initial_state(features, K)  # the driver never writes into it

    def ours():
        return mlkernels.ops.beam_search(model.step, state, **args)

    def anchor():
        return mlkernels.reference.beam_search(model.step, state, **args)

    out.append(
        Case(
            "beam_search",
            "decode, LSTM step_fn",
            f"B={B}, K={K}, C={C}, 8 steps, hidden 256",
            ours,
            anchor,
            "reference.beam_search (same driver)",
            _same_bits,
            measures=lambda _row: {"search share of decode": _search_share(ours, model, device)},
            measure_targets={"search share of decode": "<= 0.1"},
        )
    )
    return out
