// CUDA registrations of roi_align; the kernels themselves are in roi_align_kernels.h.
#include <torch/library.h>

#include "../common/cuda_runner.cuh"
#include "roi_align_kernels.h"

namespace mlk {
namespace roi_align {
namespace {

at::Tensor roi_align_cuda(const at::Tensor& input, const at::Tensor& boxes, double spatial_scale,
                          int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                          bool aligned) {
  const Args a{spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned};
  return roi_align_forward_kernel(CudaRunner(input.device()), input, boxes, a);
}

std::tuple<at::Tensor, at::Tensor> roi_align_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& boxes,
    double spatial_scale, int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
    bool aligned) {
  const Args a{spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned};
  return roi_align_backward_kernel(CudaRunner(input.device()), grad, input, boxes, a);
}

}  // namespace
}  // namespace roi_align
}  // namespace mlk

TORCH_LIBRARY_IMPL(mlkernels, CUDA, m) {
  m.impl("roi_align", &mlk::roi_align::roi_align_cuda);
  m.impl("roi_align_backward", &mlk::roi_align::roi_align_backward_cuda);
}
