"""LabelBeamSearch: the Order-Free RNN's beam search decoder as a layer."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..ops.beam_search import (
    BeamSearchResult,
    StepFn,
    _raw_advance,
    _raw_backtrack,
    _settings,
    check_search_settings,
    decode,
)


class LabelBeamSearch(nn.Module):
    """Beam search over label sets as a layer; see :func:`mlkernels.ops.beam_search`.

    Args:
        beam_size: K, the beams kept per image (>= 1).
        max_length: the most labels of a set (>= 1; None: the number of labels).
        threshold: a path stops when its probability would fall below this, in [0, 1].

    ``forward(step_fn, state, batch_size, num_labels) -> BeamSearchResult``: ``step_fn`` and
    ``state`` as :func:`mlkernels.ops.beam_search` takes them (state rows B * K, beam b * K + k);
    returns labels Tensor[B, K, T], scores Tensor[B, K] and lengths Tensor[B, K], best first.
    """

    def __init__(self, beam_size: int = 5, max_length: int | None = None, threshold: float = 0.0):
        super().__init__()
        settings = check_search_settings("LabelBeamSearch", beam_size, max_length, threshold)
        self.beam_size, self.max_length, self.threshold = settings

    def forward(
        self, step_fn: StepFn, state: Any, batch_size: int, num_labels: int
    ) -> BeamSearchResult:
        settings = _settings(
            "LabelBeamSearch",
            batch_size,
            num_labels,
            self.beam_size,
            self.max_length,
            self.threshold,
        )
        return decode(_raw_advance, _raw_backtrack, step_fn, state, "LabelBeamSearch", **settings)

    def extra_repr(self) -> str:
        return (
            f"beam_size={self.beam_size}, max_length={self.max_length}, threshold={self.threshold}"
        )
