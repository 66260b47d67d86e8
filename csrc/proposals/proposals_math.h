// NMS and proposal math shared by the CPU kernels, the CUDA kernels and the grid emulator.
//
// The CUDA NMS is the bitmask algorithm: a mask kernel sets, for every candidate i and every
// later candidate j that i suppresses, bit j of i's mask row; a reduce kernel (one block per
// image) then walks the candidates in score order on the device, skipping removed ones and OR-ing
// each kept candidate's row into the removed set. Candidates are always given in processing order
// (descending score, ties to the lower index), so "later" means "lower priority".
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../boxes/boxes_math.h"
#include "../common/kernel_check.h"

namespace mlk {
namespace proposals {

// The box math this family builds on (csrc/boxes/boxes_math.h).
using boxes::box_area;
using boxes::box_iou;
using boxes::clamp_max;
using boxes::clamp_min;
using boxes::decode_box;
using boxes::decode_box_backward;
using boxes::Weights;

// The largest T not above `threshold`. torchvision compares a T-valued IoU with a double
// threshold (so in double); for every T value x, x > threshold exactly when
// x > threshold_below<T>(threshold), which lets kernels compare in T (and vectorize) with
// torchvision's results.
template <typename T>
inline T threshold_below(double threshold) {
  T t = static_cast<T>(threshold);
  if (static_cast<double>(t) > threshold) {
    t = std::nextafter(t, -std::numeric_limits<T>::infinity());
  }
  return t;
}

// ---- proposals ----

// A proposal box: `anchor` decoded by `delta`, then clipped to [0, width] x [0, height] as
// torchvision's clip_boxes_to_image (torch.clamp(min=0, max=size); NaN stays NaN). `raw` gets the
// decoded box before clipping (the backward needs it to know which coordinates were clamped).
template <typename T>
MLK_HOST_DEVICE void decode_proposal(const T* delta, const T* anchor, const Weights<T>& wt, T clip,
                                     T height, T width, T* raw, T* box) {
  decode_box(delta, anchor, wt, clip, raw);
  box[0] = clamp_max(clamp_min(raw[0], T(0)), width);
  box[1] = clamp_max(clamp_min(raw[1], T(0)), height);
  box[2] = clamp_max(clamp_min(raw[2], T(0)), width);
  box[3] = clamp_max(clamp_min(raw[3], T(0)), height);
}

// Whether a clipped proposal survives the filters: finite coordinates, both sides >= min_size
// (torchvision's remove_small_boxes), score >= score_threshold. NaN fails every comparison, so a
// NaN box or score is dropped. (v - v == 0 is a finiteness test that needs no std::isfinite on
// the device.)
template <typename T>
MLK_HOST_DEVICE bool proposal_valid(const T* box, T score, T min_size, T score_threshold) {
  for (int c = 0; c < 4; ++c) {
    if (!(box[c] - box[c] == T(0))) return false;
  }
  return box[2] - box[0] >= min_size && box[3] - box[1] >= min_size && score >= score_threshold;
}

// The whole-image proposal that append_whole_image adds.
template <typename T>
MLK_HOST_DEVICE void whole_image_box(T height, T width, T* box) {
  box[0] = T(0);
  box[1] = T(0);
  box[2] = width;
  box[3] = height;
}

// Gradient of a kept proposal w.r.t. its delta and anchor, given the gradient w.r.t. its clipped
// box: a clamped coordinate passes its gradient only where the raw value lay strictly inside
// (0, size) (torch.clamp's backward, which passes none at equality), then back through decode_box.
template <typename T>
MLK_HOST_DEVICE void proposal_backward(const T* grad_box, const T* delta, const T* anchor,
                                       const Weights<T>& wt, T clip, T height, T width,
                                       T* grad_delta, T* grad_anchor) {
  T raw[4], box[4];
  decode_proposal(delta, anchor, wt, clip, height, width, raw, box);
  const T limit[4] = {width, height, width, height};
  T grad_raw[4];
  for (int c = 0; c < 4; ++c) {
    grad_raw[c] = (raw[c] > T(0) && raw[c] < limit[c]) ? grad_box[c] : T(0);
  }
  decode_box_backward(grad_raw, delta, anchor, wt, clip, grad_delta, grad_anchor);
}

// ---- CUDA thread functions of the bitmask NMS ----

constexpr int64_t kMaskBits = 64;  // candidates per mask word, and threads per mask block

MLK_HOST_DEVICE int64_t mask_words(int64_t n) { return (n + kMaskBits - 1) / kMaskBits; }

// Mask kernel, grid (words, words, images), 64 threads, shared memory: 64 boxes then 64 groups.
// Block (x, y, z) compares row block y with column block x of image z; blocks below the diagonal
// do nothing (a candidate only suppresses later ones, and the reduce reads no earlier words).

// Phase 1: the column block's boxes (and group ids) into shared memory.
template <typename T>
MLK_HOST_DEVICE void nms_mask_load(const ThreadIndex& t, int64_t n, const T* boxes,
                                   const int64_t* groups, T* col_boxes, int64_t* col_groups) {
  const int64_t image = t.block.z, j = t.block.x * kMaskBits + t.thread.x;
  if (t.block.y > t.block.x || j >= n) return;
  for (int c = 0; c < 4; ++c) col_boxes[4 * t.thread.x + c] = boxes[4 * (image * n + j) + c];
  col_groups[t.thread.x] = groups != nullptr ? groups[image * n + j] : 0;
}

// Phase 2: thread i of the row block sets bit jj of its mask word when column candidate jj comes
// after i, is in i's group, and overlaps i by IoU > threshold.
template <typename T>
MLK_HOST_DEVICE void nms_mask_row(const ThreadIndex& t, int64_t n, const T* boxes,
                                  const int64_t* groups, T threshold, const T* col_boxes,
                                  const int64_t* col_groups, uint64_t* mask) {
  const int64_t image = t.block.z, col_block = t.block.x, row_block = t.block.y;
  const int64_t i = row_block * kMaskBits + t.thread.x;
  if (row_block > col_block || i >= n) return;
  const int64_t col_size =
      n - col_block * kMaskBits < kMaskBits ? n - col_block * kMaskBits : kMaskBits;
  const T* box = boxes + 4 * (image * n + i);
  const T area = box_area(box);
  const int64_t group = groups != nullptr ? groups[image * n + i] : 0;
  uint64_t bits = 0;
  for (int64_t jj = row_block == col_block ? t.thread.x + 1 : 0; jj < col_size; ++jj) {
    const T* other = col_boxes + 4 * jj;
    if (col_groups[jj] == group && box_iou(box, area, other, box_area(other)) > threshold) {
      bits |= uint64_t(1) << jj;
    }
  }
  mask[(image * n + i) * mask_words(n) + col_block] = bits;
}

// Reduce kernel, grid (images), any block size; `removed` is [images, words] in global memory
// (no shared-memory limit on n). Its loop over candidates runs in every thread alike: each reads
// the same removed bit after a barrier, so all take the same branch.

// Phase 1: removed starts as the set of invalid candidates (valid == nullptr: all valid).
MLK_HOST_DEVICE void nms_reduce_init(const ThreadIndex& t, int64_t n, const bool* valid,
                                     uint64_t* removed) {
  const int64_t image = t.block.x, words = mask_words(n);
  for (int64_t w = t.thread_rank(); w < words; w += t.block_dim.count()) {
    uint64_t bits = 0;
    for (int64_t b = 0; valid != nullptr && b < kMaskBits && w * kMaskBits + b < n; ++b) {
      if (!valid[image * n + w * kMaskBits + b]) bits |= uint64_t(1) << b;
    }
    removed[image * words + w] = bits;
  }
}

MLK_HOST_DEVICE bool nms_is_removed(const uint64_t* removed_of_image, int64_t i) {
  return ((removed_of_image[i / kMaskBits] >> (i % kMaskBits)) & 1) != 0;
}

// Phase per kept candidate i (the count-th kept): OR i's mask row into removed; thread 0 records
// i. Only words from i's own onward: earlier words of the row are never written.
MLK_HOST_DEVICE void nms_reduce_keep(const ThreadIndex& t, int64_t n, int64_t i, int64_t count,
                                     int64_t max_keep, const uint64_t* mask, uint64_t* removed,
                                     int64_t* kept) {
  const int64_t image = t.block.x, words = mask_words(n);
  const uint64_t* row = mask + (image * n + i) * words;
  for (int64_t w = i / kMaskBits + t.thread_rank(); w < words; w += t.block_dim.count()) {
    removed[image * words + w] |= row[w];
  }
  if (t.thread_rank() == 0) kept[image * max_keep + count] = i;
}

// Last phase: the kept count, and -1 in the unused slots.
MLK_HOST_DEVICE void nms_reduce_finish(const ThreadIndex& t, int64_t count, int64_t max_keep,
                                       int64_t* kept, int64_t* counts) {
  const int64_t image = t.block.x;
  for (int64_t c = count + t.thread_rank(); c < max_keep; c += t.block_dim.count()) {
    kept[image * max_keep + c] = -1;
  }
  if (t.thread_rank() == 0) counts[image] = count;
}

// ---- CUDA thread functions of propose ----

// One image per loop step: its (height, width) as given (`given`, [images, 2] in float64) must be
// finite, >= 0 and at most `largest` (the largest value of the boxes' dtype, in which the boxes
// are clipped to them), the rule of the CPU's check_image_sizes_eagerly (proposals.h). On CUDA a
// bad size stops the kernel with a device-side assert (kernel_check.h); in the emulator it throws.
// The other kernels then read only the converted sizes, for clipping, never as an index.
MLK_HOST_DEVICE void image_sizes_check_thread(const ThreadIndex& t, int64_t images,
                                              const double* given, double largest) {
  for (int64_t image = t.global_x(); image < images; image += t.grid_stride_x()) {
    const double height = given[2 * image], width = given[2 * image + 1];
    // NaN fails both comparisons
    const bool ok = height >= 0 && height <= largest && width >= 0 && width <= largest;
    MLK_KERNEL_CHECK(ok,
                     "propose: image_sizes must be finite, >= 0 and at most the largest value of "
                     "the boxes' dtype",
                     " (", largest, "), got (", height, ", ", width, ") for image ", image);
  }
}

// One candidate per loop step: candidate r of image r / k is anchor order[r], decoded, clipped and
// filtered. sizes is [images, 2] (height, width).
template <typename T>
MLK_HOST_DEVICE void propose_decode_thread(const ThreadIndex& t, int64_t images, int64_t k,
                                           int64_t num_anchors, const T* anchors, const T* deltas,
                                           const int64_t* order, const T* scores, const T* sizes,
                                           Weights<T> wt, T clip, T min_size, T score_threshold,
                                           T* boxes, bool* valid) {
  for (int64_t r = t.global_x(); r < images * k; r += t.grid_stride_x()) {
    const int64_t image = r / k, a = order[r];
    T raw[4];
    decode_proposal(deltas + 4 * (image * num_anchors + a), anchors + 4 * a, wt, clip,
                    sizes[2 * image], sizes[2 * image + 1], raw, boxes + 4 * r);
    valid[r] = proposal_valid(boxes + 4 * r, scores[r], min_size, score_threshold);
  }
}

// One output row per loop step: row c of image q / rows is the c-th kept candidate, then the
// whole-image box when `append`, then zeros (anchor index -1 where no anchor is behind the row).
template <typename T>
MLK_HOST_DEVICE void propose_output_thread(const ThreadIndex& t, int64_t images, int64_t k,
                                           int64_t max_keep, int64_t rows, bool append,
                                           const T* cand_boxes, const T* cand_scores,
                                           const int64_t* order, const int64_t* kept,
                                           const int64_t* kept_counts, const T* sizes, T* out_boxes,
                                           T* out_scores, int64_t* out_counts,
                                           int64_t* out_anchors) {
  for (int64_t q = t.global_x(); q < images * rows; q += t.grid_stride_x()) {
    const int64_t image = q / rows, c = q % rows, count = kept_counts[image];
    T* box = out_boxes + 4 * q;
    if (c < count) {
      const int64_t r = image * k + kept[image * max_keep + c];
      for (int j = 0; j < 4; ++j) box[j] = cand_boxes[4 * r + j];
      out_scores[q] = cand_scores[r];
      out_anchors[q] = order[r];
    } else {
      const bool whole = append && c == count;
      if (whole) {
        whole_image_box(sizes[2 * image], sizes[2 * image + 1], box);
      } else {
        for (int j = 0; j < 4; ++j) box[j] = T(0);
      }
      out_scores[q] = whole ? T(1) : T(0);
      out_anchors[q] = -1;
    }
    if (c == 0) out_counts[image] = count + (append ? 1 : 0);
  }
}

// One output row per loop step: the gradient of a kept proposal to its delta and to its anchor
// (null pointers: not asked for), and target[q] = image * num_anchors + anchor, the row of the
// [N * A, 4] gradient it goes to; the host sums the rows into it with index_add, so an anchor
// repeated within an image (never from propose, possible in a hand-made call) adds up. A row with
// no anchor (-1) passes zeros to its image's anchor 0. Any other value outside [0, num_anchors)
// cannot come from propose: a device-side assert on CUDA, an error in the emulator (the CPU
// checked before), and zeros where device asserts are compiled out.
template <typename T>
MLK_HOST_DEVICE void propose_backward_thread(const ThreadIndex& t, int64_t images, int64_t rows,
                                             int64_t num_anchors, const T* grad_boxes,
                                             const T* anchors, const T* deltas,
                                             const int64_t* kept_anchors, const T* sizes,
                                             Weights<T> wt, T clip, T* row_grad_deltas,
                                             T* row_grad_anchors, int64_t* target) {
  for (int64_t q = t.global_x(); q < images * rows; q += t.grid_stride_x()) {
    const int64_t image = q / rows, a = kept_anchors[q];
    MLK_KERNEL_CHECK(a >= -1 && a < num_anchors,
                     "propose_backward: kept_anchors must lie in [-1, A), A = anchors.size(0)",
                     ", got ", a, " (A = ", num_anchors, ") in row ", q % rows, " of image ", image);
    T* gd = row_grad_deltas ? row_grad_deltas + 4 * q : nullptr;
    T* ga = row_grad_anchors ? row_grad_anchors + 4 * q : nullptr;
    if (a < 0 || a >= num_anchors) {
      for (int c = 0; c < 4; ++c) {
        if (gd) gd[c] = T(0);
        if (ga) ga[c] = T(0);
      }
      target[q] = image * num_anchors;
      continue;
    }
    const int64_t d = image * num_anchors + a;
    proposal_backward(grad_boxes + 4 * q, deltas + 4 * d, anchors + 4 * a, wt, clip,
                      sizes[2 * image], sizes[2 * image + 1], gd, ga);
    target[q] = d;
  }
}

}  // namespace proposals
}  // namespace mlk
