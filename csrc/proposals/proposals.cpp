// Schemas of the NMS and proposal ops. Kernels: proposals_cpu.cpp (CPU), proposals_cuda.cu (CUDA),
// proposals_emulated.cpp (the CUDA kernels on the CPU grid emulator, for tests).
#include <torch/library.h>

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(mlkernels, m) { define_proposal_ops(m); }
TORCH_LIBRARY_FRAGMENT(mlkernels_emulated, m) { define_proposal_ops(m); }
