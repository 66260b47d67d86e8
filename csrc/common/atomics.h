// atomic_add: atomicAdd on the device. On the host, where only the grid emulator calls it (one
// thread at a time), a plain add, counted (EmulatorCount::kAtomicAdds, emulator_counts.h) to
// count a kernel's atomic traffic.
#pragma once

#include "emulator_counts.h"
#include "macros.h"

namespace mlk {

template <typename T>
MLK_HOST_DEVICE void atomic_add(T* address, T value) {
#if MLK_ON_DEVICE
  atomicAdd(address, value);
#else
  *address += value;
  count_emulated(EmulatorCount::kAtomicAdds);
#endif
}

}  // namespace mlk
