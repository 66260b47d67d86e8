"""The launch sites whose grid or shared memory grows with the input, at CUDA's limits, on the grid
emulator: just inside the limit the kernel runs; one past it the op refuses with a message that
names the op and the argument (the runners' own refusal, csrc/common/grid.h's launch_config_error,
is tested in tests/cpp/emulator_selftest.cpp).

The other launch sites cannot pass a limit: their grids are 1-D (x, up to 2^31 - 1 blocks, capped
at 4096 by launch_config_1d), their blocks at most 256 threads, and attention's tiles are chosen
to fit 48 KB of shared memory (falling back to a kernel without shared memory for wide heads)."""

from __future__ import annotations

import re

import pytest
import torch

pytestmark = pytest.mark.emulated

EMULATED = torch.ops.mlkernels_emulated
INF = float("inf")


def test_propose_images_past_the_old_grid_limit():
    """The NMS mask grid was (words, words, images), images along z, at most 65535; it is 1-D now
    (each block finds its group by a binary search), so an image count past 65535 works."""
    images = 65536
    deltas, objectness = torch.zeros(images, 1, 4), torch.zeros(images, 1)
    sizes = torch.full((images, 2), 16.0, dtype=torch.float64)
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    weights = [1.0, 1.0, 1.0, 1.0]
    boxes, _, counts, _ = EMULATED.propose(
        anchors, deltas, objectness, sizes, 10, 1, 0.7, 0.0, 0.0, weights, 4.0, False
    )
    assert counts.shape == (images,) and bool((counts == 1).all())
    assert torch.equal(boxes, anchors.expand(images, 1, 4))


def _step(namespace, beams: int):
    """beam_search_step of `namespace` on one row of K beams (only the first live), two labels."""
    scores = torch.full((1, beams), -INF)
    scores[:, 0] = 0.0
    used = torch.zeros(1, beams, 1, dtype=torch.int64)
    finished = torch.zeros(1, beams, dtype=torch.bool)
    log_probs = torch.log_softmax(torch.arange(beams * 2.0).reshape(1, beams, 2), -1)
    return namespace.beam_search_step(
        log_probs, scores, used, finished, log_threshold=-INF, max_length=2
    )


def test_beam_search_step_beams_at_the_shared_memory_limit():
    """A row's K beams live in the block's shared memory, at most 48 KB without an opt-in."""
    with pytest.raises(RuntimeError, match=r"beam_search_step: .* takes K up to \d+") as refused:
        _step(EMULATED, 5000)
    most = int(re.search(r"takes K up to (\d+)", str(refused.value)).group(1))
    assert 1000 < most < 5000
    got = _step(EMULATED, most)
    expected = _step(torch.ops.mlkernels, most)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match=rf"takes K up to {most} .*got K = {most + 1}"):
        _step(EMULATED, most + 1)
