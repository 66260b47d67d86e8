// Schemas of the RoI sampling ops, and roi_align under autocast. Kernels: roi_align_cpu.cpp (CPU),
// roi_align_cuda.cu (CUDA), roi_align_emulated.cpp (the CUDA kernels on the CPU grid emulator).
#include <torch/library.h>

#include "../common/autocast.h"

namespace {

// The emulated namespace carries the same schemas, so tests call both with the same arguments.
// boxes is Tensor[K, 5] (batch index, x1, y1, x2, y2); the Python wrapper turns a list of
// per-image Tensor[L, 4] into it. The backward returns the gradients of input and boxes (the
// batch-index column gets zero), each only where output_mask asks for it (else an empty
// Tensor[0]); on CUDA torch.are_deterministic_algorithms_enabled() picks its deterministic variant.
void define_roi_align_ops(torch::Library& m) {
  m.def(
      "roi_align(Tensor input, Tensor boxes, float spatial_scale, int pooled_height, "
      "int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "roi_align_backward(Tensor grad, Tensor input, Tensor boxes, float spatial_scale, "
      "int pooled_height, int pooled_width, int sampling_ratio, bool aligned, "
      "bool[2] output_mask=[True, True]) -> (Tensor, Tensor)");
}

// As torchvision's autocast kernel: a map and boxes below float32 (a bfloat16 map from an
// autocast conv, float32 boxes) are computed in float32 (float64 stays float64), and the result
// has the map's dtype. Registered at the dispatcher, so torch.ops.mlkernels.roi_align behaves the
// same whether or not it is called through mlkernels.ops.
template <c10::DispatchKey kAutocastKey, c10::DeviceType kDevice>
at::Tensor roi_align_autocast(const at::Tensor& input, const at::Tensor& boxes,
                              double spatial_scale, int64_t pooled_height, int64_t pooled_width,
                              int64_t sampling_ratio, bool aligned) {
  static const auto op =
      mlk::typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t, int64_t,
                               int64_t, bool)>("mlkernels::roi_align");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  return op
      .call(mlk::autocast_to_float32<kDevice>(input), mlk::autocast_to_float32<kDevice>(boxes),
            spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
      .to(input.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mlkernels, m) { define_roi_align_ops(m); }
TORCH_LIBRARY_FRAGMENT(mlkernels_emulated, m) { define_roi_align_ops(m); }

TORCH_LIBRARY_IMPL(mlkernels, AutocastCPU, m) {
  m.impl("roi_align", &roi_align_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(mlkernels, AutocastCUDA, m) {
  m.impl("roi_align", &roi_align_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}
