// What the grid emulator counts of the CUDA kernels' work: a count, not a timing, so the same on
// any machine. The tests and the benchmarks read a count before and after a call
// (torch.ops.mlkernels_emulated.atomic_adds(), .roi_align_axis_walks(), registered in
// emulator_counts_emulated.cpp) to count what one call of the kernels does. count_emulated is
// called only from code that runs on the device (or, on the host, in the emulator), never from
// a CPU kernel; on the device it is nothing.
#pragma once

#include <atomic>
#include <cstdint>

#include "macros.h"

namespace mlk {

enum class EmulatorCount : int {
  kAtomicAdds = 0,  // atomic_add calls (atomics.h)
  kRowWalks,        // roi_align: walks of a bin's samples along y (for_each_axis_pixel)
  kColumnWalks,     // roi_align: walks of a bin's samples along x
  kNumCounts
};

inline std::atomic<int64_t>& host_count(EmulatorCount which) {
  static std::atomic<int64_t> counts[static_cast<int>(EmulatorCount::kNumCounts)] = {};
  return counts[static_cast<int>(which)];
}

MLK_HOST_DEVICE void count_emulated(EmulatorCount which) {
#if MLK_ON_DEVICE
  (void)which;
#else
  host_count(which).fetch_add(1, std::memory_order_relaxed);
#endif
}

}  // namespace mlk
