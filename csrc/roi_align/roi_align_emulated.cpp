// roi_align's CUDA kernels (roi_align_kernels.h) on the CPU grid emulator, registered as
// torch.ops.mlkernels_emulated.* for the tests.
#include "../common/emulator.h"
#include "roi_align_kernels.h"

TORCH_LIBRARY_IMPL(mlkernels_emulated, CPU, m) {
  mlk::roi_align::register_roi_align<mlk::roi_align::Kernels<mlk::EmulatorRunner>>(m);
}

// The emulated kernels' atomic additions so far (common/atomics.h): tests and benchmarks read it
// before and after a call to count a kernel's atomic traffic.
// No tensor argument, so no backend to dispatch on: a CompositeExplicitAutograd kernel, which
// also serves the CPU key (every emulated op has a CPU kernel: test_build_options.py).
TORCH_LIBRARY_FRAGMENT(mlkernels_emulated, m) { m.def("atomic_adds() -> int"); }
TORCH_LIBRARY_IMPL(mlkernels_emulated, CompositeExplicitAutograd, m) {
  m.impl("atomic_adds", [] { return mlk::host_atomic_adds().load(); });
}
