// Schemas of beam_search_step, beam_search_advance and beam_search_backtrack. Kernels:
// beam_search_cpu.cpp (CPU), beam_search_cuda.cu (CUDA), beam_search_emulated.cpp (the CUDA kernel
// on the CPU grid emulator, for tests).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace {

// The emulated namespace carries the same schema, so tests call both with the same arguments.
// Returns (scores, parents, labels, used, finished) of the next step.
void define_beam_search_ops(torch::Library& m) {
  m.def(
      "beam_search_step(Tensor log_probs, Tensor scores, Tensor used, Tensor finished, *, "
      "float log_threshold, int max_length) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The search's end (the driver's, mlkernels/ops/beam_search.py): each final beam's labels,
  // followed back through the steps. Returns (paths [B, K, width], lengths [B, K]).
  m.def(
      "beam_search_backtrack(Tensor sources, Tensor labels, Tensor scores, int width) -> "
      "(Tensor, Tensor)");
  // The driver's step: beam_search_step, then the rows the new beams came from, the state
  // tensors reordered along them, and whether every beam has finished. Returns (scores [B, K],
  // sources [B * K], labels [B * K], used [B, K, W], finished [B, K], state, done []).
  m.def(
      "beam_search_advance(Tensor log_probs, Tensor scores, Tensor used, Tensor finished, "
      "Tensor[] state, *, float log_threshold, int max_length) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor[], Tensor)");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mlkernels, m) { define_beam_search_ops(m); }
TORCH_LIBRARY_FRAGMENT(mlkernels_emulated, m) { define_beam_search_ops(m); }

// Not differentiable: autograd's C++ fallback makes a backward through the scores raise (naming the
// op), and costs nothing when no input requires grad, where a Python autograd registration would
// cost tens of microseconds per step of a search.
TORCH_LIBRARY_IMPL(mlkernels, Autograd, m) {
  m.impl("beam_search_step", torch::autograd::autogradNotImplementedFallback());
  m.impl("beam_search_backtrack", torch::autograd::autogradNotImplementedFallback());
  m.impl("beam_search_advance", torch::autograd::autogradNotImplementedFallback());
}
