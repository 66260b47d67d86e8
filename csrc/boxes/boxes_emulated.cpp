// The box ops' CUDA kernels (boxes_kernels.h) on the CPU grid emulator, registered as
// torch.ops.mlkernels_emulated.* for the tests.
#include "../common/emulator.h"
#include "boxes_kernels.h"

TORCH_LIBRARY_IMPL(mlkernels_emulated, CPU, m) {
  mlk::boxes::register_boxes<mlk::boxes::Kernels<mlk::EmulatorRunner>>(m);
}
