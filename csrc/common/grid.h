// Launch geometry shared by CUDA kernels and the CPU grid emulator.
//
// Every __global__ function in mlkernels is a thin shell: it builds a ThreadIndex from the CUDA
// builtins and calls an MLK_HOST_DEVICE function from its family's *_math.h. The emulator
// (emulator.h) builds the same ThreadIndex values on the CPU and calls the same functions, so the
// logic of each CUDA kernel runs in CPU tests without a GPU.
#pragma once

#include <cstdint>
#include <string>

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

// What every CUDA GPU we build for (compute capability 8.0 and 9.0; in fact every one since 3.0)
// refuses to launch. Both runners check each launch against these (launch_config_error), so the
// emulator refuses what a GPU would. Dynamic shared memory beyond 48 KB needs a per-kernel opt-in
// (cudaFuncSetAttribute) that our runners do not make.
constexpr int64_t kMaxThreadsPerBlock = 1024;
constexpr int64_t kMaxBlockDimXY = 1024;
constexpr int64_t kMaxBlockDimZ = 64;
constexpr int64_t kMaxGridDimX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridDimYZ = 65535;
constexpr int64_t kMaxDynamicSharedBytes = 48 * 1024;

inline std::string dim3_string(const Dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// Why a GPU would refuse to launch `config`, naming the limit and the config; empty when it
// launches. An empty launch (no blocks or no threads) is fine: the runners skip it.
inline std::string launch_config_error(const LaunchConfig& config) {
  const Dim3& g = config.grid;
  const Dim3& b = config.block;
  if (g.count() == 0 || b.count() == 0) return "";
  std::string limit;
  if (g.x < 0 || g.y < 0 || g.z < 0 || b.x < 0 || b.y < 0 || b.z < 0) {
    limit = "grid and block sizes must be >= 0";
  } else if (b.x > kMaxBlockDimXY || b.y > kMaxBlockDimXY || b.z > kMaxBlockDimZ) {
    limit = "a block is at most (1024, 1024, 64) threads each way";
  } else if (b.count() > kMaxThreadsPerBlock) {
    limit = "a block has at most 1024 threads";
  } else if (g.x > kMaxGridDimX || g.y > kMaxGridDimYZ || g.z > kMaxGridDimYZ) {
    limit = "a grid is at most (2147483647, 65535, 65535) blocks";
  } else if (config.shared_bytes < 0 || config.shared_bytes > kMaxDynamicSharedBytes) {
    limit = "a block takes 0 to 49152 bytes (48 KB) of dynamic shared memory";
  } else {
    return "";
  }
  return "CUDA launch refused: " + limit + "; got grid " + dim3_string(g) + ", block " +
         dim3_string(b) + ", " + std::to_string(config.shared_bytes) +
         " bytes of dynamic shared memory";
}

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
