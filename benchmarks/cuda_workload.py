"""Every mlkernels op on CUDA tensors at small sizes, through every kernel path, for
compute-sanitizer (it runs in a few seconds without tools):

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/cuda_workload.py
    python benchmarks/cuda_workload.py --device cpu      # the same calls on the CPU kernels
    ... cuda_workload.py --light    # float32 and float16 only (for racecheck, the slowest tool)

Covered: roi_align forward and backward (map gradient only, box gradient only, both, neither;
float32/float64/float16/bfloat16; aligned True/False; sampling_ratio 0 (adaptive) and 2; boxes
partly or wholly outside the map; no boxes; a list of boxes; autocast; the deterministic
input-gradient kernel under torch.use_deterministic_algorithms), nms and batched_nms (several
64-box blocks, ties, NaN, negative coordinates, no boxes), propose forward and backward (both
gradient masks, append_whole_image, score and size filters, more candidates than anchors, no
images), encode_boxes, decode_boxes forward and backward (every mask, broadcasting, clamping),
box_iou, generate_anchors; scaled_dot_product_attention forward and backward (float32/float64/
float16/bfloat16; tiled and wide-head kernels; no mask, bool mask with a fully masked row, float
mask with and without gradient, a broadcast mask with gradient, is_causal, return_lse, leading
dims, autocast, MultiheadAttention, every backward mask, empty inputs); beam_search_step (every
dtype, ties, NaN, empty slots, finished beams, threshold and length stops, one warp to 256 threads,
K up to the shared-memory limit), beam_search_advance, beam_search_backtrack and a short
beam_search decode, all equal to the CPU's to the bit. Public functions and autograd
(``.backward()``) where they reach a path, the raw ``torch.ops.mlkernels`` ops with explicit
output masks where they don't.

Inputs are drawn on the CPU (no random-number kernels to instrument) and moved to the device.
Results are compared with the CPU kernels where that is cheap. A step that fails is reported and
the rest still runs; the script ends with torch.cuda.synchronize() and prints "workload ok", or
lists the failed steps and exits with status 1.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
import traceback
from collections.abc import Callable

import torch

import mlkernels
from mlkernels import ops
from mlkernels.ops.beam_search import pool_words
from mlkernels.testing import assert_coords_close

RAW = torch.ops.mlkernels
W1 = [1.0, 1.0, 1.0, 1.0]
CLAMP = math.log(1000.0 / 16)
MASKS = ([True, False], [False, True], [True, True], [False, False])

G = torch.Generator().manual_seed(0)


def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=G, dtype=torch.float64).to(dtype)


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=torch.float64).to(dtype)


def boxes_xyxy(n: int, extent: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """n boxes (x1, y1, x2, y2) with corners in [-extent / 10, extent]."""
    lo = rand(n, 2, dtype=torch.float64) * extent * 1.1 - extent / 10
    hi = lo + rand(n, 2, dtype=torch.float64) * extent / 3 + 0.5
    return torch.cat([lo, hi], dim=1).to(dtype)


def on_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def close_to_cpu(got: torch.Tensor, want: torch.Tensor) -> None:
    """Attention on the GPU adds in other orders than the CPU: equal within a few ulps of the
    dtype, relative to the largest value (a wide head sums 700 products)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    finite = want.detach().abs().nan_to_num(posinf=0, neginf=0)
    scale = max(float(finite.max()) if finite.numel() else 0.0, 1.0)
    low = want.dtype in (torch.float16, torch.bfloat16)
    rtol, atol = (2e-2, 2e-2) if low else (1e-4, 1e-5)
    torch.testing.assert_close(got.detach().cpu(), want.detach(), rtol=rtol, atol=atol * scale)


class Workload:
    def __init__(self, device: str, light: bool = False) -> None:
        self.device = torch.device(device)
        # --light: roi_align in float32 and float16 (the float32-accumulation path), every other
        # op in float32; every kernel path is still reached.
        self.light = light
        self.failed: list[str] = []
        self.steps = 0

    def to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def step(self, name: str, fn: Callable[..., None], *args) -> None:
        """Run ``fn(*args)``; a failure is printed and recorded, and the next step runs."""
        self.steps += 1
        try:
            fn(*args)
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # a kernel fault is reported at its step
        except Exception:
            self.failed.append(name)
            print(f"FAILED step {name}:", file=sys.stderr)
            traceback.print_exc()

    # ---- roi_align ----

    def roi_align(self) -> None:
        n, c, h, w = 2, 3, 9, 11
        dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        for dtype in dtypes[::2] if self.light else dtypes:
            x_cpu = randn(n, c, h, w, dtype=dtype)
            # Boxes in input coordinates (scale 1/2): inside, straddling the borders, beyond
            # them, tiny, degenerate (x2 < x1), one pixel wide.
            rois_cpu = torch.tensor(
                [
                    [0, 1.0, 2.0, 14.0, 12.0],
                    [1, -6.0, -4.0, 8.0, 10.0],
                    [0, 15.0, 10.0, 30.0, 25.0],
                    [1, 30.0, 30.0, 40.0, 44.0],
                    [0, 3.0, 3.0, 3.5, 3.25],
                    [1, 9.0, 9.0, 4.0, 6.0],
                    [0, 4.0, 2.0, 6.0, 20.0],
                    [1, -20.0, -20.0, 60.0, 50.0],
                ],
                dtype=torch.float64,
            ).to(dtype)
            rois_cpu[:, 1:] += rand(len(rois_cpu), 4, dtype=dtype)
            for aligned in (False, True):
                for ratio in (0, 2):
                    name = f"roi_align {dtype} aligned={aligned} ratio={ratio}"
                    self.step(name, self._roi_align_case, x_cpu, rois_cpu, aligned, ratio)
        self.step("roi_align raw backward masks", self._roi_align_raw_masks)
        self.step("roi_align no boxes", self._roi_align_empty)
        self.step("roi_align list of boxes, channels_last", self._roi_align_list)
        self.step("roi_align autocast", self._roi_align_autocast)
        self.step("roi_align deterministic backward", self._roi_align_deterministic)

    def _roi_align_case(self, x_cpu, rois_cpu, aligned: bool, ratio: int) -> None:
        x, rois = self.to(x_cpu), self.to(rois_cpu)
        out = ops.roi_align(x, rois, (3, 2), 0.5, ratio, aligned)
        expected = ops.roi_align(x_cpu, rois_cpu, (3, 2), 0.5, ratio, aligned)
        tol = {} if x.dtype in (torch.float32, torch.float64) else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(out.cpu(), expected, **tol)
        grad = self.to(randn(*out.shape, dtype=x.dtype))
        # Through autograd: map only, boxes only, both (output_mask from needs_input_grad).
        for need_x, need_b in ((True, False), (False, True), (True, True)):
            xi = x.clone().requires_grad_(need_x)
            bi = rois.clone().requires_grad_(need_b)
            ops.roi_align(xi, bi, (3, 2), 0.5, ratio, aligned).backward(grad)
            assert (xi.grad is not None) == need_x and (bi.grad is not None) == need_b
            for t in (xi, bi):
                if t.grad is not None:
                    assert t.grad.shape == t.shape and t.grad.dtype == t.dtype

    def _roi_align_raw_masks(self) -> None:
        x = self.to(randn(2, 4, 6, 7))
        rois = self.to(torch.tensor([[0, -1.0, 0.5, 5.0, 4.0], [1, 2.0, 1.0, 9.0, 8.0]]))
        grad = self.to(randn(2, 4, 2, 3))
        for mask in MASKS:
            for ratio in (0, 2):
                gi, gb = RAW.roi_align_backward(grad, x, rois, 1.0, 2, 3, ratio, False, mask)
                assert gi.shape == (x.shape if mask[0] else (0,)), (mask, gi.shape)
                assert gb.shape == (rois.shape if mask[1] else (0,)), (mask, gb.shape)

    def _roi_align_empty(self) -> None:
        x = self.to(randn(2, 3, 5, 5)).requires_grad_()
        rois = self.to(torch.zeros(0, 5)).requires_grad_()
        out = ops.roi_align(x, rois, 2, 1.0, 2)
        assert out.shape == (0, 3, 2, 2)
        out.sum().backward()
        assert x.grad.abs().sum().item() == 0 and rois.grad.shape == (0, 5)
        assert ops.roi_align(x.detach(), [], 2).shape == (0, 3, 2, 2)
        empty_map = self.to(randn(2, 0, 5, 5))
        assert (
            ops.roi_align(empty_map, self.to(torch.tensor([[0, 0, 0, 4.0, 4.0]])), 2).numel() == 0
        )

    def _roi_align_list(self) -> None:
        x = self.to(randn(2, 5, 8, 8)).to(memory_format=torch.channels_last).requires_grad_()
        b0 = self.to(torch.tensor([[0.0, 0.0, 7.0, 7.0], [2.0, 1.0, 5.0, 6.0]])).requires_grad_()
        b1 = self.to(torch.tensor([[1.0, 1.0, 9.0, 3.0]])).requires_grad_()
        out = ops.roi_align(x, [b0, b1], 2, 1.0, -1, True)
        out.square().sum().backward()
        assert x.grad.shape == x.shape and b0.grad.shape == (2, 4) and b1.grad.shape == (1, 4)
        layer = mlkernels.nn.RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2)
        assert layer(x, [b0.detach(), b1.detach()]).shape == (3, 5, 2, 2)

    def _roi_align_autocast(self) -> None:
        if self.device.type != "cuda":  # autocast on the CPU takes bfloat16 only
            dtype = torch.bfloat16
        else:
            dtype = torch.float16
        x = self.to(randn(1, 3, 6, 6, dtype=dtype)).requires_grad_()
        rois = self.to(torch.tensor([[0, 0.5, 0.5, 4.0, 5.0]])).requires_grad_()
        with torch.autocast(self.device.type, dtype=dtype):
            out = ops.roi_align(x, rois, 2, 1.0, 2)
            raw = RAW.roi_align(x.detach(), rois.detach(), 1.0, 2, 2, 2, False)
        assert out.dtype == dtype and raw.dtype == dtype
        out.float().sum().backward()
        assert x.grad.dtype == dtype and rois.grad.dtype == torch.float32

    def _roi_align_deterministic(self) -> None:
        x = self.to(randn(3, 3, 7, 8)).requires_grad_()
        boxes = [[0, 0.0, 0.0, 6.0, 5.0], [1, 1.0, 2.0, 8.0, 9.0]] * 3
        # Adaptive sampling (ratio 0): a box 30 times the map takes the general walk, so image 2's
        # rows are redone by the general row kernel; images 0 and 1 stay the plain kernel's.
        boxes.append([2, -100.0, -100.0, 140.0, 120.0])
        rois = self.to(torch.tensor(boxes)).requires_grad_()
        for ratio in (2, 0):
            out = ops.roi_align(x, rois, 3, 1.0, ratio)
            grad = self.to(randn(*out.shape))
            previous = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)
            try:
                first = torch.autograd.grad(out, (x, rois), grad, retain_graph=True)
                second = torch.autograd.grad(out, (x, rois), grad)
            finally:
                torch.use_deterministic_algorithms(previous)
            for a, b in zip(first, second, strict=True):
                assert torch.equal(a, b), "deterministic backward differs run to run"
            atomic = torch.autograd.grad(ops.roi_align(x, rois, 3, 1.0, ratio), (x, rois), grad)
            for a, b in zip(first, atomic, strict=True):
                torch.testing.assert_close(a, b)

    # ---- nms, batched_nms ----

    def float_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32,) if self.light else (torch.float32, torch.float64)

    def nms(self) -> None:
        for dtype in self.float_dtypes():
            self.step(f"nms {dtype}", self._nms, dtype)
        self.step("nms NaN and no boxes", self._nms_special)

    def _nms(self, dtype: torch.dtype) -> None:
        n = 300  # five 64-box blocks, the last one partial
        boxes_cpu = boxes_xyxy(n, 60.0, dtype)
        scores_cpu = torch.round(rand(n, dtype=dtype) * 50) / 50  # ties
        boxes, scores = self.to(boxes_cpu), self.to(scores_cpu)
        for threshold in (0.0, 0.5, 1.5):
            keep = ops.nms(boxes, scores, threshold)
            assert torch.equal(keep.cpu(), ops.nms(boxes_cpu, scores_cpu, threshold))
        for idxs_cpu in (torch.arange(n) % 7, (torch.arange(n) % 3).to(torch.int32)):
            keep = ops.batched_nms(boxes - 40, scores, self.to(idxs_cpu), 0.4)
            expected = ops.batched_nms(boxes_cpu - 40, scores_cpu, idxs_cpu, 0.4)
            assert torch.equal(keep.cpu(), expected)

    def _nms_special(self) -> None:
        boxes = boxes_xyxy(70, 20.0)
        scores = rand(70, dtype=torch.float64)
        boxes[3, 1] = float("nan")
        scores[5] = float("nan")
        keep = ops.nms(self.to(boxes), self.to(scores), 0.5)
        assert torch.equal(keep.cpu(), ops.nms(boxes, scores, 0.5))
        empty, none = self.to(torch.zeros(0, 4)), self.to(torch.zeros(0))
        assert ops.nms(empty, none, 0.5).shape == (0,)
        assert ops.batched_nms(empty, none, none.long(), 0.5).shape == (0,)
        one = ops.batched_nms(
            self.to(boxes[:1]), self.to(scores[:1]), self.to(torch.zeros(1)).long(), 0.5
        )
        assert one.tolist() == [0]

    # ---- propose ----

    def propose(self) -> None:
        for dtype in self.float_dtypes():
            self.step(f"propose {dtype}", self._propose, dtype)
        self.step("propose raw backward masks", self._propose_raw_masks)
        self.step("propose empty", self._propose_empty)

    def _propose_inputs(self, images: int, dtype: torch.dtype):
        anchors = ops.generate_anchors((5, 6), 8, sizes=(8, 16), dtype=dtype, device=self.device)
        a = anchors.shape[0]  # 5 * 6 * 6 = 180: several 64-box blocks per image
        deltas = self.to(randn(images, a, 4, dtype=dtype) * 0.3)
        objectness = self.to(randn(images, a, dtype=dtype))
        return anchors, deltas, objectness

    def _propose(self, dtype: torch.dtype) -> None:
        anchors, deltas, objectness = self._propose_inputs(3, dtype)
        sizes = [(40, 48), (33, 30), (48, 20)]
        configs = (
            ops.ProposeConfig(pre_nms_top_n=100, post_nms_top_n=20, iou_threshold=0.7),
            ops.ProposeConfig(
                pre_nms_top_n=1000,  # more than the anchors
                post_nms_top_n=300,  # more than can be kept
                iou_threshold=0.5,
                min_size=3.0,
                score_threshold=0.4,
                append_whole_image=True,
            ),
        )
        for config in configs:
            out = ops.propose(anchors, deltas, objectness, sizes, config)
            expected = ops.propose(anchors.cpu(), deltas.cpu(), objectness.cpu(), sizes, config)
            boxes, scores, counts = on_cpu(out)
            assert torch.equal(counts, expected[2])
            assert_coords_close(boxes, expected[0])
            torch.testing.assert_close(scores, expected[1])
            # Gradients through autograd: deltas only, anchors only, both.
            for need_a, need_d in ((False, True), (True, False), (True, True)):
                a = anchors.clone().requires_grad_(need_a)
                d = deltas.clone().requires_grad_(need_d)
                size_t = self.to(torch.tensor(sizes, dtype=torch.int32))
                b = ops.propose(a, d, objectness, size_t, config)[0]
                b.backward(torch.ones_like(b))
                assert (a.grad is not None) == need_a and (d.grad is not None) == need_d

    def _propose_raw_masks(self) -> None:
        anchors, deltas, objectness = self._propose_inputs(2, torch.float32)
        sizes = self.to(torch.tensor([[40.0, 48.0], [30.0, 33.0]], dtype=torch.float64))
        out = RAW.propose(
            anchors, deltas, objectness, sizes, 80, 15, 0.6, 1e-3, 0.0, W1, CLAMP, True
        )
        grad = self.to(randn(*out[0].shape))
        for mask in MASKS:
            gd, ga = RAW.propose_backward(grad, anchors, deltas, out[3], sizes, W1, CLAMP, mask)
            assert gd.shape == (deltas.shape if mask[0] else (0,))
            assert ga.shape == (anchors.shape if mask[1] else (0,))

    def _propose_empty(self) -> None:
        anchors, _, _ = self._propose_inputs(0, torch.float32)
        a = anchors.shape[0]
        out = ops.propose(anchors, self.to(torch.zeros(0, a, 4)), self.to(torch.zeros(0, a)), [])
        assert [tuple(t.shape) for t in out] == [(0, 256, 4), (0, 256), (0,)]
        for anc, pre, post in ((anchors[:0], 10, 5), (anchors, 0, 5), (anchors, 10, 0)):
            d = self.to(randn(2, anc.shape[0], 4)).requires_grad_()
            o = self.to(randn(2, anc.shape[0]))
            boxes, _, counts = ops.propose(
                anc,
                d,
                o,
                [(32, 32), (20, 30)],
                pre_nms_top_n=pre,
                post_nms_top_n=post,
                append_whole_image=True,
            )
            assert counts.tolist() == [1, 1]
            boxes.sum().backward()

    # ---- box coding, IoU, anchors ----

    def boxes(self) -> None:
        for dtype in self.float_dtypes():
            self.step(f"encode/decode/box_iou {dtype}", self._boxes, dtype)
        self.step("decode_boxes raw backward masks", self._decode_raw_masks)
        self.step("boxes empty", self._boxes_empty)

    def _boxes(self, dtype: torch.dtype) -> None:
        anchors_cpu = boxes_xyxy(50, 100.0, dtype)
        deltas_cpu = randn(3, 50, 4, dtype=dtype)
        deltas_cpu[0, :5, 2:] = 8.0  # dw, dh clamped
        anchors, deltas = self.to(anchors_cpu), self.to(deltas_cpu)
        weights = (10.0, 10.0, 5.0, 5.0)
        decoded = ops.decode_boxes(deltas, anchors, weights, CLAMP)  # [3, 50, 4], broadcast
        assert_coords_close(decoded.cpu(), ops.decode_boxes(deltas_cpu, anchors_cpu, weights))
        encoded = ops.encode_boxes(decoded, anchors, weights)
        assert_coords_close(encoded.cpu(), ops.encode_boxes(decoded.cpu(), anchors_cpu, weights))
        for need_d, need_a in ((True, False), (False, True), (True, True)):
            d = deltas.clone().requires_grad_(need_d)
            a = anchors.clone().requires_grad_(need_a)
            ops.decode_boxes(d, a, weights).backward(torch.ones_like(decoded))
            assert (d.grad is not None) == need_d and (a.grad is not None) == need_a
        iou = ops.box_iou(anchors, decoded[1])
        torch.testing.assert_close(iou.cpu(), ops.box_iou(anchors_cpu, decoded[1].cpu()))
        generated = ops.generate_anchors((3, 4), (8, 6), dtype=dtype, device=self.device)
        assert torch.equal(generated.cpu(), ops.generate_anchors((3, 4), (8, 6), dtype=dtype))

    def _decode_raw_masks(self) -> None:
        deltas = self.to(randn(4, 6, 4))
        anchors = self.to(boxes_xyxy(6, 30.0, torch.float32))
        grad = self.to(randn(4, 6, 4))
        for mask in MASKS:
            gd, ga = RAW.decode_boxes_backward(grad, deltas, anchors, W1, CLAMP, mask)
            assert gd.shape == ((4, 6, 4) if mask[0] else (0,))
            assert ga.shape == ((4, 6, 4) if mask[1] else (0,))  # broadcast shape; autograd sums

    def _boxes_empty(self) -> None:
        empty = self.to(torch.zeros(0, 4))
        assert ops.box_iou(empty, self.to(boxes_xyxy(3, 10.0, torch.float32))).shape == (0, 3)
        assert ops.decode_boxes(empty, empty).shape == (0, 4)
        assert ops.encode_boxes(empty, empty).shape == (0, 4)

    # ---- attention ----

    def attention_dtypes(self) -> tuple[torch.dtype, ...]:
        if self.light:
            return (torch.float32, torch.float16)
        return (torch.float32, torch.float64, torch.float16, torch.bfloat16)

    def attention(self) -> None:
        for dtype in self.attention_dtypes():
            # Tiled kernels (several tiles per head, partial last tiles) and, with E = 700, the
            # one-thread-per-row kernels for heads too wide for shared memory.
            for shape in ((2, 2, 40, 70, 16, 8), (1, 3, 17, 9, 5, 3), (1, 1, 3, 5, 700, 700)):
                for mask in ("none", "bool", "float", "float grad", "broadcast grad", "causal"):
                    name = f"attention {dtype} {shape} {mask}"
                    self.step(name, self._attention_case, dtype, shape, mask)
        self.step("attention leading dims, return_lse, masked rows", self._attention_forms)
        self.step("attention raw backward masks", self._attention_raw_masks)
        self.step("attention empty", self._attention_empty)

    def _attention_mask(self, mask: str, b: int, h: int, lq: int, lk: int, dtype: torch.dtype):
        """attn_mask of the given form (CPU), or None; with requires_grad for the grad forms."""
        if mask in ("none", "causal"):
            return None
        if mask == "bool":
            keep = rand(b, h, lq, lk) < 0.7
            keep[..., 0] = True
            keep[0, 0, -1] = False  # one fully masked row
            return keep
        if mask == "broadcast grad":  # one value per key, broadcast over batch and queries
            return randn(1, h, 1, lk, dtype=dtype).requires_grad_()
        bias = randn(lq, lk, dtype=dtype)
        return bias.requires_grad_() if mask == "float grad" else bias

    def _attention_case(self, dtype: torch.dtype, shape, mask: str) -> None:
        b, h, lq, lk, e, ev = shape
        q_cpu, k_cpu = randn(b, h, lq, e, dtype=dtype), randn(b, h, lk, e, dtype=dtype)
        v_cpu = randn(b, h, lk, ev, dtype=dtype)
        mask_cpu = self._attention_mask(mask, b, h, lq, lk, dtype)
        causal = mask == "causal"
        leaves = [t.requires_grad_() for t in (self.to(q_cpu), self.to(k_cpu), self.to(v_cpu))]
        cpu_leaves = [t.clone().requires_grad_() for t in (q_cpu, k_cpu, v_cpu)]
        if mask_cpu is not None and mask_cpu.requires_grad:
            leaves.append(self.to(mask_cpu.detach()).requires_grad_())
            cpu_leaves.append(mask_cpu.detach().clone().requires_grad_())
            masks = (leaves[3], cpu_leaves[3])
        else:
            masks = (None if mask_cpu is None else self.to(mask_cpu), mask_cpu)
        out, lse = ops.scaled_dot_product_attention(
            *leaves[:3], masks[0], is_causal=causal, return_lse=True
        )
        expected, expected_lse = ops.scaled_dot_product_attention(
            *cpu_leaves[:3], masks[1], is_causal=causal, return_lse=True
        )
        close_to_cpu(out, expected)
        close_to_cpu(lse, expected_lse)
        grad_cpu = randn(*out.shape, dtype=dtype)
        grads = torch.autograd.grad(out, leaves, self.to(grad_cpu))
        expected_grads = torch.autograd.grad(expected, cpu_leaves, grad_cpu)
        for got, want in zip(grads, expected_grads, strict=True):
            close_to_cpu(got, want)

    def _attention_forms(self) -> None:
        # No leading dims, (B,) leading dims; a bool mask broadcast over the batch; LSE of a
        # fully masked row (-inf, zeros out).
        q, k, v = self.to(randn(5, 8)), self.to(randn(7, 8)), self.to(randn(7, 4))
        assert ops.scaled_dot_product_attention(q, k, v).shape == (5, 4)
        qb, kb, vb = (self.to(randn(3, *t.shape)) for t in (q, k, v))
        keep = torch.ones(5, 7, dtype=torch.bool)
        keep[2] = False
        out, lse = ops.scaled_dot_product_attention(
            qb, kb, vb, self.to(keep), scale=0.3, return_lse=True
        )
        assert out.shape == (3, 5, 4) and lse.shape == (3, 5) and lse.dtype == torch.float32
        assert torch.isinf(lse[:, 2]).all() and (out[:, 2] == 0).all()
        # Autocast and a layer.
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            assert ops.scaled_dot_product_attention(qb, kb, vb).dtype == torch.bfloat16
        layer = mlkernels.nn.MultiheadAttention(8, 2, batch_first=True).to(self.device)
        assert layer(qb, kb, kb)[0].shape == (3, 5, 8)

    def _attention_raw_masks(self) -> None:
        q, k, v = self.to(randn(1, 2, 6, 4)), self.to(randn(1, 2, 9, 4)), self.to(randn(1, 2, 9, 3))
        bias = self.to(randn(1, 2, 6, 9))
        out, lse = RAW.scaled_dot_product_attention(q, k, v, bias, 0.5, False)
        grad = self.to(randn(*out.shape))
        for mask in itertools.product((False, True), repeat=4):
            grads = RAW.scaled_dot_product_attention_backward(
                grad, q, k, v, bias, out, lse, 0.5, False, list(mask)
            )
            for wanted, g, t in zip(mask, grads, (q, k, v, bias), strict=True):
                assert g.shape == (t.shape if wanted else (0,)), (mask, g.shape)

    def _attention_empty(self) -> None:
        q = self.to(randn(2, 0, 4)).requires_grad_()
        k, v = self.to(randn(2, 3, 4)).requires_grad_(), self.to(randn(2, 3, 5))
        out = ops.scaled_dot_product_attention(q, k, v)
        assert out.shape == (2, 0, 5)
        out.sum().backward()
        assert (k.grad == 0).all()
        no_keys = ops.scaled_dot_product_attention(q.detach()[:, :0], k[:, :0], v[:, :0])
        assert no_keys.shape == (2, 0, 5)

    # ---- beam search ----

    def beam_search(self) -> None:
        dtypes = (
            (torch.float32,)
            if self.light
            else (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        )
        for dtype in dtypes:
            # 2 x 3 x 10: one warp a row; 2 x 64 x 40: 256 threads; K = 2352, the most that fits
            # in shared memory.
            for b, k, c in ((2, 3, 10), (2, 64, 40), (1, 2352, 2)):
                self.step(
                    f"beam_search_step {dtype} B{b} K{k} C{c}", self._beam_step, dtype, b, k, c
                )
        self.step("beam_search_advance", self._beam_advance)
        self.step("beam_search_backtrack", self._beam_backtrack)
        self.step("beam_search decode", self._beam_decode)
        self.step("beam search empty", self._beam_empty)

    def _beam_step(self, dtype: torch.dtype, b: int, k: int, c: int) -> None:
        # Ties (values from a small set), NaN and -inf log-probs, empty slots, finished beams,
        # partly used pools.
        log_probs = (-torch.randint(0, 4, (b, k, c), generator=G).double() / 2).to(dtype)
        log_probs[0, 0, 0] = float("nan")
        log_probs[-1, 0, -1] = -math.inf
        scores = -torch.randint(0, 3, (b, k), generator=G).float() / 2
        scores[:, -1] = -math.inf
        finished = rand(b, k) < 0.2
        used = torch.zeros(b, k, pool_words(c), dtype=torch.int64)
        used[:, ::2, 0] = 1  # label 0 taken on every other beam
        args = (log_probs, scores, used, finished)
        for threshold, max_length in ((-math.inf, c), (-1.0, 2)):
            kwargs = {"log_threshold": threshold, "max_length": max_length}
            got = ops.beam_search_step(*(self.to(t) for t in args), **kwargs)
            expected = ops.beam_search_step(*args, **kwargs)
            for name, a, e in zip(got._fields, got, expected, strict=True):
                assert torch.equal(a.cpu(), e), f"beam_search_step {name} differs from the CPU"

    def _beam_advance(self) -> None:
        b, k, c = 2, 64, 40  # 256 threads a row
        log_probs = randn(b, k, c).log_softmax(-1)
        scores = -rand(b, k).float() * 3
        scores[:, -1] = -math.inf
        used = torch.zeros(b, k, pool_words(c), dtype=torch.int64)
        finished = rand(b, k) < 0.2
        state = [randn(b * k, 3), torch.randint(0, 9, (b * k, 2), generator=G)]
        args = (log_probs, scores, used, finished)
        got = ops.beam_search_advance(
            *(self.to(t) for t in args), [self.to(t) for t in state], max_length=5
        )
        expected = ops.beam_search_advance(*args, state, max_length=5)
        for name, a, e in zip(got._fields, got, expected, strict=True):
            pairs = zip(a, e, strict=True) if name == "state" else [(a, e)]
            for x, y in pairs:
                assert torch.equal(x.cpu(), y), f"beam_search_advance {name} differs from the CPU"

    def _beam_backtrack(self) -> None:
        steps, b, k, width = 4, 3, 5, 6
        rows = b * k
        sources = torch.randint(0, rows, (steps, rows), generator=G)
        labels = torch.randint(-1, 9, (steps, rows), generator=G)
        scores = -rand(b, k).float()
        scores[1, 2] = -math.inf  # an empty slot: its path is all -1
        got = ops.beam_search_backtrack(self.to(sources), self.to(labels), self.to(scores), width)
        expected = ops.beam_search_backtrack(sources, labels, scores, width)
        for a, e in zip(got, expected, strict=True):
            assert torch.equal(a.cpu(), e)

    def _beam_decode(self) -> None:
        b, k, c = 3, 4, 7
        table_cpu = randn(c + 1, c).log_softmax(-1)  # next label's log-probs by the last label

        first_state = randn(b, 1).repeat_interleave(k, 0) * 0.1

        def search(device: torch.device):
            table = table_cpu.to(device)

            def step_fn(last_labels, state):
                return table[last_labels + 1] + state, state  # -1 (no label yet) -> row 0

            return ops.beam_search(
                step_fn,
                first_state.to(device),
                batch_size=b,
                num_labels=c,
                beam_size=k,
                max_length=4,
                threshold=0.01,
            )

        got, expected = search(self.device), search(torch.device("cpu"))
        for a, e in zip(got, expected, strict=True):
            assert torch.equal(a.cpu(), e)

    def _beam_empty(self) -> None:
        step = ops.beam_search_step(
            self.to(torch.zeros(0, 3, 5)),
            self.to(torch.zeros(0, 3)),
            self.to(torch.zeros(0, 3, 1, dtype=torch.int64)),
            self.to(torch.zeros(0, 3, dtype=torch.bool)),
        )
        assert step.scores.shape == (0, 3)
        paths, lengths = ops.beam_search_backtrack(
            self.to(torch.zeros(0, 0, dtype=torch.int64)),
            self.to(torch.zeros(0, 0, dtype=torch.int64)),
            self.to(torch.zeros(0, 0)),
            3,
        )
        assert paths.shape == (0, 0, 3) and lengths.shape == (0, 0)

    def run(self) -> int:
        start = time.perf_counter()
        self.roi_align()
        self.nms()
        self.propose()
        self.boxes()
        self.attention()
        self.beam_search()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if self.failed:
            print(
                f"workload FAILED: {len(self.failed)} of {self.steps} steps: "
                + "; ".join(self.failed),
                file=sys.stderr,
            )
            return 1
        print(f"workload ok ({self.steps} steps on {self.device}, {seconds:.1f} s)")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--light", action="store_true", help="fewer dtypes, every kernel path (for racecheck)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("cuda_workload: no CUDA device is visible (use --device cpu)", file=sys.stderr)
            return 2
        if not mlkernels.build_info()["cuda_compiled"]:
            print("cuda_workload: mlkernels was built without CUDA", file=sys.stderr)
            return 2
    return Workload(args.device, args.light).run()


if __name__ == "__main__":
    raise SystemExit(main())
