// The NMS and proposal ops' CUDA kernels (proposals_kernels.h) on the CPU grid emulator,
// registered as torch.ops.mlkernels_emulated.* for the tests.
#include "../common/emulator.h"
#include "proposals_kernels.h"

TORCH_LIBRARY_IMPL(mlkernels_emulated, CPU, m) {
  mlk::proposals::register_proposals<mlk::proposals::Kernels<mlk::EmulatorRunner>>(m);
}
