// The box ops' CUDA kernels (boxes_kernels.h) run on the CPU grid emulator, registered as
// torch.ops.mlkernels_emulated.* for the tests.
#include <torch/library.h>

#include "../common/emulator.h"
#include "boxes_kernels.h"

namespace mlk {
namespace boxes {
namespace {

at::Tensor encode_boxes_emulated(const at::Tensor& boxes, const at::Tensor& anchors,
                                 at::ArrayRef<double> weights) {
  return encode_boxes_kernel(EmulatorRunner(), boxes, anchors, weights);
}
at::Tensor decode_boxes_emulated(const at::Tensor& deltas, const at::Tensor& anchors,
                                 at::ArrayRef<double> weights, double clamp) {
  return decode_boxes_kernel(EmulatorRunner(), deltas, anchors, weights, clamp);
}
std::tuple<at::Tensor, at::Tensor> decode_boxes_backward_emulated(const at::Tensor& grad,
                                                                  const at::Tensor& deltas,
                                                                  const at::Tensor& anchors,
                                                                  at::ArrayRef<double> weights,
                                                                  double clamp) {
  return decode_boxes_backward_kernel(EmulatorRunner(), grad, deltas, anchors, weights, clamp);
}
at::Tensor box_iou_emulated(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  return box_iou_kernel(EmulatorRunner(), boxes1, boxes2);
}

}  // namespace
}  // namespace boxes
}  // namespace mlk

TORCH_LIBRARY_IMPL(mlkernels_emulated, CPU, m) {
  m.impl("encode_boxes", &mlk::boxes::encode_boxes_emulated);
  m.impl("decode_boxes", &mlk::boxes::decode_boxes_emulated);
  m.impl("decode_boxes_backward", &mlk::boxes::decode_boxes_backward_emulated);
  m.impl("box_iou", &mlk::boxes::box_iou_emulated);
}
