// torch.ops.mlkernels_emulated.atomic_adds(): the emulated kernels' atomic additions so far
// (atomics.h). Tests and benchmarks read it before and after a call to count a kernel's atomic
// traffic. Compiled with the emulator only, as every *_emulated.cpp.
#include <torch/library.h>

#include "atomics.h"

// No tensor argument, so no backend to dispatch on: a CompositeExplicitAutograd kernel.
TORCH_LIBRARY_FRAGMENT(mlkernels_emulated, m) { m.def("atomic_adds() -> int"); }
TORCH_LIBRARY_IMPL(mlkernels_emulated, CompositeExplicitAutograd, m) {
  m.impl("atomic_adds", [] { return mlk::host_atomic_adds().load(); });
}
