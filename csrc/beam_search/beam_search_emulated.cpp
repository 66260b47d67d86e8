// beam_search_step's CUDA kernel (beam_search_kernels.h) on the CPU grid emulator, registered as
// torch.ops.mlkernels_emulated.beam_search_step for the tests.
#include "../common/emulator.h"
#include "beam_search_kernels.h"

TORCH_LIBRARY_IMPL(mlkernels_emulated, CPU, m) {
  mlk::beam_search::register_beam_search<mlk::beam_search::Kernels<mlk::EmulatorRunner>>(m);
}
