// roi_align's CUDA kernels (roi_align_kernels.h) run on the CPU grid emulator, registered as
// torch.ops.mlkernels_emulated.* for the tests.
#include <torch/library.h>

#include "../common/emulator.h"
#include "roi_align_kernels.h"

namespace mlk {
namespace roi_align {
namespace {

at::Tensor roi_align_emulated(const at::Tensor& input, const at::Tensor& boxes,
                              double spatial_scale, int64_t pooled_height, int64_t pooled_width,
                              int64_t sampling_ratio, bool aligned) {
  const Args a{spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned};
  return roi_align_forward_kernel(EmulatorRunner(), input, boxes, a);
}

std::tuple<at::Tensor, at::Tensor> roi_align_backward_emulated(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& boxes,
    double spatial_scale, int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
    bool aligned) {
  const Args a{spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned};
  return roi_align_backward_kernel(EmulatorRunner(), grad, input, boxes, a);
}

}  // namespace
}  // namespace roi_align
}  // namespace mlk

TORCH_LIBRARY_IMPL(mlkernels_emulated, CPU, m) {
  m.impl("roi_align", &mlk::roi_align::roi_align_emulated);
  m.impl("roi_align_backward", &mlk::roi_align::roi_align_backward_emulated);
}
