"""Comparison helpers for code that checks mlkernels against other implementations.

``assert_coords_close`` states how close box coordinates from ``decode_boxes``/``encode_boxes``
(and ``propose``) are to torchvision's: not bit-equal, because ``exp``/``log`` come from the C
library in our kernels and from torch's vectorized (SLEEF) or scalar code in torchvision's, which
differ by up to one ulp and not in the same places on every CPU.
"""

from __future__ import annotations

import torch


def assert_coords_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Box coordinates (or deltas) from two implementations agree to a few ulps of the largest
    magnitude present: ``|actual - expected| <= 8 * eps * max|expected| + rtol * |expected|``
    (rtol: torch's default, 1.3e-6 for float32, 1e-7 for float64); NaN equals NaN.

    x1 = cx - w/2 cancels: a one-ulp difference in exp() moves a small x1 by an ulp of cx, not of
    x1, so the absolute tolerance scales with the largest magnitude present.
    """
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    rtol = {torch.float32: 1.3e-6, torch.float64: 1e-7}[expected.dtype]
    atol = 8 * torch.finfo(expected.dtype).eps * scale
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


__all__ = ["assert_coords_close"]
