// atomic_add: atomicAdd on the device. On the host, where only the grid emulator calls it (one
// thread at a time), a plain add, counted: host_atomic_adds() is the number of atomic additions
// the emulated kernels have made, which the tests and the benchmarks read before and after a
// call (torch.ops.mlkernels_emulated.atomic_adds()) to count a kernel's atomic traffic.
#pragma once

#include <atomic>
#include <cstdint>

#include "macros.h"

namespace mlk {

inline std::atomic<int64_t>& host_atomic_adds() {
  static std::atomic<int64_t> count{0};
  return count;
}

template <typename T>
MLK_HOST_DEVICE void atomic_add(T* address, T value) {
#if MLK_ON_DEVICE
  atomicAdd(address, value);
#else
  *address += value;
  host_atomic_adds().fetch_add(1, std::memory_order_relaxed);
#endif
}

}  // namespace mlk
