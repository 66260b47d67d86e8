"""Input generators shared by the tests."""

from __future__ import annotations

import torch


def random_boxes(
    n: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    size: float = 100.0,
    min_side: float = 1.0,
    max_side: float = 50.0,
    offset: float = 0.0,
) -> torch.Tensor:
    """n boxes (x1, y1, x2, y2) with corners in [offset, offset + size] and sides in
    [min_side, max_side]; min_side <= 0 allows degenerate (zero or negative-width) boxes."""
    x1y1 = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size + offset
    sides = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    sides = sides * (max_side - min_side) + min_side
    return torch.cat([x1y1, x1y1 + sides], dim=1).to(dtype)
