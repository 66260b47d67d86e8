// Argument checks shared by the attention kernels (CPU, CUDA, emulated). The raw ops take 4-D
// query [B, H, Lq, E], key [B, H, Lk, E], value [B, H, Lk, Ev] and an optional additive bias whose
// every dimension is 1 or that of the scores [B, H, Lq, Lk]; mlkernels.ops turns masks of 2 to 4
// dimensions, boolean ones too, into that form without expanding them.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <limits>

#include "../common/checks.h"
#include "attention_math.h"

namespace mlk {
namespace attention {

constexpr const char* kOp = "scaled_dot_product_attention";
constexpr const char* kBackwardOp = "scaled_dot_product_attention_backward";

inline void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const c10::optional<at::Tensor>& bias, double scale) {
  check_defined(op, "query", q);
  check_defined(op, "key", k);
  check_defined(op, "value", v);
  TORCH_CHECK(q.dim() == 4, op, ": query must be Tensor[B, H, Lq, E], got ", shape_str(q));
  check_floating(op, "query", q, /*allow_half=*/true);
  TORCH_CHECK(
      k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
      op, ": key must be Tensor[", q.size(0), ", ", q.size(1), ", Lk, ", q.size(3),
      "] (query's batch, heads and E), got ", shape_str(k));
  TORCH_CHECK(
      v.dim() == 4 && v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
      op, ": value must be Tensor[", k.size(0), ", ", k.size(1), ", ", k.size(2),
      ", Ev] (key's batch, heads and Lk), got ", shape_str(v));
  check_same_dtype(op, "query", q, "key", k);
  check_same_dtype(op, "query", q, "value", v);
  check_same_device(op, "query", q, "key", k);
  check_same_device(op, "query", q, "value", v);
  if (bias.has_value() && bias->defined()) {
    const std::array<int64_t, 4> scores{q.size(0), q.size(1), q.size(2), k.size(2)};
    bool ok = bias->dim() == 4;
    for (int64_t d = 0; ok && d < 4; ++d) ok = bias->size(d) == 1 || bias->size(d) == scores[d];
    TORCH_CHECK(ok, op, ": bias must broadcast to the scores Tensor[", scores[0], ", ", scores[1],
                ", ", scores[2], ", ", scores[3], "] (each dimension 1 or that size), got ",
                shape_str(*bias));
    check_same_dtype(op, "query", q, "bias", *bias);
    check_same_device(op, "query", q, "bias", *bias);
  }
  // Finite in the accumulation type too (float32 for all but float64 inputs).
  const double largest = q.scalar_type() == at::kDouble ? std::numeric_limits<double>::max()
                                                        : std::numeric_limits<float>::max();
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::abs(scale) <= largest, op,
                    ": scale must be finite in the inputs' accumulation type (",
                    q.scalar_type() == at::kDouble ? "float64" : "float32", "), got ", scale);
}

// The accumulation type: float32 for float16/bfloat16, else the input's.
inline at::ScalarType accumulation_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_backward_inputs(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& out, const at::Tensor& lse, double scale) {
  const char* op = kBackwardOp;
  check_inputs(op, q, k, v, bias, scale);
  const std::array<int64_t, 4> out_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor*>{"grad", &grad}, {"out", &out}}) {
    check_defined(op, name, *t);
    TORCH_CHECK(t->sizes() == at::IntArrayRef(out_shape), op, ": ", name, " must be Tensor[",
                out_shape[0], ", ", out_shape[1], ", ", out_shape[2], ", ", out_shape[3],
                "] (the output's shape), got ", shape_str(*t));
    check_same_dtype(op, "query", q, name, *t);
    check_same_device(op, "query", q, name, *t);
  }
  check_defined(op, "lse", lse);
  const auto acc = accumulation_type(q.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(out_shape.data(), 3) && lse.scalar_type() == acc, op,
              ": lse must be ", dtype_str(acc), " Tensor[", out_shape[0], ", ", out_shape[1], ", ",
              out_shape[2], "] (the forward's), got ", dtype_str(lse.scalar_type()), " ",
              shape_str(lse));
  check_same_device(op, "query", q, "lse", lse);
}

// The backward's outputs: the gradients of query, key, value and bias where output_mask asks for
// them (zero-filled when the kernel adds into them), else an empty Tensor[0]. Clears mask[3] when
// there is no bias.
inline std::array<at::Tensor, 4> allocate_gradients(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v,
                                                    const c10::optional<at::Tensor>& bias,
                                                    std::array<bool, 4>& mask, bool zeroed) {
  mask[3] = mask[3] && bias.has_value() && bias->defined();
  const auto options = q.options().dtype(accumulation_type(q.scalar_type()));
  const std::array<at::IntArrayRef, 4> sizes{q.sizes(), k.sizes(), v.sizes(),
                                             mask[3] ? bias->sizes() : at::IntArrayRef()};
  std::array<at::Tensor, 4> grads;
  for (size_t i = 0; i < 4; ++i) {
    grads[i] = !mask[i] ? at::empty({0}, options)
               : zeroed ? allocate_zeros(kBackwardOp, sizes[i], options)
                        : allocate_output(kBackwardOp, sizes[i], options);
  }
  return grads;
}

}  // namespace attention
}  // namespace mlk
