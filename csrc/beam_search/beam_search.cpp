// Schema of beam_search_step. Kernels: beam_search_cpu.cpp (CPU), beam_search_cuda.cu (CUDA),
// beam_search_emulated.cpp (the CUDA kernel on the CPU grid emulator, for tests).
#include <torch/library.h>

namespace {

// The emulated namespace carries the same schema, so tests call both with the same arguments.
// Returns (scores, parents, labels, used, finished) of the next step.
void define_beam_search_ops(torch::Library& m) {
  m.def(
      "beam_search_step(Tensor log_probs, Tensor scores, Tensor used, Tensor finished, *, "
      "float log_threshold, int max_length) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mlkernels, m) { define_beam_search_ops(m); }
TORCH_LIBRARY_FRAGMENT(mlkernels_emulated, m) { define_beam_search_ops(m); }
