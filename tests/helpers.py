"""Input generators shared by the tests."""

from __future__ import annotations

import torch

from mlkernels.testing import assert_coords_close  # noqa: F401  (re-exported for the tests)


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


def assert_raises(fn, args: tuple, error: type[Exception], message: str, mode: str) -> None:
    """fn(*args) raises `error` matching `message`, in eager mode or ("fake") on fake tensors,
    where the op's fake kernel must repeat the C++ checks."""
    import pytest

    if mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as fake_mode:
            args = tuple(
                fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args
            )
            with pytest.raises(error, match=message):
                fn(*args)
    else:
        with pytest.raises(error, match=message):
            fn(*args)
