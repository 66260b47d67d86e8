// Argument checks and preparation shared by the box ops' CPU, CUDA and emulated kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/StringUtil.h>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../common/checks.h"
#include "boxes_math.h"

namespace mlk {
namespace boxes {

// Two [..., 4] tensors checked, broadcast against each other and made contiguous, so a kernel
// can walk `rows` boxes of both with a stride of 4.
struct PairedBoxes {
  at::Tensor first, second;
  std::vector<int64_t> shape;  // the broadcast shape, last dimension 4
  int64_t rows = 0;
};

inline bool broadcastable(at::IntArrayRef a, at::IntArrayRef b) {
  const size_t n = std::min(a.size(), b.size());
  for (size_t i = 1; i <= n; ++i) {
    const int64_t x = a[a.size() - i], y = b[b.size() - i];
    if (x != y && x != 1 && y != 1) return false;
  }
  return true;
}

inline PairedBoxes pair_boxes(const char* op, const char* first_name, const at::Tensor& first,
                              const char* second_name, const at::Tensor& second) {
  check_defined(op, first_name, first);
  check_defined(op, second_name, second);
  check_boxes(op, first_name, first, -1);
  check_boxes(op, second_name, second, -1);
  check_floating(op, first_name, first);
  check_same_dtype(op, first_name, first, second_name, second);
  check_same_device(op, first_name, first, second_name, second);
  TORCH_CHECK(broadcastable(first.sizes(), second.sizes()), op, ": ", first_name, " and ",
              second_name, " must broadcast to one shape, got ", shape_str(first), " and ",
              shape_str(second));
  const auto shape = at::infer_size_dimvector(first.sizes(), second.sizes());
  PairedBoxes out;
  out.shape = std::vector<int64_t>(shape.begin(), shape.end());
  out.first = contiguous_input(op, first_name, first.expand(out.shape));
  out.second = contiguous_input(op, second_name, second.expand(out.shape));
  out.rows = out.first.numel() / 4;
  return out;
}

inline void check_weights(const char* op, at::ArrayRef<double> weights) {
  TORCH_CHECK_VALUE(weights.size() == 4, op, ": weights must be 4 numbers (wx, wy, ww, wh), got ",
                    weights.size());
  // Within float32's normal range, so that no weight becomes 0 or inf in the boxes' dtype (1e-300
  // would be 0 in float32: deltas / 0).
  for (double w : weights) {
    TORCH_CHECK_VALUE(
        w >= std::numeric_limits<float>::min() && w <= std::numeric_limits<float>::max(), op,
        ": weights must be finite and positive (in float32's normal range), got ", weights);
  }
}

template <typename T>
Weights<T> to_weights(at::ArrayRef<double> weights) {
  return Weights<T>{static_cast<T>(weights[0]), static_cast<T>(weights[1]),
                    static_cast<T>(weights[2]), static_cast<T>(weights[3])};
}

inline void check_clamp(const char* op, double clamp) {
  TORCH_CHECK_VALUE(!std::isnan(clamp), op, ": clamp must be a number, got nan");
}

// Checks for decode_boxes_backward: deltas and anchors as pair_boxes, and grad in their broadcast
// shape (what decode_boxes returned). Returns the pair and grad, contiguous.
inline std::pair<PairedBoxes, at::Tensor> prepare_decode_backward(const at::Tensor& grad,
                                                                  const at::Tensor& deltas,
                                                                  const at::Tensor& anchors,
                                                                  at::ArrayRef<double> weights,
                                                                  double clamp) {
  const char* op = "decode_boxes_backward";
  check_weights(op, weights);
  check_clamp(op, clamp);
  auto in = pair_boxes(op, "deltas", deltas, "anchors", anchors);
  check_defined(op, "grad", grad);
  check_same_dtype(op, "deltas", deltas, "grad", grad);
  check_same_device(op, "deltas", deltas, "grad", grad);
  TORCH_CHECK(grad.sizes().vec() == in.shape, op, ": grad must be Tensor[",
              c10::Join(", ", in.shape), "] (the broadcast shape of deltas and anchors), got ",
              shape_str(grad));
  auto g = contiguous_input(op, "grad", grad);
  return {std::move(in), std::move(g)};
}

struct IouInputs {
  at::Tensor boxes1, boxes2;  // contiguous, in the dtype the IoUs are computed in
  at::ScalarType result_type;
};

// Checks for box_iou, and the dtypes of torchvision's box_iou: float32/float64 are computed and
// returned as they are; float16/bfloat16 are computed in float32 and integer boxes in float64
// (areas of coordinates up to 2**26 are exact there), both returned as float32.
inline IouInputs prepare_iou(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  const char* op = "box_iou";
  check_defined(op, "boxes1", boxes1);
  check_defined(op, "boxes2", boxes2);
  check_boxes(op, "boxes1", boxes1, 2);
  check_boxes(op, "boxes2", boxes2, 2);
  const auto type = boxes1.scalar_type();
  TORCH_CHECK(at::isFloatingType(type) || at::isIntegralType(type, /*includeBool=*/false), op,
              ": boxes1 must be a floating or integer tensor, got ", dtype_str(type));
  check_same_dtype(op, "boxes1", boxes1, "boxes2", boxes2);
  check_same_device(op, "boxes1", boxes1, "boxes2", boxes2);
  const bool in_double = type == at::kDouble || !at::isFloatingType(type);
  const auto compute_type = in_double ? at::kDouble : at::kFloat;
  return {contiguous_input(op, "boxes1", boxes1).to(compute_type),
          contiguous_input(op, "boxes2", boxes2).to(compute_type),
          type == at::kDouble ? at::kDouble : at::kFloat};
}

}  // namespace boxes
}  // namespace mlk
