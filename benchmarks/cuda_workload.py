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
box_iou, generate_anchors. Public functions and autograd (``.backward()``) where they reach a
path, the raw ``torch.ops.mlkernels`` ops with explicit output masks where they don't.

Inputs are drawn on the CPU (no random-number kernels to instrument) and moved to the device.
Results are compared with the CPU kernels where that is cheap. A step that fails is reported and
the rest still runs; the script ends with torch.cuda.synchronize() and prints "workload ok", or
lists the failed steps and exits with status 1.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from collections.abc import Callable

import torch

import mlkernels
from mlkernels import ops
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
        x = self.to(randn(2, 3, 7, 8)).requires_grad_()
        rois = self.to(torch.tensor([[0, 0.0, 0.0, 6.0, 5.0], [1, 1.0, 2.0, 8.0, 9.0]] * 3))
        rois.requires_grad_()
        out = ops.roi_align(x, rois, 3, 1.0, 2)
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
        atomic = torch.autograd.grad(ops.roi_align(x, rois, 3, 1.0, 2), (x, rois), grad)
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

    def run(self) -> int:
        start = time.perf_counter()
        self.roi_align()
        self.nms()
        self.propose()
        self.boxes()
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
