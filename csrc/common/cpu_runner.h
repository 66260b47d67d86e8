// Runs a family's independent-threads CUDA kernels (its *_kernels.h, written over a Runner) on the
// CPU, the threads spread over ATen's pool. For ops whose work is too small or too simple to
// deserve CPU-specific code (box coding, propose's backward): the CUDA kernel's logic then is the
// CPU kernel, with no second copy. Cooperative (block) kernels have no CPU counterpart here.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "grid.h"

namespace mlk {

struct CpuParallelRunner {
  static CpuParallelRunner on(const at::Tensor&) { return {}; }

  template <typename ThreadFn>
  void threads(const LaunchConfig& config, ThreadFn&& fn) const {
    TORCH_CHECK(
        config.grid.y == 1 && config.grid.z == 1 && config.block.y == 1 && config.block.z == 1,
        "CpuParallelRunner runs 1-D launches only");
    const int64_t per_block = config.block.x;
    // 256 threads of a grid-stride kernel are a few microseconds of work: fewer per task would
    // cost more in scheduling than they spread.
    at::parallel_for(0, config.grid.x * per_block, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        ThreadIndex t;
        t.block.x = r / per_block;
        t.thread.x = r % per_block;
        t.block_dim = config.block;
        t.grid_dim = config.grid;
        fn(t);
      }
    });
  }
};

}  // namespace mlk
