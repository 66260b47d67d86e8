// Box coding and IoU math shared by the CPU kernels, the CUDA kernels and the grid emulator.
//
// Boxes are (x1, y1, x2, y2); deltas are (dx, dy, dw, dh) in torchvision's BoxCoder convention.
// The operation order follows torchvision's so that float32 results agree with it.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/grid.h"
#include "../common/macros.h"

namespace mlk {
namespace boxes {

template <typename T>
struct Weights {
  T x, y, w, h;
};

// max/min that propagate NaN from either side, as torch.maximum/torch.minimum do.
template <typename T>
MLK_HOST_DEVICE T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}
template <typename T>
MLK_HOST_DEVICE T nan_min(T a, T b) {
  return (a < b || a != a) ? a : b;
}
// clamp(v, max=hi) and clamp(v, min=lo) with NaN passing through, as torch.clamp.
template <typename T>
MLK_HOST_DEVICE T clamp_max(T v, T hi) {
  return v > hi ? hi : v;
}
template <typename T>
MLK_HOST_DEVICE T clamp_min(T v, T lo) {
  return v < lo ? lo : v;
}

// a * b rounded on its own. nvcc contracts a product followed by an add into one FMA by default
// (-fmad=true), which rounds once instead of twice; torchvision's CPU ops (and its CUDA
// elementwise ops, one kernel per operation) round twice. Products that feed an add or a
// subtraction go through mul() so that the CUDA kernels give the CPU kernels' results to the bit
// (an IoU one ulp off flips an NMS decision at the threshold). The host side is a plain
// product: setup.py compiles C++ with -ffp-contract=off, so g++ never fuses it.
MLK_HOST_DEVICE float mul(float a, float b) {
#if MLK_ON_DEVICE
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MLK_HOST_DEVICE double mul(double a, double b) {
#if MLK_ON_DEVICE
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// deltas that turn `anchor` into `box` (torchvision encode_boxes).
template <typename T>
MLK_HOST_DEVICE void encode_box(const T* box, const T* anchor, const Weights<T>& wt, T* delta) {
  const T half = T(0.5);
  const T ex_w = anchor[2] - anchor[0];
  const T ex_h = anchor[3] - anchor[1];
  const T ex_cx = anchor[0] + mul(half, ex_w);
  const T ex_cy = anchor[1] + mul(half, ex_h);
  const T gt_w = box[2] - box[0];
  const T gt_h = box[3] - box[1];
  const T gt_cx = box[0] + mul(half, gt_w);
  const T gt_cy = box[1] + mul(half, gt_h);
  delta[0] = wt.x * (gt_cx - ex_cx) / ex_w;
  delta[1] = wt.y * (gt_cy - ex_cy) / ex_h;
  delta[2] = wt.w * std::log(gt_w / ex_w);
  delta[3] = wt.h * std::log(gt_h / ex_h);
}

// The box that `delta` makes of `anchor` (torchvision BoxCoder.decode_single); dw and dh are
// clamped from above at `clip` so that exp() cannot overflow.
template <typename T>
MLK_HOST_DEVICE void decode_box(const T* delta, const T* anchor, const Weights<T>& wt, T clip,
                                T* box) {
  const T half = T(0.5);
  const T w = anchor[2] - anchor[0];
  const T h = anchor[3] - anchor[1];
  const T cx = anchor[0] + mul(half, w);
  const T cy = anchor[1] + mul(half, h);
  const T dx = delta[0] / wt.x;
  const T dy = delta[1] / wt.y;
  const T dw = clamp_max(delta[2] / wt.w, clip);
  const T dh = clamp_max(delta[3] / wt.h, clip);
  const T pred_cx = mul(dx, w) + cx;
  const T pred_cy = mul(dy, h) + cy;
  const T half_w = mul(half, mul(std::exp(dw), w));
  const T half_h = mul(half, mul(std::exp(dh), h));
  box[0] = pred_cx - half_w;
  box[1] = pred_cy - half_h;
  box[2] = pred_cx + half_w;
  box[3] = pred_cy + half_h;
}

// Gradients of decode_box w.r.t. delta and anchor, given the gradient w.r.t. the box. Where the
// clamp is active (dw >= clip: torch.clamp's backward passes none at equality) dw gets no gradient.
// A null grad_delta or grad_anchor is a gradient nobody asked for: it is not computed.
template <typename T>
MLK_HOST_DEVICE void decode_box_backward(const T* grad_box, const T* delta, const T* anchor,
                                         const Weights<T>& wt, T clip, T* grad_delta,
                                         T* grad_anchor) {
  const T half = T(0.5);
  const T w = anchor[2] - anchor[0];
  const T h = anchor[3] - anchor[1];
  const T dx = delta[0] / wt.x;
  const T dy = delta[1] / wt.y;
  const T raw_dw = delta[2] / wt.w;
  const T raw_dh = delta[3] / wt.h;
  const T exp_dw = std::exp(clamp_max(raw_dw, clip));
  const T exp_dh = std::exp(clamp_max(raw_dh, clip));
  // box = (cx' - w'/2, cy' - h'/2, cx' + w'/2, cy' + h'/2)
  const T g_cx = grad_box[0] + grad_box[2];
  const T g_cy = grad_box[1] + grad_box[3];
  const T g_pw = half * (grad_box[2] - grad_box[0]);
  const T g_ph = half * (grad_box[3] - grad_box[1]);
  if (grad_delta != nullptr) {
    grad_delta[0] = g_cx * w / wt.x;
    grad_delta[1] = g_cy * h / wt.y;
    grad_delta[2] = raw_dw < clip ? g_pw * exp_dw * w / wt.w : T(0);
    grad_delta[3] = raw_dh < clip ? g_ph * exp_dh * h / wt.h : T(0);
  }
  if (grad_anchor == nullptr) return;
  // cx' = dx * w + (x1 + w / 2) and w' = exp(dw) * w, with w = x2 - x1.
  const T g_w = g_cx * dx + g_pw * exp_dw + half * g_cx;
  const T g_h = g_cy * dy + g_ph * exp_dh + half * g_cy;
  grad_anchor[0] = g_cx - g_w;
  grad_anchor[1] = g_cy - g_h;
  grad_anchor[2] = g_w;
  grad_anchor[3] = g_h;
}

template <typename T>
MLK_HOST_DEVICE T box_area(const T* b) {
  return mul(b[2] - b[0], b[3] - b[1]);
}

// IoU of two boxes whose areas are already known (torchvision box_iou's arithmetic). Takes
// coordinates as scalars so CPU loops can feed it from structure-of-arrays storage and vectorize.
template <typename T>
MLK_HOST_DEVICE T box_iou(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2,
                          T area_b) {
  const T iw = clamp_min(nan_min(ax2, bx2) - nan_max(ax1, bx1), T(0));
  const T ih = clamp_min(nan_min(ay2, by2) - nan_max(ay1, by1), T(0));
  const T inter = mul(iw, ih);
  return inter / (area_a + area_b - inter);
}

template <typename T>
MLK_HOST_DEVICE T box_iou(const T* a, T area_a, const T* b, T area_b) {
  return box_iou(a[0], a[1], a[2], a[3], area_a, b[0], b[1], b[2], b[3], area_b);
}

// ---- CUDA thread functions: one grid-stride loop each, over rows (or pairs) ----

template <typename T>
MLK_HOST_DEVICE void encode_boxes_thread(const ThreadIndex& t, int64_t rows, const T* boxes,
                                         const T* anchors, Weights<T> wt, T* deltas) {
  for (int64_t i = t.global_x(); i < rows; i += t.grid_stride_x()) {
    encode_box(boxes + 4 * i, anchors + 4 * i, wt, deltas + 4 * i);
  }
}

template <typename T>
MLK_HOST_DEVICE void decode_boxes_thread(const ThreadIndex& t, int64_t rows, const T* deltas,
                                         const T* anchors, Weights<T> wt, T clip, T* out) {
  for (int64_t i = t.global_x(); i < rows; i += t.grid_stride_x()) {
    decode_box(deltas + 4 * i, anchors + 4 * i, wt, clip, out + 4 * i);
  }
}

// grad_deltas or grad_anchors null: not asked for (see decode_box_backward).
template <typename T>
MLK_HOST_DEVICE void decode_boxes_backward_thread(const ThreadIndex& t, int64_t rows, const T* grad,
                                                  const T* deltas, const T* anchors, Weights<T> wt,
                                                  T clip, T* grad_deltas, T* grad_anchors) {
  for (int64_t i = t.global_x(); i < rows; i += t.grid_stride_x()) {
    decode_box_backward(grad + 4 * i, deltas + 4 * i, anchors + 4 * i, wt, clip,
                        grad_deltas ? grad_deltas + 4 * i : nullptr,
                        grad_anchors ? grad_anchors + 4 * i : nullptr);
  }
}

// One element of the [n, m] IoU matrix per loop step; areas are recomputed per pair because a
// pair costs a handful of flops and the loads dominate either way.
template <typename T>
MLK_HOST_DEVICE void box_iou_thread(const ThreadIndex& t, int64_t n, int64_t m, const T* a,
                                    const T* b, T* out) {
  for (int64_t k = t.global_x(); k < n * m; k += t.grid_stride_x()) {
    const T* box_a = a + 4 * (k / m);
    const T* box_b = b + 4 * (k % m);
    out[k] = box_iou(box_a, box_area(box_a), box_b, box_area(box_b));
  }
}

}  // namespace boxes
}  // namespace mlk
