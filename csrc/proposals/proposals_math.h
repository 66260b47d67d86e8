// NMS and proposal math shared by the CPU kernels, the CUDA kernels and the grid emulator.
//
// The CUDA NMS is the bitmask algorithm, per group: a mask kernel sets, for every candidate i and
// every later candidate j of its group that i suppresses, bit j of i's mask row; a reduce kernel
// (one block per group, the groups in parallel) then walks each group's candidates in score order
// on the device, skipping removed ones and OR-ing each kept candidate's row into the removed set.
// Candidates are always given in processing order within their group (descending score, ties to
// the lower index), so "later" means "lower priority".
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

// ---- CUDA thread functions of the bitmask NMS, per group ----

constexpr int64_t kMaskBits = 64;  // candidates per mask word, and threads per mask block

MLK_HOST_DEVICE int64_t mask_words(int64_t n) { return (n + kMaskBits - 1) / kMaskBits; }

// The candidates are one list in processing order cut into `groups` contiguous groups: group g
// holds positions [starts[g], starts[g + 1]) (nms: one group; batched_nms: one per idxs value;
// propose: one per image). A candidate only suppresses later candidates of its own group, so
// each group has its own mask at mask_offsets[g], n_g rows over words_g = mask_words(n_g) words,
// and its own words_g x words_g mask blocks ("tiles"), numbered from tile_offsets[g] in the mask
// kernel's 1-D grid. All three arrays hold (at least) groups + 1 entries, the last being the
// totals.
//
// A row stores only its words from its own (i / 64) on: a candidate suppresses no earlier one,
// and the reduce reads no earlier word. Row i starts at nms_row_offset(i, words_g) in its group's
// mask, and nms_row_offset(n_g, words_g) is the group's mask size, about half of n_g * words_g.
MLK_HOST_DEVICE int64_t nms_row_offset(int64_t i, int64_t words) {
  const int64_t blocks = i / kMaskBits;  // full row blocks before i: 64 rows of words - b each
  return kMaskBits * (blocks * words - blocks * (blocks - 1) / 2) +
         (i - kMaskBits * blocks) * (words - blocks);
}

// A group of n candidates: its mask blocks, and its stored mask words.
MLK_HOST_DEVICE int64_t nms_group_tiles(int64_t n) { return mask_words(n) * mask_words(n); }
MLK_HOST_DEVICE int64_t nms_group_mask_size(int64_t n) { return nms_row_offset(n, mask_words(n)); }

// One group slot per loop step: the group's mask blocks and stored mask words (starts has
// slots + 1 entries; a slot past the last group is empty and gets zeros).
MLK_HOST_DEVICE void nms_group_sizes_thread(const ThreadIndex& t, int64_t slots,
                                            const int64_t* starts, int64_t* tiles,
                                            int64_t* mask_size) {
  for (int64_t g = t.global_x(); g < slots; g += t.grid_stride_x()) {
    const int64_t n = starts[g + 1] - starts[g];
    tiles[g] = nms_group_tiles(n);
    mask_size[g] = nms_group_mask_size(n);
  }
}

// The groups one pair of launches (a "chunk") works on: first_group .. first_group + groups - 1.
// The arrays are the whole list's; the chunk's mask buffer holds its groups' masks only, from
// mask_offsets[first_group] = first_word on, and its mask grid starts at tile_offsets[first_group]
// = first_tile.
struct NmsSegments {
  int64_t first_group, groups;
  const int64_t* starts;
  const int64_t* tile_offsets;
  const int64_t* mask_offsets;
  int64_t first_tile, first_word;
};

// What one mask block compares: rows of block row_block with columns of block col_block of the
// group of n candidates that starts at position `start`.
struct NmsTile {
  int64_t start, n, words, row_block, col_block, mask_offset;
};

// The tile of mask block `block`: the last group whose first tile is at or before it (a binary
// search; a group without candidates has no tiles and is skipped), then row-major in the group.
MLK_HOST_DEVICE NmsTile nms_find_tile(const NmsSegments& s, int64_t block_in_chunk) {
  const int64_t block = s.first_tile + block_in_chunk;
  int64_t low = s.first_group, high = s.first_group + s.groups - 1;
  while (low < high) {
    const int64_t mid = (low + high + 1) / 2;
    if (s.tile_offsets[mid] <= block) {
      low = mid;
    } else {
      high = mid - 1;
    }
  }
  NmsTile tile;
  tile.start = s.starts[low];
  tile.n = s.starts[low + 1] - tile.start;
  tile.words = mask_words(tile.n);
  const int64_t local = block - s.tile_offsets[low];
  tile.row_block = local / tile.words;
  tile.col_block = local % tile.words;
  tile.mask_offset = s.mask_offsets[low] - s.first_word;
  return tile;
}

// Mask kernel, grid (the chunk's tiles), 64 threads, shared memory: the 64 column boxes. Tiles
// below the diagonal return at once (a candidate only suppresses later ones, and the reduce reads
// no earlier words of a row).

// Phase 1: the column block's boxes into shared memory.
template <typename T>
MLK_HOST_DEVICE void nms_mask_load(const ThreadIndex& t, const NmsTile& tile, const T* boxes,
                                   T* col_boxes) {
  const int64_t j = tile.col_block * kMaskBits + t.thread.x;
  if (j >= tile.n) return;
  for (int c = 0; c < 4; ++c) col_boxes[4 * t.thread.x + c] = boxes[4 * (tile.start + j) + c];
}

// Phase 2: thread i of the row block sets bit jj of its mask word when column candidate jj comes
// after i and overlaps it by IoU > threshold.
template <typename T>
MLK_HOST_DEVICE void nms_mask_row(const ThreadIndex& t, const NmsTile& tile, const T* boxes,
                                  T threshold, const T* col_boxes, uint64_t* mask) {
  const int64_t i = tile.row_block * kMaskBits + t.thread.x;
  if (i >= tile.n) return;
  const int64_t col_size = tile.n - tile.col_block * kMaskBits < kMaskBits
                               ? tile.n - tile.col_block * kMaskBits
                               : kMaskBits;
  const T* box = boxes + 4 * (tile.start + i);
  const T area = box_area(box);
  uint64_t bits = 0;
  for (int64_t jj = tile.row_block == tile.col_block ? t.thread.x + 1 : 0; jj < col_size; ++jj) {
    const T* other = col_boxes + 4 * jj;
    if (box_iou(box, area, other, box_area(other)) > threshold) bits |= uint64_t(1) << jj;
  }
  mask[tile.mask_offset + nms_row_offset(i, tile.words) + tile.col_block - tile.row_block] = bits;
}

// Reduce kernel, grid (the chunk's groups), one block per group, any block size; shared memory:
// `diagonal` (64 words) then the group's `removed` words. The block walks its group's candidates one mask
// word (64 candidates) at a time, in two phases per word:
//  A. the 64 rows' own words of that mask column (the "diagonal" word of each row) go to shared
//     memory, so that the serial walk of B reads shared memory, not global;
//  B. every thread copies removed[w] into a register and walks its 64 bits alike (the same
//     values, so the same decisions): a candidate not removed is kept and ORs its diagonal word
//     into the register; then the kept rows' later words w + 1.. go into removed, each word by
//     one thread (j = w + 1 + rank, strided by the block size).
// Race-free: removed[w] is read only in B(w) and written only in B(< w), behind a barrier; in
// B(w) each removed[j > w] has one writer and no reader; `diagonal` is written in A(w), read in
// B(w) and written again in A(w + 1), each behind a barrier. One barrier pair per 64 candidates.

// The loop over a mask word's 64 kept rows in phase B, unrolled by 8 on the device: 8 loads in
// flight per thread, 78 registers on sm_90. Left to itself nvcc unrolled it further as the code
// around it changed (94, then 130 registers), and a block of 512 threads, the reduce's largest,
// cannot launch above 128. The host compilers see no pragma (GCC would warn about it).
#if defined(__CUDA_ARCH__)
#define MLK_NMS_UNROLL_KEPT_ROWS _Pragma("unroll 8")
#else
#define MLK_NMS_UNROLL_KEPT_ROWS
#endif

// Each thread's own copy of the walk's state (all threads hold the same values).
struct NmsReduceState {
  int64_t count;  // candidates kept so far
};

// The group a reduce block walks.
struct NmsGroup {
  int64_t index, start, n, words;
  const uint64_t* mask;  // its rows
};

// `block`: the reduce block's index in its chunk; `mask`: the chunk's mask buffer.
MLK_HOST_DEVICE NmsGroup nms_group(const NmsSegments& s, const uint64_t* mask, int64_t block) {
  NmsGroup g;
  g.index = s.first_group + block;
  g.start = s.starts[g.index];
  g.n = s.starts[g.index + 1] - g.start;
  g.words = mask_words(g.n);
  g.mask = mask + (s.mask_offsets[g.index] - s.first_word);
  return g;
}

// First phase: removed starts as the set of invalid candidates (valid == nullptr: all valid).
MLK_HOST_DEVICE void nms_reduce_init(const ThreadIndex& t, const NmsGroup& g, const bool* valid,
                                     uint64_t* removed, NmsReduceState& state) {
  state.count = 0;
  for (int64_t w = t.thread_rank(); w < g.words; w += t.block_dim.count()) {
    uint64_t bits = 0;
    for (int64_t b = 0; valid != nullptr && b < kMaskBits && w * kMaskBits + b < g.n; ++b) {
      if (!valid[g.start + w * kMaskBits + b]) bits |= uint64_t(1) << b;
    }
    removed[w] = bits;
  }
}

// Phase A of word w.
MLK_HOST_DEVICE void nms_reduce_load_diagonal(const ThreadIndex& t, const NmsGroup& g, int64_t w,
                                              uint64_t* diagonal) {
  for (int64_t b = t.thread_rank(); b < kMaskBits; b += t.block_dim.count()) {
    const int64_t i = w * kMaskBits + b;
    diagonal[b] = i < g.n ? g.mask[nms_row_offset(i, g.words)] : 0;  // the row's first word
  }
}

// Phase B of word w, until max_keep candidates are kept. Thread 0 records each kept candidate:
// its position in the group in kept[group, count] (kept == nullptr: not asked) and a flag for
// list position p at keep_flags[flag_index[p]] (flag_index == nullptr: at p; keep_flags ==
// nullptr: not asked).
MLK_HOST_DEVICE void nms_reduce_word(const ThreadIndex& t, const NmsGroup& g, int64_t w,
                                     int64_t max_keep, const uint64_t* diagonal, uint64_t* removed,
                                     NmsReduceState& state, int64_t* kept, bool* keep_flags,
                                     const int64_t* flag_index) {
  // 1. Which of the word's candidates are kept, from removed[w] and the diagonal words alone
  //    (a register and shared memory): the serial part, the same in every thread.
  uint64_t removed_here = removed[w], kept_here = 0;
  for (int64_t b = 0; b < kMaskBits && w * kMaskBits + b < g.n && state.count < max_keep; ++b) {
    if ((removed_here >> b) & 1) continue;
    removed_here |= diagonal[b];
    kept_here |= uint64_t(1) << b;
    if (t.thread_rank() == 0) {
      const int64_t i = w * kMaskBits + b, p = g.start + i;
      if (kept != nullptr) kept[g.index * max_keep + state.count] = i;
      if (keep_flags != nullptr) keep_flags[flag_index != nullptr ? flag_index[p] : p] = true;
    }
    ++state.count;
  }
  // 2. The kept rows' later words into removed, word j by one thread: OR-ed in a register first,
  //    so that the loads of the kept rows do not wait on each other.
  if (kept_here == 0) return;
  const int64_t first_row = nms_row_offset(w * kMaskBits, g.words);
  const int64_t row_size = g.words - w;  // each row of mask block w stores words w..words-1
  for (int64_t j = w + 1 + t.thread_rank(); j < g.words; j += t.block_dim.count()) {
    uint64_t bits = 0;
    MLK_NMS_UNROLL_KEPT_ROWS
    for (int64_t b = 0; b < kMaskBits; ++b) {
      if ((kept_here >> b) & 1) bits |= g.mask[first_row + b * row_size + (j - w)];
    }
    removed[j] |= bits;
  }
}

// Last phase: the kept count, and -1 in the unused slots of kept.
MLK_HOST_DEVICE void nms_reduce_finish(const ThreadIndex& t, const NmsGroup& g, int64_t max_keep,
                                       const NmsReduceState& state, int64_t* kept,
                                       int64_t* counts) {
  for (int64_t c = state.count + t.thread_rank(); kept != nullptr && c < max_keep;
       c += t.block_dim.count()) {
    kept[g.index * max_keep + c] = -1;
  }
  if (counts != nullptr && t.thread_rank() == 0) counts[g.index] = state.count;
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
