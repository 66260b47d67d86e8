// The grid emulator's counts of the CUDA kernels' work so far (emulator_counts.h):
// torch.ops.mlkernels_emulated.atomic_adds() and .roi_align_axis_walks() ([row walks, column
// walks]). Compiled with the emulator only, as every *_emulated.cpp.
#include <torch/library.h>

#include <vector>

#include "emulator_counts.h"

namespace {

int64_t count_of(mlk::EmulatorCount which) { return mlk::host_count(which).load(); }

}  // namespace

// No tensor argument, so no backend to dispatch on: CompositeExplicitAutograd kernels.
TORCH_LIBRARY_FRAGMENT(mlkernels_emulated, m) {
  m.def("atomic_adds() -> int");
  m.def("roi_align_axis_walks() -> int[]");
}
TORCH_LIBRARY_IMPL(mlkernels_emulated, CompositeExplicitAutograd, m) {
  m.impl("atomic_adds", [] { return count_of(mlk::EmulatorCount::kAtomicAdds); });
  m.impl("roi_align_axis_walks", [] {
    return std::vector<int64_t>{count_of(mlk::EmulatorCount::kRowWalks),
                                count_of(mlk::EmulatorCount::kColumnWalks)};
  });
}
