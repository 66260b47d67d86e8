// CUDA registrations of the box ops; the kernels themselves are in boxes_kernels.h.
#include <torch/library.h>

#include "../common/cuda_runner.cuh"
#include "boxes_kernels.h"
#include "nms_kernels.h"

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

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  return nms_family_kernel(CudaRunner(boxes.device()), "nms", boxes, scores, nullptr,
                           iou_threshold);
}
at::Tensor batched_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                            const at::Tensor& idxs, double iou_threshold) {
  return nms_family_kernel(CudaRunner(boxes.device()), "batched_nms", boxes, scores, &idxs,
                           iou_threshold);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> propose_cuda(
    const at::Tensor& anchors, const at::Tensor& deltas, const at::Tensor& objectness,
    const at::Tensor& image_sizes, int64_t pre_nms_top_n, int64_t post_nms_top_n,
    double iou_threshold, double min_size, double score_threshold, at::ArrayRef<double> weights,
    double clamp, bool append_whole_image) {
  return propose_kernel(CudaRunner(deltas.device()), anchors, deltas, objectness, image_sizes,
                        pre_nms_top_n, post_nms_top_n, iou_threshold, min_size, score_threshold,
                        weights, clamp, append_whole_image);
}
std::tuple<at::Tensor, at::Tensor> propose_backward_cuda(
    const at::Tensor& grad_boxes, const at::Tensor& anchors, const at::Tensor& deltas,
    const at::Tensor& kept_anchors, const at::Tensor& image_sizes, at::ArrayRef<double> weights,
    double clamp) {
  return propose_backward_kernel(CudaRunner(deltas.device()), grad_boxes, anchors, deltas,
                                 kept_anchors, image_sizes, weights, clamp);
}

}  // namespace
}  // namespace boxes
}  // namespace mlk

TORCH_LIBRARY_IMPL(mlkernels, CUDA, m) {
  m.impl("encode_boxes", &mlk::boxes::encode_boxes_cuda);
  m.impl("decode_boxes", &mlk::boxes::decode_boxes_cuda);
  m.impl("decode_boxes_backward", &mlk::boxes::decode_boxes_backward_cuda);
  m.impl("box_iou", &mlk::boxes::box_iou_cuda);
  m.impl("nms", &mlk::boxes::nms_cuda);
  m.impl("batched_nms", &mlk::boxes::batched_nms_cuda);
  m.impl("propose", &mlk::boxes::propose_cuda);
  m.impl("propose_backward", &mlk::boxes::propose_backward_cuda);
}
