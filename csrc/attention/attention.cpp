// Schemas of the attention ops, and their autocast kernel. Kernels: attention_cpu.cpp (CPU),
// attention_cuda.cu (CUDA), attention_emulated.cpp (the CUDA kernels on the CPU grid emulator).
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/autocast.h"

namespace {

// query [B, H, Lq, E], key [B, H, Lk, E], value [B, H, Lk, Ev]; bias (optional) added to the
// scaled scores, each dimension 1 (broadcast) or that of the scores [B, H, Lq, Lk]. Returns the
// output [B, H, Lq, Ev] and each row's log-sum-exp [B, H, Lq] in the accumulation type (float64
// for float64 inputs, else float32; -inf for a fully masked row, whose output is zeros). The
// backward returns the gradients of query, key, value and bias (in bias's own shape: summed over
// the dimensions it was broadcast along), each only where output_mask asks (else Tensor[0]). It
// recomputes the probabilities as the forward normalizes them (lse is checked, not used: it
// rounds the row sum's digits away when the scores are large).
void define_attention_ops(torch::Library& m) {
  m.def(
      "scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, Tensor? bias, "
      "float scale, bool is_causal) -> (Tensor out, Tensor lse)");
  m.def(
      "scaled_dot_product_attention_backward(Tensor grad, Tensor query, Tensor key, "
      "Tensor value, Tensor? bias, Tensor out, Tensor lse, float scale, bool is_causal, "
      "bool[4] output_mask=[True, True, True, True]) -> (Tensor, Tensor, Tensor, Tensor)");
}

// As torch's own scaled_dot_product_attention under autocast: the inputs in the autocast dtype
// (bfloat16/float16), accumulated in float32 by the kernels.
template <c10::DispatchKey kAutocastKey, c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> attention_autocast(const at::Tensor& query,
                                                      const at::Tensor& key,
                                                      const at::Tensor& value,
                                                      const std::optional<at::Tensor>& bias,
                                                      double scale, bool is_causal) {
  static const auto op = mlk::typed_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
      double, bool)>("mlkernels::scaled_dot_product_attention");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  const auto dtype = at::autocast::get_autocast_dtype(kDevice);
  return op.call(at::autocast::cached_cast(dtype, query, kDevice),
                 at::autocast::cached_cast(dtype, key, kDevice),
                 at::autocast::cached_cast(dtype, value, kDevice),
                 at::autocast::cached_cast(dtype, bias, kDevice), scale, is_causal);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mlkernels, m) { define_attention_ops(m); }
TORCH_LIBRARY_FRAGMENT(mlkernels_emulated, m) { define_attention_ops(m); }

TORCH_LIBRARY_IMPL(mlkernels, AutocastCPU, m) {
  m.impl("scaled_dot_product_attention",
         &attention_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(mlkernels, AutocastCUDA, m) {
  m.impl("scaled_dot_product_attention",
         &attention_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}
