// Schemas of the RoI sampling ops. Kernels: roi_align_cpu.cpp (CPU), roi_align_cuda.cu (CUDA),
// roi_align_emulated.cpp (the CUDA kernels on the CPU grid emulator, for tests).
#include <torch/library.h>

namespace {

// The emulated namespace carries the same schemas, so tests call both with the same arguments.
// boxes is Tensor[K, 5] (batch index, x1, y1, x2, y2); the Python wrapper turns a list of
// per-image Tensor[L, 4] into it. The backward returns the gradients of input and boxes (the
// batch-index column gets zero); on CUDA torch.are_deterministic_algorithms_enabled() picks
// its deterministic variant.
void define_roi_align_ops(torch::Library& m) {
  m.def(
      "roi_align(Tensor input, Tensor boxes, float spatial_scale, int pooled_height, "
      "int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "roi_align_backward(Tensor grad, Tensor input, Tensor boxes, float spatial_scale, "
      "int pooled_height, int pooled_width, int sampling_ratio, bool aligned) -> (Tensor, Tensor)");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mlkernels, m) { define_roi_align_ops(m); }
TORCH_LIBRARY_FRAGMENT(mlkernels_emulated, m) { define_roi_align_ops(m); }
