// The attention CUDA kernels (attention_kernels.h) on the CPU grid emulator, registered as
// torch.ops.mlkernels_emulated.* for the tests.
#include "../common/emulator.h"
#include "attention_kernels.h"

TORCH_LIBRARY_IMPL(mlkernels_emulated, CPU, m) {
  mlk::attention::register_attention<mlk::attention::Kernels<mlk::EmulatorRunner>>(m);
}
