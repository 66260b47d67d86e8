// Argument checks shared by every op. Messages follow one form, repeated word for word by the
// Python fake kernels (mlkernels/ops/_checks.py):
//   "<op>: <argument> must be <expected>, got <what came>"
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace mlk {

// "Tensor[3, 4]"
inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream out;
  out << "Tensor[";
  for (int64_t d = 0; d < t.dim(); ++d) out << (d ? ", " : "") << t.size(d);
  out << "]";
  return out.str();
}

// "float32", as Python prints torch.float32 without its "torch." prefix.
inline std::string dtype_str(at::ScalarType type) {
  return std::string(c10::getDtypeNames(type).first);
}

inline void check_defined(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", arg, " must be a Tensor, got None");
}

// float32 or float64 (plus float16/bfloat16 when allow_half).
inline void check_floating(const char* op, const char* arg, const at::Tensor& t,
                           bool allow_half = false) {
  const auto type = t.scalar_type();
  const bool ok = type == at::kFloat || type == at::kDouble ||
                  (allow_half && (type == at::kHalf || type == at::kBFloat16));
  TORCH_CHECK(ok, op, ": ", arg, " must be ",
              allow_half ? "float16, bfloat16, float32 or float64" : "float32 or float64", ", got ",
              dtype_str(type));
}

// Boxes as Tensor[..., 4] (min_dim=1) or Tensor[N, 4] (exact_dim=2).
inline void check_boxes(const char* op, const char* arg, const at::Tensor& t, int64_t exact_dim) {
  const bool ok = t.dim() >= 1 && t.size(-1) == 4 && (exact_dim < 0 || t.dim() == exact_dim);
  TORCH_CHECK(ok, op, ": ", arg, " must be ", exact_dim == 2 ? "Tensor[N, 4]" : "Tensor[..., 4]",
              ", got ", shape_str(t));
}

inline void check_same_dtype(const char* op, const char* arg_a, const at::Tensor& a,
                             const char* arg_b, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", arg_b, " must have the dtype of ",
              arg_a, " (", dtype_str(a.scalar_type()), "), got ", dtype_str(b.scalar_type()));
}

inline void check_same_device(const char* op, const char* arg_a, const at::Tensor& a,
                              const char* arg_b, const at::Tensor& b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", arg_b, " must be on the device of ", arg_a, " (",
              a.device().str(), "), got ", b.device().str());
}

// t.contiguous() (a copy unless t already is), with an allocation failure (an expanded input far
// larger than memory, say a stride-0 Tensor[2**40, 4]) reported with the op's and the argument's
// names.
inline at::Tensor contiguous_input(const char* op, const char* arg, const at::Tensor& t,
                                   at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  try {
    return t.contiguous(format);
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, op, ": ", arg, " must fit in memory once made contiguous, got ",
                shape_str(t), " (", error.what_without_backtrace(), ")");
  }
}

// Reports a failed allocation of an op's output (an output far larger than memory, say from a
// huge output_size, or a gradient the size of a huge stride-0 input) with the op's name and the
// output's shape.
[[noreturn]] inline void output_allocation_failed(const char* op, at::IntArrayRef sizes,
                                                  const c10::Error& error) {
  std::ostringstream shape;
  shape << "Tensor[";
  for (size_t d = 0; d < sizes.size(); ++d) shape << (d ? ", " : "") << sizes[d];
  shape << "]";
  TORCH_CHECK(false, op, ": the output ", shape.str(), " could not be allocated (",
              error.what_without_backtrace(), ")");
}

// at::empty(sizes, options) for an op's output; a failure names the op (output_allocation_failed).
inline at::Tensor allocate_output(const char* op, at::IntArrayRef sizes,
                                  const at::TensorOptions& options) {
  try {
    return at::empty(sizes, options);
  } catch (const c10::Error& error) {
    output_allocation_failed(op, sizes, error);
  }
}

// at::zeros(sizes, options) for an op's output (gradients accumulate into it), as allocate_output.
inline at::Tensor allocate_zeros(const char* op, at::IntArrayRef sizes,
                                 const at::TensorOptions& options) {
  try {
    return at::zeros(sizes, options);
  } catch (const c10::Error& error) {
    output_allocation_failed(op, sizes, error);
  }
}

}  // namespace mlk
