// Argument checks and preparation shared by the NMS and proposal ops' CPU, CUDA and emulated
// kernels. The Python fake kernels (mlkernels/ops/proposals.py) repeat them word for word.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../boxes/boxes.h"
#include "proposals_math.h"

namespace mlk {
namespace proposals {

using boxes::check_clamp;
using boxes::check_weights;
using boxes::to_weights;

inline void check_iou_threshold(const char* op, double threshold) {
  TORCH_CHECK_VALUE(!std::isnan(threshold) && threshold >= 0, op,
                    ": iou_threshold must be a non-negative number, got ", threshold);
}

// "Tensor[N] with N = 5" style check of a per-box vector.
inline void check_per_box(const char* op, const char* arg, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", arg, " must be Tensor[N] with N = ", n,
              " (one per box), got ", shape_str(t));
}

// Indices in processing order: torch.sort(descending=True, stable=True) along `dim` (NaN first).
inline at::Tensor sorted_order(const at::Tensor& scores, int64_t dim) {
  return std::get<1>(scores.sort(/*stable=*/true, dim, /*descending=*/true));
}

struct NmsInputs {
  at::Tensor boxes, scores, groups;  // contiguous; groups int64 (batched_nms only)
  int64_t n = 0;
};

// Checks for nms (idxs == nullptr) and batched_nms.
inline NmsInputs prepare_nms(const char* op, const at::Tensor& boxes, const at::Tensor& scores,
                             const at::Tensor* idxs, double iou_threshold) {
  check_defined(op, "boxes", boxes);
  check_defined(op, "scores", scores);
  check_boxes(op, "boxes", boxes, 2);
  check_floating(op, "boxes", boxes, /*allow_half=*/true);
  const int64_t n = boxes.size(0);
  check_per_box(op, "scores", scores, n);
  check_same_dtype(op, "boxes", boxes, "scores", scores);
  check_same_device(op, "boxes", boxes, "scores", scores);
  NmsInputs in;
  if (idxs != nullptr) {
    check_defined(op, "idxs", *idxs);
    check_per_box(op, "idxs", *idxs, n);
    TORCH_CHECK(at::isIntegralType(idxs->scalar_type(), /*includeBool=*/false), op,
                ": idxs must be an integer tensor, got ", dtype_str(idxs->scalar_type()));
    check_same_device(op, "boxes", boxes, "idxs", *idxs);
    in.groups = contiguous_input(op, "idxs", idxs->to(at::kLong));
  }
  check_iou_threshold(op, iou_threshold);
  // float16/bfloat16 boxes and scores are compared in float32, to which they convert exactly (so
  // the score order and its ties are the given ones; IoUs are float32's).
  const auto compute_type = boxes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  in.boxes = contiguous_input(op, "boxes", boxes).to(compute_type);
  in.scores = contiguous_input(op, "scores", scores).to(compute_type);
  in.n = n;
  return in;
}

// The most output rows per image propose accepts (see prepare_propose).
constexpr int64_t kMaxProposals = int64_t(1) << 24;

struct ProposeArgs {
  int64_t pre_nms_top_n, post_nms_top_n;
  double iou_threshold, min_size, score_threshold;
  bool append_whole_image;
};

struct ProposeInputs {
  at::Tensor anchors, deltas, objectness, sizes;  // contiguous; sizes [N, 2] in the boxes' dtype
  int64_t images = 0, num_anchors = 0;
  int64_t k = 0;     // candidates per image: min(pre_nms_top_n, A)
  int64_t rows = 0;  // output rows per image: post_nms_top_n (+1 with append_whole_image)
};

inline void check_number(const char* op, const char* arg, double value) {
  TORCH_CHECK_VALUE(!std::isnan(value), op, ": ", arg, " must be a number, got nan");
}

inline void check_count(const char* op, const char* arg, int64_t value) {
  TORCH_CHECK_VALUE(value >= 0, op, ": ", arg, " must be >= 0, got ", value);
}

// The checks propose and propose_backward share: anchors Tensor[A, 4] and deltas Tensor[N, A, 4]
// of one floating dtype, image_sizes Tensor[N, 2] of a real dtype, all on one device.
inline void check_anchors_deltas_sizes(const char* op, const at::Tensor& anchors,
                                       const at::Tensor& deltas, const at::Tensor& image_sizes) {
  check_defined(op, "anchors", anchors);
  check_defined(op, "deltas", deltas);
  check_defined(op, "image_sizes", image_sizes);
  TORCH_CHECK(anchors.dim() == 2 && anchors.size(1) == 4, op,
              ": anchors must be Tensor[A, 4], got ", shape_str(anchors));
  check_floating(op, "anchors", anchors);
  const int64_t a = anchors.size(0);
  TORCH_CHECK(deltas.dim() == 3 && deltas.size(1) == a && deltas.size(2) == 4, op,
              ": deltas must be Tensor[N, A, 4] with A = ", a, ", got ", shape_str(deltas));
  const int64_t n = deltas.size(0);
  TORCH_CHECK(image_sizes.dim() == 2 && image_sizes.size(0) == n && image_sizes.size(1) == 2, op,
              ": image_sizes must be Tensor[N, 2] = Tensor[", n, ", 2] (height, width), got ",
              shape_str(image_sizes));
  check_same_dtype(op, "anchors", anchors, "deltas", deltas);
  TORCH_CHECK(image_sizes.scalar_type() != at::kBool && !image_sizes.is_complex(), op,
              ": image_sizes must be an integer or floating tensor, got ",
              dtype_str(image_sizes.scalar_type()));
  check_same_device(op, "anchors", anchors, "deltas", deltas);
  check_same_device(op, "anchors", anchors, "image_sizes", image_sizes);
}

// The largest image size propose accepts for boxes of `type`: a larger one is infinite there.
inline double largest_image_size(at::ScalarType type) {
  return type == at::kFloat ? static_cast<double>(std::numeric_limits<float>::max())
                            : std::numeric_limits<double>::max();
}

// A negative, NaN or (in the boxes' dtype) infinite size would clip every box to nonsense rather
// than fail. The CPU kernel checks the sizes as given (so that the message shows them) before it
// starts, which on the CPU costs no synchronisation; the CUDA kernels check them on the device
// instead (image_sizes_check_thread in proposals_math.h), by the same rule.
inline void check_image_sizes_eagerly(const char* op, const at::Tensor& image_sizes,
                                      at::ScalarType boxes_type) {
  if (image_sizes.numel() == 0) return;
  const auto given = image_sizes.to(at::kDouble);
  const double largest = largest_image_size(boxes_type);
  const auto ok = (given >= 0) & (given <= largest);  // NaN fails both
  if (!ok.all().item<bool>()) {
    const int64_t row = (~ok.all(1)).nonzero().select(0, 0).item<int64_t>();
    const auto bad = given.select(0, row);
    TORCH_CHECK_VALUE(false, op, ": image_sizes must be finite, >= 0 and at most the largest ",
                      dtype_str(boxes_type), " (", largest, "), got (", bad[0].item<double>(), ", ",
                      bad[1].item<double>(), ") for image ", row);
  }
}

inline ProposeInputs prepare_propose(const at::Tensor& anchors, const at::Tensor& deltas,
                                     const at::Tensor& objectness, const at::Tensor& image_sizes,
                                     const ProposeArgs& args, at::ArrayRef<double> weights,
                                     double clamp) {
  const char* op = "propose";
  check_anchors_deltas_sizes(op, anchors, deltas, image_sizes);
  check_defined(op, "objectness", objectness);
  const int64_t a = anchors.size(0);
  const int64_t n = deltas.size(0);
  TORCH_CHECK(objectness.dim() == 2 && objectness.size(0) == n && objectness.size(1) == a, op,
              ": objectness must be Tensor[N, A] = Tensor[", n, ", ", a, "], got ",
              shape_str(objectness));
  check_same_dtype(op, "anchors", anchors, "objectness", objectness);
  check_same_device(op, "anchors", anchors, "objectness", objectness);
  check_count(op, "pre_nms_top_n", args.pre_nms_top_n);
  check_count(op, "post_nms_top_n", args.post_nms_top_n);
  // The output has post_nms_top_n (+1) rows per image whatever is kept: bounded, so that the row
  // count cannot overflow and a "keep everything" sentinel fails here rather than in the allocator.
  TORCH_CHECK_VALUE(args.post_nms_top_n <= kMaxProposals, op, ": post_nms_top_n must be at most ",
                    kMaxProposals, " (the output has that many rows per image), got ",
                    args.post_nms_top_n);
  check_iou_threshold(op, args.iou_threshold);
  check_number(op, "min_size", args.min_size);
  check_number(op, "score_threshold", args.score_threshold);
  check_weights(op, weights);
  check_clamp(op, clamp);
  ProposeInputs in;
  in.anchors = contiguous_input(op, "anchors", anchors);
  in.deltas = contiguous_input(op, "deltas", deltas);
  in.objectness = contiguous_input(op, "objectness", objectness);
  // torchvision clamps with Python numbers, which the comparison converts to the boxes' dtype.
  // Their values are checked by each kernel: check_image_sizes_eagerly before the CPU's, and
  // image_sizes_check_thread on the device for CUDA's (and the emulator's).
  in.sizes = contiguous_input(op, "image_sizes", image_sizes.to(anchors.scalar_type()));
  in.images = n;
  in.num_anchors = a;
  in.k = std::min(args.pre_nms_top_n, a);
  in.rows = args.post_nms_top_n + (args.append_whole_image ? 1 : 0);
  return in;
}

// The outputs of propose: boxes [N, P, 4], scores [N, P], counts [N] and, for the backward, the
// anchor behind each row [N, P] (-1 for the whole-image box and empty rows).
struct ProposeOutputs {
  at::Tensor boxes, scores, counts, kept_anchors;
};

inline ProposeOutputs empty_propose_outputs(const ProposeInputs& in) {
  const auto opts = in.deltas.options();
  ProposeOutputs out;
  out.boxes = at::empty({in.images, in.rows, 4}, opts);
  out.scores = at::empty({in.images, in.rows}, opts);
  out.counts = at::empty({in.images}, opts.dtype(at::kLong));
  out.kept_anchors = at::empty({in.images, in.rows}, opts.dtype(at::kLong));
  return out;
}

// Checks for propose_backward. kept_anchors comes from propose; its values must lie in [-1, A).
// The CPU kernel checks them here (`values_on_host`: free on the CPU); the CUDA kernel (and the
// emulator) where it reads them (propose_backward_thread), which also skips any other value, so
// that a hand-made call never indexes out of range even where device asserts are compiled out.
inline void check_propose_backward(const at::Tensor& grad_boxes, const at::Tensor& anchors,
                                   const at::Tensor& deltas, const at::Tensor& kept_anchors,
                                   const at::Tensor& sizes, bool values_on_host) {
  const char* op = "propose_backward";
  check_anchors_deltas_sizes(op, anchors, deltas, sizes);
  check_defined(op, "grad_boxes", grad_boxes);
  check_defined(op, "kept_anchors", kept_anchors);
  TORCH_CHECK(kept_anchors.dim() == 2 && kept_anchors.size(0) == deltas.size(0) &&
                  kept_anchors.scalar_type() == at::kLong,
              op, ": kept_anchors must be int64 Tensor[N, P] with N = ", deltas.size(0), ", got ",
              dtype_str(kept_anchors.scalar_type()), " ", shape_str(kept_anchors));
  TORCH_CHECK(grad_boxes.dim() == 3 && grad_boxes.size(0) == kept_anchors.size(0) &&
                  grad_boxes.size(1) == kept_anchors.size(1) && grad_boxes.size(2) == 4,
              op, ": grad_boxes must be Tensor[N, P, 4] = Tensor[", kept_anchors.size(0), ", ",
              kept_anchors.size(1), ", 4], got ", shape_str(grad_boxes));
  check_same_dtype(op, "deltas", deltas, "grad_boxes", grad_boxes);
  check_same_device(op, "deltas", deltas, "grad_boxes", grad_boxes);
  check_same_device(op, "deltas", deltas, "kept_anchors", kept_anchors);
  if (values_on_host && kept_anchors.numel() > 0) {
    const int64_t low = kept_anchors.min().item<int64_t>();
    const int64_t high = kept_anchors.max().item<int64_t>();
    TORCH_CHECK(low >= -1 && high < anchors.size(0), op,
                ": kept_anchors must lie in [-1, A) with A = ", anchors.size(0),
                ", got values in [", low, ", ", high, "]");
  }
}

}  // namespace proposals
}  // namespace mlk
