// Schemas of the box ops. Kernels: boxes_cpu.cpp and nms_cpu.cpp (CPU), boxes_cuda.cu (CUDA),
// boxes_emulated.cpp (the CUDA kernels on the CPU grid emulator, for tests).
#include <torch/library.h>

namespace {

// The emulated namespace carries the same schemas, so tests call both with the same arguments.
void define_box_ops(torch::Library& m) {
  m.def("encode_boxes(Tensor boxes, Tensor anchors, float[] weights) -> Tensor");
  m.def("decode_boxes(Tensor deltas, Tensor anchors, float[] weights, float clamp) -> Tensor");
  m.def(
      "decode_boxes_backward(Tensor grad, Tensor deltas, Tensor anchors, float[] weights, "
      "float clamp) -> (Tensor, Tensor)");
  m.def("box_iou(Tensor boxes1, Tensor boxes2) -> Tensor");
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
  // kept_anchors ([N, P], the anchor behind each output row or -1) is for the backward.
  m.def(
      "propose(Tensor anchors, Tensor deltas, Tensor objectness, Tensor image_sizes, "
      "int pre_nms_top_n, int post_nms_top_n, float iou_threshold, float min_size, "
      "float score_threshold, float[] weights, float clamp, bool append_whole_image) -> "
      "(Tensor boxes, Tensor scores, Tensor counts, Tensor kept_anchors)");
  m.def(
      "propose_backward(Tensor grad_boxes, Tensor anchors, Tensor deltas, Tensor kept_anchors, "
      "Tensor image_sizes, float[] weights, float clamp) -> (Tensor, Tensor)");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mlkernels, m) { define_box_ops(m); }
TORCH_LIBRARY_FRAGMENT(mlkernels_emulated, m) { define_box_ops(m); }
