// Schemas of the NMS and proposal ops. Kernels: proposals_cpu.cpp (CPU), proposals_cuda.cu (CUDA),
// proposals_emulated.cpp (the CUDA kernels on the CPU grid emulator, for tests).
#include <torch/library.h>

#include "../common/autocast.h"

namespace {

// The emulated namespace carries the same schemas, so tests call both with the same arguments.
void define_proposal_ops(torch::Library& m) {
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
  // kept_anchors ([N, P], the anchor behind each output row or -1) is for the backward.
  m.def(
      "propose(Tensor anchors, Tensor deltas, Tensor objectness, Tensor image_sizes, "
      "int pre_nms_top_n, int post_nms_top_n, float iou_threshold, float min_size, "
      "float score_threshold, float[] weights, float clamp, bool append_whole_image) -> "
      "(Tensor boxes, Tensor scores, Tensor counts, Tensor kept_anchors)");
  // The gradients of deltas and anchors, each only where output_mask asks (else empty Tensor[0]).
  m.def(
      "propose_backward(Tensor grad_boxes, Tensor anchors, Tensor deltas, Tensor kept_anchors, "
      "Tensor image_sizes, float[] weights, float clamp, bool[2] output_mask=[True, True]) -> "
      "(Tensor, Tensor)");
}

// As torchvision's autocast kernel of nms: boxes and scores below float32 (a bfloat16 or float16
// detection head, float32 boxes) are compared in float32. batched_nms likewise.
template <c10::DispatchKey kAutocastKey, c10::DeviceType kDevice>
at::Tensor nms_autocast(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  static const auto op =
      mlk::typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("mlkernels::nms");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  return op.call(mlk::autocast_to_float32<kDevice>(boxes),
                 mlk::autocast_to_float32<kDevice>(scores), iou_threshold);
}

template <c10::DispatchKey kAutocastKey, c10::DeviceType kDevice>
at::Tensor batched_nms_autocast(const at::Tensor& boxes, const at::Tensor& scores,
                                const at::Tensor& idxs, double iou_threshold) {
  static const auto op =
      mlk::typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
          "mlkernels::batched_nms");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  return op.call(mlk::autocast_to_float32<kDevice>(boxes),
                 mlk::autocast_to_float32<kDevice>(scores), idxs, iou_threshold);
}

template <c10::DispatchKey kAutocastKey, c10::DeviceType kDevice>
void register_autocast(torch::Library& m) {
  m.impl("nms", &nms_autocast<kAutocastKey, kDevice>);
  m.impl("batched_nms", &batched_nms_autocast<kAutocastKey, kDevice>);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mlkernels, m) { define_proposal_ops(m); }
TORCH_LIBRARY_FRAGMENT(mlkernels_emulated, m) { define_proposal_ops(m); }

TORCH_LIBRARY_IMPL(mlkernels, AutocastCPU, m) {
  register_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>(m);
}
TORCH_LIBRARY_IMPL(mlkernels, AutocastCUDA, m) {
  register_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>(m);
}
