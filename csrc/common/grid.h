// Launch geometry shared by CUDA kernels and the CPU grid emulator.
//
// Every __global__ function in mlkernels is a thin shell: it builds a ThreadIndex from the CUDA
// builtins and calls an MLK_HOST_DEVICE function from its family's *_math.h. The emulator
// (emulator.h) builds the same ThreadIndex values on the CPU and calls the same functions, so the
// logic of each CUDA kernel runs in CPU tests without a GPU.
#pragma once

#include <cstdint>

#include "macros.h"

namespace mlk {

struct Dim3 {
  int64_t x = 1, y = 1, z = 1;
  MLK_HOST_DEVICE int64_t count() const { return x * y * z; }
};

// The coordinates of one thread in one launch, as CUDA's blockIdx/threadIdx/blockDim/gridDim.
struct ThreadIndex {
  Dim3 block;
  Dim3 thread;
  Dim3 block_dim;
  Dim3 grid_dim;

  // Flat index of the thread in its block (x fastest), as CUDA numbers threads.
  MLK_HOST_DEVICE int64_t thread_rank() const {
    return thread.x + block_dim.x * (thread.y + block_dim.y * thread.z);
  }
  // First element of a 1-D grid-stride loop over x, and its stride.
  MLK_HOST_DEVICE int64_t global_x() const { return block.x * block_dim.x + thread.x; }
  MLK_HOST_DEVICE int64_t grid_stride_x() const { return grid_dim.x * block_dim.x; }
};

struct LaunchConfig {
  Dim3 grid;
  Dim3 block;
  int64_t shared_bytes = 0;
};

// A 1-D launch for a grid-stride loop over n elements. The block count is capped: kernels loop,
// so a cap changes only how the work is spread, never what is computed.
inline LaunchConfig launch_config_1d(int64_t n, int64_t threads_per_block = 256,
                                     int64_t max_blocks = 4096) {
  LaunchConfig config;
  config.block.x = threads_per_block;
  int64_t blocks = (n + threads_per_block - 1) / threads_per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > max_blocks) blocks = max_blocks;
  config.grid.x = blocks;
  return config;
}

}  // namespace mlk

#if defined(__CUDACC__)
namespace mlk {
// The calling CUDA thread's ThreadIndex (device code only).
__device__ __forceinline__ ThreadIndex this_thread() {
  ThreadIndex t;
  t.block = {blockIdx.x, blockIdx.y, blockIdx.z};
  t.thread = {threadIdx.x, threadIdx.y, threadIdx.z};
  t.block_dim = {blockDim.x, blockDim.y, blockDim.z};
  t.grid_dim = {gridDim.x, gridDim.y, gridDim.z};
  return t;
}

inline dim3 to_dim3(const Dim3& d) {
  return dim3(static_cast<unsigned>(d.x), static_cast<unsigned>(d.y), static_cast<unsigned>(d.z));
}
}  // namespace mlk
#endif
