// CUDA registrations of the box ops; the kernels themselves are in boxes_kernels.h.
#include <torch/library.h>

#include "../common/cuda_runner.cuh"
#include "boxes_kernels.h"

namespace mlk {
namespace boxes {
namespace {

at::Tensor encode_boxes_cuda(const at::Tensor& boxes, const at::Tensor& anchors,
                             at::ArrayRef<double> weights) {
  return encode_boxes_kernel(CudaRunner(boxes.device()), boxes, anchors, weights);
}
at::Tensor decode_boxes_cuda(const at::Tensor& deltas, const at::Tensor& anchors,
                             at::ArrayRef<double> weights, double clamp) {
  return decode_boxes_kernel(CudaRunner(deltas.device()), deltas, anchors, weights, clamp);
}
std::tuple<at::Tensor, at::Tensor> decode_boxes_backward_cuda(const at::Tensor& grad,
                                                              const at::Tensor& deltas,
                                                              const at::Tensor& anchors,
                                                              at::ArrayRef<double> weights,
                                                              double clamp) {
  return decode_boxes_backward_kernel(CudaRunner(deltas.device()), grad, deltas, anchors, weights,
                                      clamp);
}
at::Tensor box_iou_cuda(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  return box_iou_kernel(CudaRunner(boxes1.device()), boxes1, boxes2);
}

}  // namespace
}  // namespace boxes
}  // namespace mlk

TORCH_LIBRARY_IMPL(mlkernels, CUDA, m) {
  m.impl("encode_boxes", &mlk::boxes::encode_boxes_cuda);
  m.impl("decode_boxes", &mlk::boxes::decode_boxes_cuda);
  m.impl("decode_boxes_backward", &mlk::boxes::decode_boxes_backward_cuda);
  m.impl("box_iou", &mlk::boxes::box_iou_cuda);
}
