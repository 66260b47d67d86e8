// roi_align's CUDA kernels (roi_align_kernels.h) on the CPU grid emulator, registered as
// torch.ops.mlkernels_emulated.* for the tests.
#include "../common/emulator.h"
#include "roi_align_kernels.h"

TORCH_LIBRARY_IMPL(mlkernels_emulated, CPU, m) {
  mlk::roi_align::register_roi_align<mlk::roi_align::Kernels<mlk::EmulatorRunner>>(m);
}
