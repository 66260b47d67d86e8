"""generate_anchors / nms / batched_nms / propose: every implementation (CPU, the CUDA kernels'
logic on the grid emulator, CUDA) against torchvision and the reference; ties, IoU exactly at the
threshold, negative coordinates, NaN/Inf, large N; gradients, opcheck, bad input, empty input."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from helpers import ALL_IMPLS, DEVICE_IMPLS, assert_raises, impl_params, random_boxes, run_opcheck
from hypothesis import given
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator as TvAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from mlkernels import ops, reference
from mlkernels.ops import ProposeConfig

CLAMP = math.log(1000.0 / 16)
DTYPES = [torch.float32, torch.float64]
THRESHOLDS = [0.0, 0.25, 0.3, 0.5, 0.7, 1.0]


def _nms_inputs(
    seed, n, dtype, *, degenerate=False, ties=False, grid=False, offset=-50.0, size=100.0
):
    g = torch.Generator().manual_seed(seed)
    min_side = -5.0 if degenerate else 0.5
    boxes = random_boxes(n, generator=g, dtype=dtype, min_side=min_side, offset=offset, size=size)
    if grid:  # small integer boxes around the origin: IoUs of exactly 0, 1/4, 1/2, 1 are common
        boxes = (boxes / (size / 8)).round()
        if not degenerate:  # rounding must not make empty boxes
            boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    if ties:  # few distinct values: many equal scores
        scores = torch.randint(0, 4, (n,), generator=g).to(dtype) / 4
    else:
        scores = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    return boxes, scores


# ---- generate_anchors ----


@DEVICE_IMPLS
@given(
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    stride=st.sampled_from([4, 8, 16, 32]),
    sizes=st.lists(st.sampled_from([16, 32, 50, 64, 128, 256]), min_size=1, max_size=4),
    ratios=st.lists(st.sampled_from([0.5, 1.0, 2.0, 0.33, 3.0]), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
)
def test_generate_anchors_matches_torchvision(impl, height, width, stride, sizes, ratios, dtype):
    # torchvision's generator on the same device: a drop-in gives its anchors there
    device = impl.device
    generator = TvAnchorGenerator(sizes=(tuple(sizes),), aspect_ratios=(tuple(ratios),))
    images = ImageList(
        torch.zeros(1, 3, height * stride, width * stride, dtype=dtype, device=device),
        [(height * stride, width * stride)],
    )
    feature = torch.zeros(1, 1, height, width, dtype=dtype, device=device)
    expected = generator(images, [feature])[0]
    ours = ops.generate_anchors((height, width), stride, sizes, ratios, dtype=dtype, device=device)
    assert ours.dtype == dtype and ours.shape == (height * width * len(sizes) * len(ratios), 4)
    assert ours.device == expected.device
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        reference.generate_anchors(
            (height, width), stride, sizes, ratios, dtype=dtype, device=device
        ),
        expected,
        rtol=0,
        atol=0,
    )


def test_generate_anchors_rectangular_stride_and_empty():
    ours = ops.generate_anchors((2, 3), (8, 4), (16,), (1.0,))
    torch.testing.assert_close(ours, reference.generate_anchors((2, 3), (8, 4), (16,), (1.0,)))
    assert ours[1].tolist() == [-4.0, -8.0, 12.0, 8.0]  # x shift 4, then the next cell in x
    assert ours[3].tolist() == [-8.0, 0.0, 8.0, 16.0]  # second row: y shift 8
    assert ops.generate_anchors((0, 5), 16).shape == (0, 4)
    with pytest.raises(ValueError, match="generate_anchors: sizes and aspect_ratios must be"):
        ops.generate_anchors((2, 2), 16, sizes=())


# ---- nms ----


@ALL_IMPLS
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 300),
    dtype=st.sampled_from(DTYPES),
    threshold=st.sampled_from(THRESHOLDS),
    degenerate=st.booleans(),
    ties=st.booleans(),
    grid=st.booleans(),
)
def test_nms_matches_torchvision_and_reference(
    impl, seed, n, dtype, threshold, degenerate, ties, grid
):
    boxes, scores = _nms_inputs(seed, n, dtype, degenerate=degenerate, ties=ties, grid=grid)
    expected = torchvision.ops.nms(boxes, scores, threshold)
    ours = impl.call("nms", boxes, scores, threshold)
    assert ours.dtype == torch.int64
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(reference.nms(boxes, scores, threshold), expected, rtol=0, atol=0)


@ALL_IMPLS
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 200),
    threshold=st.sampled_from(THRESHOLDS),
    ties=st.booleans(),
    grid=st.booleans(),
)
def test_nms_satisfies_its_definition(impl, seed, n, threshold, ties, grid):
    # Independent of any other implementation: kept indices in processing order, no kept box
    # overlaps an earlier kept box by more than the threshold, every dropped box does overlap one.
    boxes, scores = _nms_inputs(seed, n, torch.float64, ties=ties, grid=grid)
    kept = impl.call("nms", boxes, scores, threshold).tolist()
    rank = {int(i): r for r, i in enumerate(torch.sort(scores, descending=True, stable=True)[1])}
    assert [rank[i] for i in kept] == sorted(rank[i] for i in kept)
    iou = reference.box_iou(boxes, boxes)
    for a, i in enumerate(kept):
        assert all(iou[i, j] <= threshold for j in kept[:a])
    kept_set = set(kept)
    for j in range(n):
        if j not in kept_set:
            assert any(iou[i, j] > threshold and rank[i] < rank[j] for i in kept)


def test_grid_inputs_put_ious_exactly_on_the_thresholds():
    # The property tests' `grid` boxes must really produce the adversarial cases they stand for.
    boxes, _ = _nms_inputs(0, 80, torch.float32, grid=True)
    iou = ops.box_iou(boxes, boxes)
    off_diagonal = ~torch.eye(80, dtype=torch.bool)
    for value in (0.0, 0.25, 0.5, 1.0):
        assert (iou[off_diagonal] == value).any(), value
    assert (boxes < 0).any()


@ALL_IMPLS
def test_nms_iou_exactly_at_threshold_is_not_suppressed(impl):
    # IoU of these two is exactly 0.5 (intersection 2, union 4) and exactly 1/3 with the third.
    boxes = torch.tensor([[0.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 1.0], [-2.0, 0.0, 2.0, 1.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    for dtype in DTYPES:
        b, s = boxes.to(dtype), scores.to(dtype)
        assert impl.call("box_iou", b[:1], b[1:2]).item() == 0.5
        for fn in (impl.op("nms"), torchvision.ops.nms):
            assert fn(b, s, 0.5).tolist() == [0, 1, 2]  # 0.5 > 0.5 is false
            assert fn(b, s, 0.49).tolist() == [0, 2]
            # IoU(0, 2) is float32(1/3), which lies above the double 1/3: torchvision compares
            # in double, so float32 suppresses box 2 and float64 (IoU exactly 1/3) does not.
            assert fn(b, s, 1 / 3).tolist() == ([0] if dtype == torch.float32 else [0, 2])


@ALL_IMPLS
def test_nms_large_n_matches_torchvision(impl):
    boxes, scores = _nms_inputs(3, 20000, torch.float32, size=2000.0, offset=-1000.0)
    # the emulator runs every thread one after the other: 2500 boxes (40 mask words a row) there
    n, threshold = (2500, 0.6) if impl.emulated else (20000, 0.5)
    boxes, scores = boxes[:n], scores[:n]
    expected = torchvision.ops.nms(boxes, scores, threshold)
    torch.testing.assert_close(impl.call("nms", boxes, scores, threshold), expected, rtol=0, atol=0)


@ALL_IMPLS
def test_nms_identical_boxes_and_all_equal_scores(impl):
    boxes = torch.tensor([[1.0, 1.0, 5.0, 5.0]]).repeat(10, 1)
    scores = torch.ones(10)
    for fn in (impl.op("nms"), torchvision.ops.nms):
        assert fn(boxes, scores, 0.5).tolist() == [0]  # the lowest index wins a tie
    boxes[:, 0] += torch.arange(10.0) * 10  # disjoint now: all kept, in index order
    assert impl.call("nms", boxes, scores, 0.5).tolist() == list(range(10))


@ALL_IMPLS
@pytest.mark.parametrize("dtype", DTYPES)
def test_nms_nan_and_inf_are_safe_and_match_torchvision(impl, dtype):
    boxes, scores = _nms_inputs(4, 60, dtype)
    boxes[3, 0] = float("nan")
    boxes[7, 2] = float("inf")
    boxes[8] = torch.tensor([-float("inf"), 0.0, float("inf"), 5.0])
    boxes[9, 3] = -float("inf")
    scores[11] = float("nan")
    scores[12] = float("inf")
    scores[13] = -float("inf")
    expected = torchvision.ops.nms(boxes, scores, 0.5)
    kept = impl.call("nms", boxes, scores, 0.5)
    assert ((kept >= 0) & (kept < 60)).all()
    torch.testing.assert_close(kept, expected, rtol=0, atol=0)
    assert kept[0] == 11  # NaN score first, as torch.sort
    assert 3 in kept.tolist()  # a NaN box is never suppressed


@ALL_IMPLS
def test_nms_non_contiguous_inputs(impl):
    boxes, scores = _nms_inputs(14, 120, torch.float32, ties=True)
    expected = torchvision.ops.nms(boxes, scores, 0.5)
    idxs = (torch.arange(240) % 3)[::2]
    expected_batched = reference.batched_nms(boxes, scores, idxs.contiguous(), 0.5)
    boxes, scores, all_idxs = impl.to(boxes, scores, torch.arange(240) % 3)  # strided there
    strided_boxes = boxes.t().contiguous().t()
    strided_scores = torch.stack([scores, scores], dim=1)[:, 0]
    idxs = all_idxs[::2]
    assert not strided_boxes.is_contiguous() and not strided_scores.is_contiguous()
    assert not idxs.is_contiguous()
    got = impl.call("nms", strided_boxes, strided_scores, 0.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got = impl.call("batched_nms", strided_boxes, strided_scores, idxs, 0.5)
    torch.testing.assert_close(got, expected_batched, rtol=0, atol=0)


# ---- batched_nms ----


@ALL_IMPLS
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 300),
    groups=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    threshold=st.sampled_from(THRESHOLDS),
    ties=st.booleans(),
    grid=st.booleans(),
)
def test_batched_nms_matches_reference_and_torchvision(
    impl, seed, n, groups, dtype, threshold, ties, grid
):
    boxes, scores = _nms_inputs(seed, n, dtype, ties=ties, grid=grid)  # negative coordinates too
    idxs = torch.randint(-2, groups - 2, (n,), generator=torch.Generator().manual_seed(seed))
    expected = reference.batched_nms(boxes, scores, idxs, threshold)
    ours = impl.call("batched_nms", boxes, scores, idxs, threshold)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # torchvision's per-group path is exact for any coordinates; it orders equal scores with an
    # unstable sort, so with ties only the kept set is comparable.
    tv = torchvision.ops.boxes._batched_nms_vanilla(boxes, scores, idxs, threshold)
    if ties:
        assert sorted(ours.tolist()) == sorted(tv.tolist())
    else:
        torch.testing.assert_close(ours, tv, rtol=0, atol=0)


@ALL_IMPLS
def test_batched_nms_negative_coordinates_need_no_offset_trick(impl):
    # Group 1 lies at negative coordinates; torchvision's offset trick (adding idx * (max + 1) to
    # every coordinate) moves it onto group 0's box and wrongly suppresses it. Per-group NMS
    # keeps both.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [-11.0, -11.0, -1.0, -1.0]])
    scores = torch.tensor([0.9, 0.8])
    idxs = torch.tensor([0, 1])
    trick = torchvision.ops.boxes._batched_nms_coordinate_trick
    assert trick(boxes, scores, idxs, 0.5).tolist() == [0]
    for fn in (impl.op("batched_nms"), reference.batched_nms):
        assert fn(boxes, scores, idxs, 0.5).tolist() == [0, 1]


@ALL_IMPLS
def test_batched_nms_huge_coordinates(impl):
    # Around 1e7 in float32 the coordinate trick's offsets cost precision (steps of 4 at 4e7) and
    # change IoUs, so it keeps other boxes than torchvision's exact per-group path; ours does not.
    boxes, _ = _nms_inputs(9, 400, torch.float32, size=200.0, offset=1e7)
    scores = torch.randperm(400, generator=torch.Generator().manual_seed(9)).float()
    idxs = torch.arange(400) % 4
    expected = torchvision.ops.boxes._batched_nms_vanilla(boxes, scores, idxs, 0.3)
    trick = torchvision.ops.boxes._batched_nms_coordinate_trick(boxes, scores, idxs, 0.3)
    assert not torch.equal(trick, expected)
    got = impl.call("batched_nms", boxes, scores, idxs, 0.3)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@ALL_IMPLS
def test_batched_nms_many_boxes_matches_torchvision(impl):
    # the emulator runs every thread one after the other: 8 x 200 boxes there
    per_group = 200 if impl.emulated else 1500
    boxes, _ = _nms_inputs(5, 8 * per_group, torch.float32, size=600.0, offset=0.0)
    # Distinct scores: torchvision's per-group path (used above 1000 boxes) sorts unstably.
    scores = torch.randperm(8 * per_group, generator=torch.Generator().manual_seed(5)).float()
    idxs = torch.arange(8).repeat_interleave(per_group)
    expected = torchvision.ops.batched_nms(boxes, scores, idxs, 0.7)
    got = impl.call("batched_nms", boxes, scores, idxs, 0.7)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    idxs32 = idxs.to(torch.int32)
    got = impl.call("batched_nms", boxes, scores, idxs32, 0.7)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _grouping(kind, n, generator):
    """idxs for n boxes: "many" groups of about 3 boxes, "one" group, "singletons" (every box its
    own group), "gaps" (4 group ids far apart: the ids between are empty groups), "mixed" (one
    big group across several 64-box mask words, one of 65 boxes, then singletons)."""
    if kind == "many":
        return torch.randint(0, max(1, n // 3), (n,), generator=generator)
    if kind == "one":
        return torch.full((n,), 7)
    if kind == "singletons":
        return torch.randperm(n, generator=generator) * 3 - n  # negative ids too
    if kind == "gaps":
        return torch.randint(0, 4, (n,), generator=generator) * 1000 - 2000
    big, medium = min(n, 150), max(0, min(n - 150, 65))
    idxs = torch.cat([torch.zeros(big), torch.ones(medium), torch.arange(n - big - medium) + 2])
    return idxs[torch.randperm(n, generator=generator)].long()


@ALL_IMPLS
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 300),
    grouping=st.sampled_from(["many", "one", "singletons", "gaps", "mixed"]),
    threshold=st.sampled_from(THRESHOLDS),
    ties=st.booleans(),
    grid=st.booleans(),
)
def test_batched_nms_groupings_match_cpu_and_torchvision(
    impl, seed, n, grouping, threshold, ties, grid
):
    # The CUDA kernels (emulated here) build a mask per group and reduce the groups in parallel;
    # every way of cutting the boxes into groups must give the CPU kernel's result to the bit.
    boxes, scores = _nms_inputs(seed, n, torch.float32, ties=ties, grid=grid)
    idxs = _grouping(grouping, n, torch.Generator().manual_seed(seed))
    ours = impl.call("batched_nms", boxes, scores, idxs, threshold)
    assert ours.dtype == torch.int64 and ours.shape == (len(set(ours.tolist())),)
    impl.assert_matches_cpu(ours, "batched_nms", boxes, scores, idxs, threshold)
    torch.testing.assert_close(
        ours, reference.batched_nms(boxes, scores, idxs, threshold), rtol=0, atol=0
    )
    tv = torchvision.ops.boxes._batched_nms_vanilla(boxes, scores, idxs, threshold)
    # torchvision orders equal scores with an unstable sort (float64 draws rounded to float32 can
    # tie even without `ties`: seed 79, n = 234)
    if scores.unique().numel() < n:
        assert sorted(ours.tolist()) == sorted(tv.tolist())
    else:
        torch.testing.assert_close(ours, tv, rtol=0, atol=0)


def _group_mask_words(n):
    # Per group of n boxes, each row i holds the 64-bit words from its own (i // 64) to the last
    # of ceil(n / 64).
    words = -(-n // 64)
    return sum(words - i // 64 for i in range(n))


def _torchvision_mask_bytes(n):
    # What torchvision's CUDA nms allocates for n boxes: n rows of ceil(n / 64) words.
    return n * -(-n // 64) * 8


def _chunk_mask_words(group_sizes):
    # The rule of nms_chunk_budget / plan_nms_chunks (proposals_kernels.h): consecutive groups in
    # chunks of at most max(one torchvision mask of the largest group, a word per box) mask
    # words; the one mask buffer holds the largest chunk.
    largest = max(group_sizes)
    budget = max(largest * -(-largest // 64), sum(group_sizes))
    chunks = [[]]
    for n in group_sizes:
        if chunks[-1] and sum(map(_group_mask_words, chunks[-1] + [n])) > budget:
            chunks.append([])
        chunks[-1].append(n)
    return [sum(map(_group_mask_words, chunk)) for chunk in chunks], budget


def _nms_allocations(impl, group_sizes, order_seed=0):
    # The emulated batched_nms on groups of the given sizes (group g: id g, boxes shuffled):
    # (every allocation it makes, the mask's: the one tensor the op allocates itself, not through
    # another ATen op).
    n = sum(group_sizes)
    boxes, scores = _nms_inputs(order_seed, n, torch.float32, size=600.0)
    g = torch.Generator().manual_seed(order_seed)
    idxs = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
    idxs = idxs[torch.randperm(n, generator=g)]
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        kept = impl.call("batched_nms", boxes, scores, idxs, 0.5)
    impl.assert_matches_cpu(kept, "batched_nms", boxes, scores, idxs, 0.5)
    events = [e for e in prof.events() if e.self_cpu_memory_usage > 0]
    masks = [
        e.self_cpu_memory_usage
        for e in events
        if e.name == "aten::empty"
        and e.cpu_parent is not None
        and "batched_nms" in e.cpu_parent.name
    ]
    assert len(masks) == 1, masks  # one mask buffer, whatever the number of chunks
    return [e.self_cpu_memory_usage for e in events], masks[0]


@pytest.mark.parametrize("impl", impl_params("emulated"))
def test_batched_nms_mask_is_per_group_in_chunks(impl):
    # The CUDA kernels' only quadratic allocation is the suppression mask, a mask per group (so 8
    # groups of 600 boxes need about a seventh of what one group of 4800 does) built and reduced
    # in chunks of consecutive groups that reuse one buffer: at most one torchvision mask of the
    # largest group (torchvision runs its groups one after another with one mask alive), or a
    # word per box when the groups are small. Everything else is per box: the boxes in list
    # order (16 bytes each) are the largest.
    assert _group_mask_words(600) * 8 == 27_840 and _torchvision_mask_bytes(600) == 48_000
    assert _group_mask_words(4800) * 8 == 1_459_200

    # 8 x 600: two groups' masks (55,680 bytes) exceed the budget, so one group per chunk.
    allocations, mask = _nms_allocations(impl, [600] * 8)
    assert _chunk_mask_words([600] * 8) == ([3480] * 8, 6000)
    assert mask == 27_840 <= _torchvision_mask_bytes(600) <= 2 * _torchvision_mask_bytes(600)
    assert max(allocations) == 4800 * 16

    # One group: its whole mask.
    allocations, mask = _nms_allocations(impl, [4800])
    assert mask == max(allocations) == 1_459_200

    # Boxes alone: a word each, all in one chunk.
    allocations, mask = _nms_allocations(impl, [1] * 4800)
    assert mask == 4800 * 8 and max(allocations) == 4800 * 16

    # Several chunks of several groups each: a group of 640 (3520 words; the budget is its
    # torchvision mask, 6400 words) takes twelve of 100 boxes (164 words each) beside it.
    sizes = ([640] + [100] * 12) * 3
    chunks, budget = _chunk_mask_words(sizes)
    assert budget == 6400 and chunks == [3520 + 12 * 164] * 3
    allocations, mask = _nms_allocations(impl, sizes)
    assert mask == 5488 * 8 <= _torchvision_mask_bytes(640) and max(allocations) == 5520 * 16

    # One group larger than all the others together, in the middle: the budget it sets holds
    # every group, so they all run in one chunk, within torchvision's mask of the big group.
    sizes = [40] * 10 + [1000] + [30] * 10
    chunks, budget = _chunk_mask_words(sizes)
    assert 1000 > sum(sizes) - 1000 and budget == 16_000
    assert chunks == [400 + _group_mask_words(1000) + 300] == [9380]
    allocations, mask = _nms_allocations(impl, sizes)
    assert mask == 9380 * 8 <= _torchvision_mask_bytes(1000)
    assert max(allocations) == mask


@pytest.mark.parametrize("impl", impl_params("emulated"))
def test_cuda_nms_refuses_a_group_beyond_its_shared_memory(impl):
    # The reduce keeps a group's removed set (a bit per box) in 48 KB of shared memory, next to
    # 64 words of its own: 6080 words, 389,120 boxes. One more is refused before the mask is
    # allocated.
    n = 6080 * 64 + 1
    boxes, scores = torch.zeros(n, 4), torch.zeros(n)
    message = "batched_nms: the CUDA NMS takes at most 389120 boxes per group .* got 389121"
    idxs = torch.cat([torch.ones(5), torch.zeros(n), torch.full((5,), 2.0)]).long()
    assert torch.bincount(idxs).tolist() == [n, 5, 5]
    with pytest.raises(RuntimeError, match=message):
        impl.call("batched_nms", torch.zeros(n + 10, 4), torch.zeros(n + 10), idxs, 0.5)
    with pytest.raises(RuntimeError, match="nms: the CUDA NMS takes at most 389120 boxes "):
        impl.call("nms", boxes, scores, 0.5)
    anchors = torch.zeros(n, 4)
    args = (anchors, torch.zeros(1, n, 4), torch.zeros(1, n), torch.tensor([[10, 10]]), n, 5)
    with pytest.raises(RuntimeError, match="389120 candidates per image .* got 389121"):
        impl.call("propose", *args, 0.7, 0.0, 0.0, [1.0] * 4, CLAMP, False)


# ---- propose ----


def _propose_inputs(seed, images, height, width, dtype, *, spread=0.5, ties=False):
    g = torch.Generator().manual_seed(seed)
    anchors = ops.generate_anchors((height, width), 16, (16, 32, 64), (0.5, 1.0, 2.0), dtype=dtype)
    a = anchors.shape[0]
    deltas = (torch.randn(images, a, 4, generator=g, dtype=torch.float64) * spread).to(dtype)
    objectness = torch.randn(images, a, generator=g, dtype=torch.float64).to(dtype) * 3
    if ties:  # few distinct logits: the top-k and the NMS order are decided by anchor index
        objectness = objectness.round()
    sizes = [
        (
            int(torch.randint(height * 8, height * 16 + 1, (1,), generator=g)),
            int(torch.randint(width * 8, width * 16 + 1, (1,), generator=g)),
        )
        for _ in range(images)
    ]
    return anchors, deltas, objectness, sizes


def _assert_proposals_equal(ours, expected, exact=False):
    tol = {"rtol": 0, "atol": 0} if exact else {}
    boxes, scores, counts = ours[:3]
    torch.testing.assert_close(counts, expected[2], rtol=0, atol=0)
    torch.testing.assert_close(boxes, expected[0], **tol)
    torch.testing.assert_close(scores, expected[1], **tol)


@ALL_IMPLS
@given(
    seed=st.integers(0, 2**31),
    images=st.integers(0, 3),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    pre=st.sampled_from([0, 1, 20, 100, 1000]),
    post=st.sampled_from([0, 1, 10, 50]),
    threshold=st.sampled_from([0.3, 0.5, 0.7, 1.0]),
    min_size=st.sampled_from([1e-3, 8.0, 30.0]),
    score_threshold=st.sampled_from([0.0, 0.3]),
    append=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    ties=st.booleans(),
)
def test_propose_matches_reference(
    impl,
    seed,
    images,
    height,
    width,
    pre,
    post,
    threshold,
    min_size,
    score_threshold,
    append,
    dtype,
    ties,
):
    anchors, deltas, objectness, sizes = _propose_inputs(
        seed, images, height, width, dtype, ties=ties
    )
    kwargs = dict(
        pre_nms_top_n=pre,
        post_nms_top_n=post,
        iou_threshold=threshold,
        min_size=min_size,
        score_threshold=score_threshold,
        weights=(1.0, 1.0, 2.0, 2.0),
        append_whole_image=append,
    )
    size_t = torch.tensor(sizes, dtype=torch.float64).reshape(images, 2)
    args = (anchors, deltas, objectness, size_t, *ProposeConfig(**kwargs).op_args())
    ours = impl.call("propose", *args)
    rows = post + int(append)
    assert ours[0].shape == (images, rows, 4) and ours[1].shape == (images, rows)
    assert ours[2].shape == (images,) and ours[2].dtype == torch.int64
    _assert_proposals_equal(ours, reference.propose(anchors, deltas, objectness, sizes, **kwargs))
    impl.assert_matches_cpu(ours, "propose", *args)
    # rows past the count are zero; kept scores are sorted
    for i in range(images):
        c = int(ours[2][i])
        assert (ours[0][i, c:] == 0).all() and (ours[1][i, c:] == 0).all()
        kept = ours[1][i, : c - int(append)]
        assert (kept[:-1] >= kept[1:]).all()


def _torchvision_rpn_proposals(anchors, deltas, objectness, sizes, pre, post, thr, min_size):
    """torchvision's own RegionProposalNetwork.filter_proposals on the decoded boxes."""
    rpn = RegionProposalNetwork(
        TvAnchorGenerator(),
        RPNHead(1, 1),
        0.7,
        0.3,
        256,
        0.5,
        pre_nms_top_n=dict(training=pre, testing=pre),
        post_nms_top_n=dict(training=post, testing=post),
        nms_thresh=thr,
        score_thresh=0.0,
    ).eval()
    rpn.min_size = min_size
    proposals = (
        BoxCoder((1.0, 1.0, 1.0, 1.0))
        .decode_single(deltas.reshape(-1, 4), anchors.repeat(len(sizes), 1))
        .reshape(len(sizes), -1, 4)
    )
    return rpn.filter_proposals(proposals, objectness, sizes, [anchors.shape[0]])


@ALL_IMPLS
@given(seed=st.integers(0, 2**31), images=st.integers(1, 3))
def test_propose_matches_torchvision_rpn(impl, seed, images):
    anchors, deltas, objectness, sizes = _propose_inputs(seed, images, 6, 8, torch.float32)
    config = ProposeConfig(pre_nms_top_n=300, post_nms_top_n=40)
    boxes, scores, counts, _ = impl.call(
        "propose", anchors, deltas, objectness, torch.tensor(sizes), *config.op_args()
    )
    tv_boxes, tv_scores = _torchvision_rpn_proposals(
        anchors, deltas, objectness, sizes, 300, 40, 0.7, 1e-3
    )
    assert (counts > 0).all()
    for i in range(images):
        assert counts[i] == len(tv_boxes[i])
        torch.testing.assert_close(boxes[i, : counts[i]], tv_boxes[i])
        torch.testing.assert_close(scores[i, : counts[i]], tv_scores[i])


@ALL_IMPLS
def test_propose_rlsd_shape_matches_reference(impl):
    anchors, deltas, objectness, sizes = _propose_inputs(7, 2, 38, 50, torch.float32)
    assert anchors.shape[0] == 38 * 50 * 9
    size_t = torch.tensor(sizes)
    if not impl.emulated:
        kwargs = dict(pre_nms_top_n=6000, post_nms_top_n=256)
        ours = impl.call(
            "propose", anchors, deltas, objectness, size_t, *ProposeConfig(**kwargs).op_args()
        )
        _assert_proposals_equal(
            ours, reference.propose(anchors, deltas, objectness, sizes, **kwargs)
        )
        assert (ours[2] == 256).all()
    # The CUDA kernels' logic at a smaller top-k (the emulator runs every thread one after the
    # other): many mask words, and the reduce's early exit.
    args = (anchors, deltas, objectness, size_t, 1500, 256, 0.7, 1e-3, 0.0, [1.0] * 4, CLAMP, True)
    impl.assert_matches_cpu(impl.call("propose", *args), "propose", *args)


@ALL_IMPLS
def test_propose_drops_nan_inf_and_tied_logits(impl):
    anchors, deltas, objectness, sizes = _propose_inputs(8, 2, 4, 4, torch.float32)
    objectness[0, :10] = 2.0  # tied logits: the lower anchor index first
    objectness[0, 10] = float("nan")
    objectness[1, 3] = float("inf")
    deltas[0, 0, 0] = float("nan")
    deltas[1, 5, 2] = float("inf")  # clamped dw: a finite box
    deltas[1, 6, 0] = float("inf")  # the centre at +inf: clipped to a zero-width box
    kw = dict(pre_nms_top_n=100, post_nms_top_n=100, iou_threshold=0.5)
    args = (anchors, deltas, objectness, torch.tensor(sizes), *ProposeConfig(**kw).op_args())
    ours = impl.call("propose", *args)
    _assert_proposals_equal(ours, reference.propose(anchors, deltas, objectness, sizes, **kw))
    impl.assert_matches_cpu(ours, "propose", *args)
    assert torch.isfinite(ours[0]).all() and torch.isfinite(ours[1]).all()
    assert (ours[1][1, 0] == 1.0) and ours[2][0] > 0


@DEVICE_IMPLS
def test_propose_integer_and_tensor_image_sizes(impl):
    anchors, deltas, objectness, sizes = _propose_inputs(9, 2, 3, 3, torch.float64)
    anchors, deltas, objectness = impl.to(anchors, deltas, objectness)
    a = ops.propose(anchors, deltas, objectness, sizes)
    b = ops.propose(anchors, deltas, objectness, impl.to(torch.tensor(sizes, dtype=torch.int32)))
    strided_deltas = deltas.transpose(0, 1).contiguous().transpose(0, 1)
    strided_objectness = objectness.t().contiguous().t()
    assert not strided_deltas.is_contiguous() and not strided_objectness.is_contiguous()
    c = ops.propose(
        anchors,
        strided_deltas,
        strided_objectness,
        impl.to(torch.tensor(sizes, dtype=torch.float32)),
    )
    for x, y, z in zip(a, b, c, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
        torch.testing.assert_close(x, z, rtol=0, atol=0)


# ---- gradients ----


@DEVICE_IMPLS
@pytest.mark.parametrize(
    "seed,height,width,fast", [(0, 2, 2, False), (1, 3, 4, True), (2, 3, 4, True)]
)
def test_propose_gradcheck(impl, seed, height, width, fast):
    anchors, deltas, objectness, sizes = _propose_inputs(
        seed, 2, height, width, torch.float64, spread=0.2
    )
    anchors, deltas, objectness = impl.to(anchors, deltas, objectness)
    deltas.requires_grad_(True)
    anchors.requires_grad_(True)

    def boxes(d, a):
        return ops.propose(
            a,
            d,
            objectness,
            sizes,
            pre_nms_top_n=60,
            post_nms_top_n=12,
            iou_threshold=0.6,
            append_whole_image=True,
        )[0]

    assert (boxes(deltas, anchors) != 0).any()
    assert torch.autograd.gradcheck(boxes, (deltas, anchors), fast_mode=fast)


@DEVICE_IMPLS
def test_propose_gradient_matches_reference_autograd(impl):
    anchors, deltas, objectness, sizes = _propose_inputs(11, 3, 5, 5, torch.float64, spread=1.0)
    kw = dict(pre_nms_top_n=150, post_nms_top_n=30, weights=(2.0, 2.0, 1.0, 1.0))
    d1, a1 = (t.requires_grad_() for t in impl.to(deltas.clone(), anchors.clone()))
    d2, a2 = deltas.clone().requires_grad_(), anchors.clone().requires_grad_()
    out1 = ops.propose(a1, d1, impl.to(objectness), sizes, **kw)
    out2 = reference.propose(a2, d2, objectness, sizes, **kw)
    grad = torch.randn_like(out2[0])
    (out1[0] * impl.to(grad)).sum().backward()
    (out2[0] * grad).sum().backward()
    torch.testing.assert_close(d1.grad.cpu(), d2.grad)
    torch.testing.assert_close(a1.grad.cpu(), a2.grad)
    assert (d1.grad != 0).any(dim=-1).sum() <= 3 * 30  # only kept boxes get a gradient
    assert not out1[1].requires_grad and not out1[2].requires_grad


@ALL_IMPLS
def test_propose_backward_matches_reference_autograd(impl):
    anchors, deltas, objectness, sizes = _propose_inputs(12, 2, 5, 5, torch.float64, spread=1.0)
    size_t = torch.tensor(sizes, dtype=torch.float64)
    out = impl.call(
        "propose",
        anchors,
        deltas,
        objectness,
        size_t,
        200,
        40,
        0.7,
        1e-3,
        0.0,
        [1.0] * 4,
        CLAMP,
        True,
    )
    grad = torch.randn_like(out[0])
    args = (grad, anchors, deltas, out[3], size_t, [1.0] * 4, CLAMP)
    got = impl.call("propose_backward", *args)
    impl.assert_matches_cpu(got, "propose_backward", *args)
    d, a = deltas.clone().requires_grad_(), anchors.clone().requires_grad_()
    boxes = reference.propose(
        a, d, objectness, sizes, pre_nms_top_n=200, post_nms_top_n=40, append_whole_image=True
    )[0]
    expected = torch.autograd.grad(boxes, (d, a), grad)
    assert (expected[0] != 0).any()
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e)


# ---- empty inputs ----


@DEVICE_IMPLS
def test_empty_inputs(impl):
    device = impl.device
    empty = torch.zeros(0, 4, device=device)
    none = torch.zeros(0, device=device)
    assert ops.nms(empty, none, 0.5).shape == (0,)
    assert ops.nms(empty, none, 0.5).dtype == torch.int64
    assert ops.batched_nms(empty, none, none.long(), 0.5).shape == (0,)
    anchors = ops.generate_anchors((2, 2), 16, device=device)
    a = anchors.shape[0]
    # no images
    out = ops.propose(
        anchors, torch.zeros(0, a, 4, device=device), torch.zeros(0, a, device=device), []
    )
    assert [t.shape for t in out] == [(0, 256, 4), (0, 256), (0,)]
    # no anchors, pre_nms_top_n = 0, post_nms_top_n = 0
    for anc, pre, post in ((anchors[:0], 10, 5), (anchors, 0, 5), (anchors, 10, 0)):
        d = torch.randn(2, anc.shape[0], 4, device=device)
        o = torch.randn(2, anc.shape[0], device=device)
        boxes, scores, counts = ops.propose(
            anc,
            d,
            o,
            [(32, 32), (20, 30)],
            pre_nms_top_n=pre,
            post_nms_top_n=post,
            append_whole_image=True,
        )
        assert boxes.shape == (2, post + 1, 4) and counts.tolist() == [1, 1]
        assert boxes[1, 0].tolist() == [0.0, 0.0, 30.0, 20.0] and scores[:, 0].tolist() == [1, 1]


@ALL_IMPLS
def test_empty_inputs_raw(impl):
    empty, none = torch.zeros(0, 4), torch.zeros(0)
    for name, args in (
        ("nms", (empty, none, 0.5)),
        ("batched_nms", (empty, none, none.long(), 0.5)),
    ):
        kept = impl.call(name, *args)
        assert kept.shape == (0,) and kept.dtype == torch.int64
    anchors = ops.generate_anchors((2, 2), 16)
    settings = (0.7, 1e-3, 0.0, [1.0] * 4, CLAMP, True)
    # no images
    a = anchors.shape[0]
    out = impl.call(
        "propose",
        anchors,
        torch.zeros(0, a, 4),
        torch.zeros(0, a),
        torch.zeros(0, 2),
        10,
        5,
        *settings,
    )
    assert [t.shape for t in out] == [(0, 6, 4), (0, 6), (0,), (0, 6)]
    # no anchors, pre_nms_top_n = 0, post_nms_top_n = 0
    g = torch.Generator().manual_seed(0)
    for anc, pre, post in ((anchors[:0], 10, 5), (anchors, 0, 5), (anchors, 10, 0)):
        d = torch.randn(2, anc.shape[0], 4, generator=g)
        o = torch.randn(2, anc.shape[0], generator=g)
        args = (anc, d, o, torch.tensor([[32, 32], [20, 30]]), pre, post, *settings)
        boxes, scores, counts, kept = impl.call("propose", *args)
        assert boxes.shape == (2, post + 1, 4) and counts.tolist() == [1, 1]
        assert boxes[1, 0].tolist() == [0.0, 0.0, 30.0, 20.0] and scores[:, 0].tolist() == [1, 1]
        impl.assert_matches_cpu((boxes, scores, counts, kept), "propose", *args)


# ---- opcheck ----


def _opcheck_samples():
    boxes, scores = _nms_inputs(1, 40, torch.float64, ties=True)
    yield "nms", (boxes, scores, 0.5)
    yield "nms", (boxes[:0], scores[:0], 0.5)
    yield "batched_nms", (boxes, scores, torch.arange(40) % 3, 0.3)
    anchors, deltas, objectness, sizes = _propose_inputs(2, 2, 3, 3, torch.float64, spread=0.2)
    size_t = torch.tensor(sizes, dtype=torch.float64)
    args = (size_t, 50, 10, 0.7, 1e-3, 0.0, [1.0, 1.0, 1.0, 1.0], CLAMP)
    yield "propose", (anchors, deltas.clone().requires_grad_(), objectness, *args, True)
    yield "propose", (anchors, deltas, objectness, *args, False)
    out = torch.ops.mlkernels.propose(anchors, deltas, objectness, *args, True)
    yield (
        "propose_backward",
        (torch.randn_like(out[0]), anchors, deltas, out[3], size_t, [1.0] * 4, CLAMP),
    )


@DEVICE_IMPLS
@pytest.mark.parametrize(
    "name,args", list(_opcheck_samples()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_opcheck(impl, name, args):
    run_opcheck(impl, name, args)


def test_torch_compile_propose():
    anchors, deltas, objectness, sizes = _propose_inputs(3, 2, 3, 3, torch.float32)
    size_t = torch.tensor(sizes)

    def fn(d, o):
        return ops.propose(anchors, d, o, size_t, pre_nms_top_n=50, post_nms_top_n=10)[0] * 2

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(deltas, objectness), fn(deltas, objectness))


def test_torch_compile_nms_with_its_data_dependent_size():
    boxes, scores = _nms_inputs(6, 80, torch.float32)
    idxs = torch.arange(80) % 3

    def fn(b, s, i):
        return ops.nms(b, s, 0.5) * 2, ops.batched_nms(b, s, i, 0.5) + 1

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(fn, fullgraph=True)
        for got, want in zip(compiled(boxes, scores, idxs), fn(boxes, scores, idxs), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- bad input: clear errors, the same from the fake kernels ----

_b4 = torch.zeros(5, 4)
_anch = torch.zeros(6, 4)
BAD_CASES = [
    (
        "nms",
        (torch.zeros(5, 3), torch.zeros(5), 0.5),
        RuntimeError,
        r"nms: boxes must be Tensor\[N, 4\], got Tensor\[5, 3\]",
    ),
    (
        "nms",
        (_b4, torch.zeros(4), 0.5),
        RuntimeError,
        r"nms: scores must be Tensor\[N\] with N = 5 \(one per box\), got Tensor\[4\]",
    ),
    (
        "nms",
        (_b4, torch.zeros(5, dtype=torch.float64), 0.5),
        RuntimeError,
        r"nms: scores must have the dtype of boxes \(float32\), got float64",
    ),
    (
        "nms",
        (_b4.long(), torch.zeros(5).long(), 0.5),
        RuntimeError,
        "nms: boxes must be float16, bfloat16, float32 or float64, got int64",
    ),
    (
        "nms",
        (_b4, torch.zeros(5), -0.1),
        ValueError,
        "nms: iou_threshold must be a non-negative number, got -0.1",
    ),
    (
        "nms",
        (_b4, torch.zeros(5), float("nan")),
        ValueError,
        "nms: iou_threshold must be a non-negative number, got nan",
    ),
    (
        "batched_nms",
        (_b4, torch.zeros(5), torch.zeros(5), 0.5),
        RuntimeError,
        "batched_nms: idxs must be an integer tensor, got float32",
    ),
    (
        "batched_nms",
        (_b4, torch.zeros(5), torch.zeros(6, dtype=torch.int64), 0.5),
        RuntimeError,
        r"batched_nms: idxs must be Tensor\[N\] with N = 5 \(one per box\), got Tensor\[6\]",
    ),
    (
        "propose",
        (torch.zeros(6, 5), torch.zeros(2, 6, 4), torch.zeros(2, 6), [(8, 8)] * 2),
        RuntimeError,
        r"propose: anchors must be Tensor\[A, 4\], got Tensor\[6, 5\]",
    ),
    (
        "propose",
        (_anch, torch.zeros(2, 7, 4), torch.zeros(2, 6), [(8, 8)] * 2),
        RuntimeError,
        r"propose: deltas must be Tensor\[N, A, 4\] with A = 6, got Tensor\[2, 7, 4\]",
    ),
    (
        "propose",
        (_anch, torch.zeros(2, 6, 4), torch.zeros(3, 6), [(8, 8)] * 2),
        RuntimeError,
        r"propose: objectness must be Tensor\[N, A\] = Tensor\[2, 6\], got Tensor\[3, 6\]",
    ),
    (
        "propose",
        (_anch, torch.zeros(2, 6, 4), torch.zeros(2, 6), [(8, 8)] * 3),
        RuntimeError,
        r"propose: image_sizes must be Tensor\[N, 2\] = Tensor\[2, 2\] \(height, width\), "
        r"got Tensor\[3, 2\]",
    ),
    (
        "propose",
        (_anch, torch.zeros(2, 6, 4, dtype=torch.float64), torch.zeros(2, 6), [(8, 8)] * 2),
        RuntimeError,
        r"propose: deltas must have the dtype of anchors \(float32\), got float64",
    ),
    (
        "propose",
        (_anch, torch.zeros(2, 6, 4), torch.zeros(2, 6), torch.ones(2, 2, dtype=torch.bool)),
        RuntimeError,
        "propose: image_sizes must be an integer or floating tensor, got bool",
    ),
]


@pytest.mark.parametrize("name,args,error,message", BAD_CASES)
@pytest.mark.parametrize("mode", ["eager", "fake"])
def test_bad_input_messages(name, args, error, message, mode):
    fn = getattr(ops, name)
    if name == "propose" and not isinstance(args[3], torch.Tensor):
        args = (*args[:3], torch.tensor(args[3]))
    assert_raises(fn, args, error, message, mode)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(pre_nms_top_n=-1), "propose: pre_nms_top_n must be >= 0, got -1"),
        (dict(post_nms_top_n=-2), "propose: post_nms_top_n must be >= 0, got -2"),
        (dict(iou_threshold=float("nan")), "propose: iou_threshold must be a non-negative number"),
        (dict(min_size=float("nan")), "propose: min_size must be a number, got nan"),
        (dict(score_threshold=float("nan")), "propose: score_threshold must be a number, got nan"),
        (dict(weights=(1.0, 0.0, 1.0, 1.0)), "propose: weights must be finite and positive"),
    ],
)
def test_propose_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.propose(_anch, torch.zeros(2, 6, 4), torch.zeros(2, 6), [(8, 8)] * 2, **kwargs)


_BAD_SIZES = r"image_sizes must be finite, >= 0 and at most the largest float32 \(.*\), "


@pytest.mark.parametrize(
    "sizes,message",
    [
        ([(8, 8), (-5, 8)], _BAD_SIZES + r"got \(-5, 8\) for image 1"),
        ([(float("nan"), 8), (8, 8)], _BAD_SIZES + r"got \(nan, 8\)"),
        (
            torch.tensor([[8.0, 8.0], [8.0, float("inf")]]),
            _BAD_SIZES + r"got \(8, inf\) for image 1",
        ),
    ],
)
def test_propose_bad_image_sizes(sizes, message):
    with pytest.raises(ValueError, match="propose: " + message):
        ops.propose(_anch, torch.zeros(2, 6, 4), torch.zeros(2, 6), sizes)


@pytest.mark.emulated
@pytest.mark.parametrize(
    "sizes,got",
    [
        ([[8, 8], [-5, 8]], r"got \(-5, 8\) for image 1"),
        ([[float("nan"), 8], [8, 8]], r"got \(nan, 8\) for image 0"),
        ([[8, 8], [8, float("inf")]], r"got \(8, inf\) for image 1"),
        ([[8, 8], [1e39, 8]], r"got \(1e\+39, 8\) for image 1"),  # inf in float32
    ],
)
@pytest.mark.parametrize("pre_nms_top_n", [0, 4])
def test_propose_bad_image_sizes_emulated(sizes, got, pre_nms_top_n):
    # The CUDA kernels' check (a device-side assert on a GPU, no host sync), run by the emulator:
    # the same rule as the CPU's, also when no candidate would read the sizes.
    message = (
        r"propose: image_sizes must be finite, >= 0 and at most the largest value of the boxes' "
        r"dtype \(3.40282e\+38\), " + got
    )
    settings = ops.ProposeConfig(pre_nms_top_n=pre_nms_top_n).op_args()
    sizes = torch.tensor(sizes, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.mlkernels_emulated.propose(
            _anch, torch.zeros(2, 6, 4), torch.zeros(2, 6), sizes, *settings
        )


@pytest.mark.parametrize("mode", ["eager", "fake"])
def test_propose_backward_bad_input_messages(mode):
    op = torch.ops.mlkernels.propose_backward
    d, kept, sizes, w = (
        torch.zeros(2, 6, 4),
        torch.zeros(2, 3, dtype=torch.int64),
        _b4[:2, :2],
        [1.0] * 4,
    )
    cases = [
        (
            (torch.zeros(2, 4, 4), _anch, d, kept, sizes, w, CLAMP),
            r"propose_backward: grad_boxes must be Tensor\[N, P, 4\] = Tensor\[2, 3, 4\], "
            r"got Tensor\[2, 4, 4\]",
        ),
        (
            (torch.zeros(2, 3, 4), _anch, d, kept.int(), sizes, w, CLAMP),
            r"propose_backward: kept_anchors must be int64 Tensor\[N, P\] with N = 2, "
            r"got int32 Tensor\[2, 3\]",
        ),
        (
            (torch.zeros(2, 3, 4), _anch, d, kept, sizes[:1], w, CLAMP),
            r"propose_backward: image_sizes must be Tensor\[N, 2\] = Tensor\[2, 2\] "
            r"\(height, width\), got Tensor\[1, 2\]",
        ),
        (
            (torch.zeros(2, 3, 4), _anch[:5], d, kept, sizes, w, CLAMP),
            r"propose_backward: deltas must be Tensor\[N, A, 4\] with A = 5, got Tensor\[2, 6, 4\]",
        ),
    ]
    for args, message in cases:
        assert_raises(op, args, RuntimeError, message, mode)


@pytest.mark.parametrize("impl", impl_params("cpu", "emulated"))
def test_propose_backward_out_of_range_kept_anchors(impl):
    # A hand-made call with an anchor index propose cannot have written: refused by the CPU
    # before it starts, by the CUDA kernel where it reads it (a device-side assert, no host sync:
    # tests/test_no_sync.py), whose check the emulator runs.
    op = impl.ops
    grad, d, sizes, w = (
        torch.ones(2, 3, 4),
        torch.zeros(2, 6, 4),
        torch.full((2, 2), 8.0),
        [1.0] * 4,
    )
    bad = torch.tensor([[0, 6, -1], [1, -1, -1]])
    message = (
        r"propose_backward: kept_anchors must lie in \[-1, A\) with A = 6, got values in \[-1, 6\]"
    )
    if impl.emulated:
        message = (
            r"propose_backward: kept_anchors must lie in \[-1, A\), A = anchors.size\(0\), "
            r"got 6 \(A = 6\) in row 1 of image 0"
        )
    with pytest.raises(RuntimeError, match=message):
        op.propose_backward(grad, _anch, d, bad, sizes, w, CLAMP)


def test_generate_anchors_and_propose_argument_errors():
    with pytest.raises(ValueError, match="generate_anchors: stride must be finite and positive"):
        ops.generate_anchors((2, 2), 0)
    with pytest.raises(ValueError, match="generate_anchors: stride must be finite and positive"):
        ops.generate_anchors((2, 2), (16, float("nan")))
    with pytest.raises(ValueError, match="generate_anchors: feature_size must be non-negative"):
        ops.generate_anchors((2.5, 2), 16)
    with pytest.raises(ValueError, match="generate_anchors: sizes and aspect_ratios must be"):
        ops.generate_anchors((2, 2), 16, sizes=(32, float("nan")))
    with pytest.raises(ValueError, match=r"propose: image_sizes must be Tensor\[N, 2\] or a list"):
        ops.propose(_anch, torch.zeros(2, 6, 4), torch.zeros(2, 6), [(8, 8), (8,)])


def test_bad_types():
    with pytest.raises(TypeError, match="nms: scores must be a Tensor, got list"):
        ops.nms(_b4, [0.0] * 5, 0.5)


# ---- CUDA (skipped without a GPU) ----


@pytest.mark.parametrize("impl", impl_params("cuda"))
def test_large_inputs_match_cpu(impl):
    # (the emulator's share of large inputs, smaller: test_nms_large_n_matches_torchvision,
    # test_batched_nms_many_boxes_matches_torchvision, test_propose_rlsd_shape_matches_reference)
    boxes, scores = _nms_inputs(13, 5000, torch.float32, size=600.0)
    impl.assert_matches_cpu(impl.call("nms", boxes, scores, 0.5), "nms", boxes, scores, 0.5)
    args = (boxes, scores, torch.arange(5000) % 7, 0.5)
    impl.assert_matches_cpu(impl.call("batched_nms", *args), "batched_nms", *args)
    anchors, deltas, objectness, sizes = _propose_inputs(14, 4, 38, 50, torch.float32)
    cpu = ops.propose(anchors, deltas, objectness, sizes, append_whole_image=True)
    anchors, deltas, objectness = impl.to(anchors, deltas, objectness)
    gpu = ops.propose(anchors, deltas, objectness, sizes, append_whole_image=True)
    _assert_proposals_equal([t.cpu() for t in gpu], cpu)
