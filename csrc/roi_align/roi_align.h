// Argument checks and preparation shared by roi_align's CPU, CUDA and emulated kernels.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "../common/checks.h"
#include "roi_align_math.h"

namespace mlk {
namespace roi_align {

// A fixed sampling_ratio above this is refused: a bin would average more than a million samples,
// a loop that runs for hours (adaptive sampling is bounded by the map, see sample_range).
constexpr int64_t kMaxSamplingRatio = 1024;

struct Args {
  double spatial_scale;
  int64_t pooled_height, pooled_width, sampling_ratio;
  bool aligned;
};

// Which gradients a backward computes (the autograd context's needs_input_grad): an output not
// asked for is returned as an empty Tensor[0] and costs nothing.
struct OutputMask {
  bool input, boxes;
};

template <typename T>
Params<T> to_params(const Args& a, const at::Tensor& input) {
  return Params<T>{static_cast<T>(a.spatial_scale),
                   a.pooled_height,
                   a.pooled_width,
                   a.sampling_ratio,
                   a.aligned,
                   input.size(0),
                   input.size(1),
                   input.size(2),
                   input.size(3)};
}

// Everything but the values of boxes: shapes, dtypes, devices, scalar arguments.
inline void check_args(const char* op, const at::Tensor& input, const at::Tensor& boxes,
                       const Args& a) {
  check_defined(op, "input", input);
  check_defined(op, "boxes", boxes);
  TORCH_CHECK(input.dim() == 4, op, ": input must be Tensor[N, C, H, W], got ", shape_str(input));
  check_floating(op, "input", input, /*allow_half=*/true);
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 5, op,
              ": boxes must be Tensor[K, 5] or list of Tensor[L, 4], got ", shape_str(boxes));
  check_same_dtype(op, "input", input, "boxes", boxes);
  check_same_device(op, "input", input, "boxes", boxes);
  TORCH_CHECK_VALUE(a.pooled_height > 0 && a.pooled_width > 0, op,
                    ": output_size must be positive, got (", a.pooled_height, ", ", a.pooled_width,
                    ")");
  // Within float32's normal range, so that it is neither 0 nor inf for a float32 (or half) map:
  // 1e308 would make a box at 0 a 0 * inf = NaN box.
  const bool positive = std::isfinite(a.spatial_scale) && a.spatial_scale > 0;
  TORCH_CHECK_VALUE(positive && a.spatial_scale >= std::numeric_limits<float>::min() &&
                        a.spatial_scale <= std::numeric_limits<float>::max(),
                    op, ": spatial_scale must be finite and positive, got ", a.spatial_scale,
                    positive ? " (outside float32's normal range)" : "");
  TORCH_CHECK_VALUE(a.sampling_ratio <= kMaxSamplingRatio, op, ": sampling_ratio must be at most ",
                    kMaxSamplingRatio, " (samples per bin each way; <= 0 for adaptive), got ",
                    a.sampling_ratio);
}

// The batch-index column must hold integers in [0, N): a kernel indexes the map with it. The CPU
// kernels check it here, before they start (on the CPU this costs no synchronisation), naming the
// smallest or largest bad value. The CUDA kernels (and the emulator, which runs their code) check
// each index where they read it instead, in roi_align_math.h's checked_batch_index: reading the
// column back to the host would synchronise with the device on every call.
inline void check_batch_index(const char* op, const at::Tensor& boxes, int64_t batch_size) {
  if (boxes.size(0) == 0) return;
  const auto index = contiguous_input(op, "boxes", boxes.select(1, 0)).to(at::kDouble);
  const auto fractional = index.ne(index.floor());  // NaN too
  const auto stats = at::stack({fractional.any().to(at::kDouble), index.min(), index.max()}).cpu();
  const double* s = stats.data_ptr<double>();
  TORCH_CHECK(s[0] == 0, op, ": boxes[:, 0] (batch index) must be integers, got ",
              index.masked_select(fractional).cpu()[0].item<double>());
  const double lo = s[1], hi = s[2];
  TORCH_CHECK(lo >= 0 && hi < static_cast<double>(batch_size), op,
              ": boxes[:, 0] (batch index) must be in [0, ", batch_size, "), got ",
              lo < 0 ? lo : hi);
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& input,
                       const at::Tensor& boxes, const Args& a) {
  check_defined(op, "grad", grad);
  const bool ok = grad.dim() == 4 && grad.size(0) == boxes.size(0) &&
                  grad.size(1) == input.size(1) && grad.size(2) == a.pooled_height &&
                  grad.size(3) == a.pooled_width;
  TORCH_CHECK(ok, op, ": grad must be Tensor[", boxes.size(0), ", ", input.size(1), ", ",
              a.pooled_height, ", ", a.pooled_width, "], got ", shape_str(grad));
  check_same_dtype(op, "input", input, "grad", grad);
  check_same_device(op, "input", input, "grad", grad);
}

// The checks of the forward op that need no values of the tensors (the batch index: see
// check_batch_index).
inline void check_forward(const at::Tensor& input, const at::Tensor& boxes, const Args& a) {
  check_args("roi_align", input, boxes, a);
}

// The checks of the backward op that need no values of the tensors.
inline void check_backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& boxes,
                           const Args& a) {
  const char* op = "roi_align_backward";
  check_args(op, input, boxes, a);
  check_grad(op, grad, input, boxes, a);
}

// float32 for float16/bfloat16 (their accumulation type), the dtype itself otherwise.
inline at::ScalarType accumulation_type(at::ScalarType type) {
  return (type == at::kHalf || type == at::kBFloat16) ? at::kFloat : type;
}

}  // namespace roi_align
}  // namespace mlk
