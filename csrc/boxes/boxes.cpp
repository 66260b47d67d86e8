// Schemas of the box ops (coding and IoU). Kernels: boxes_cpu.cpp (CPU), boxes_cuda.cu (CUDA),
// boxes_emulated.cpp (the CUDA kernels on the CPU grid emulator, for tests).
#include <torch/library.h>

namespace {

// The emulated namespace carries the same schemas, so tests call both with the same arguments.
// decode_boxes_backward computes the gradients of deltas and anchors only where output_mask asks
// for them (else an empty Tensor[0]).
void define_box_ops(torch::Library& m) {
  m.def("encode_boxes(Tensor boxes, Tensor anchors, float[] weights) -> Tensor");
  m.def("decode_boxes(Tensor deltas, Tensor anchors, float[] weights, float clamp) -> Tensor");
  m.def(
      "decode_boxes_backward(Tensor grad, Tensor deltas, Tensor anchors, float[] weights, "
      "float clamp, bool[2] output_mask=[True, True]) -> (Tensor, Tensor)");
  m.def("box_iou(Tensor boxes1, Tensor boxes2) -> Tensor");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mlkernels, m) { define_box_ops(m); }
TORCH_LIBRARY_FRAGMENT(mlkernels_emulated, m) { define_box_ops(m); }
