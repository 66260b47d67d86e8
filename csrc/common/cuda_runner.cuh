// Launches a family's kernels (its *_kernels.h, written over a Runner) on a CUDA device.
// Included only from .cu files. The emulator counterpart is EmulatorRunner in emulator.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "grid.h"

namespace mlk {

template <typename ThreadFn>
__global__ void run_threads_kernel(ThreadFn fn) {
  fn(this_thread());
}

// The device side of emulate::PerThread: on a GPU a thread's state simply lives in its registers.
template <typename S>
struct DevicePerThread {
  S state;
  __device__ S& operator[](const ThreadIndex&) { return state; }
};

// The device side of emulate::Block: a phase is the thread's own work followed by a barrier.
class DeviceBlock {
 public:
  template <typename Phase>
  __device__ void phase(Phase&& phase_fn) const {
    phase_fn(this_thread());
    __syncthreads();
  }
  template <typename T>
  __device__ T* shared() const {
    extern __shared__ __align__(16) unsigned char mlk_dynamic_shared[];
    return reinterpret_cast<T*>(mlk_dynamic_shared);
  }
  template <typename S>
  __device__ DevicePerThread<S> per_thread() const {
    return DevicePerThread<S>{};
  }
  // The block's index in the grid, as emulate::Block::index().
  __device__ Dim3 index() const { return Dim3{blockIdx.x, blockIdx.y, blockIdx.z}; }
  __device__ int64_t num_threads() const {
    return static_cast<int64_t>(blockDim.x) * blockDim.y * blockDim.z;
  }
};

template <typename BlockFn>
__global__ void run_blocks_kernel(BlockFn fn) {
  DeviceBlock block;
  fn(block);
}

// Refuses a launch beyond CUDA's limits (grid.h) with the same message as the emulator, before
// CUDA would refuse it with a bare "invalid configuration argument".
inline void check_launch(const LaunchConfig& config) {
  const std::string error = launch_config_error(config);
  TORCH_CHECK(error.empty(), error);
}

// Holds the device guard for the launches it makes; every launch goes to the current stream and
// is checked for launch errors.
class CudaRunner {
 public:
  // What a cooperative kernel's lambda takes: `[=] MLK_LAMBDA(typename Runner::Block& block)`.
  using Block = DeviceBlock;

  explicit CudaRunner(const c10::Device& device) : guard_(device) {}
  // The runner for an op whose tensors live on `t`'s device.
  static CudaRunner on(const at::Tensor& t) { return CudaRunner(t.device()); }

  template <typename ThreadFn>
  void threads(const LaunchConfig& config, ThreadFn fn) const {
    if (config.grid.count() == 0 || config.block.count() == 0) return;
    check_launch(config);
    run_threads_kernel<<<to_dim3(config.grid), to_dim3(config.block),
                         static_cast<size_t>(config.shared_bytes),
                         at::cuda::getCurrentCUDAStream()>>>(fn);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename BlockFn>
  void blocks(const LaunchConfig& config, BlockFn fn) const {
    if (config.grid.count() == 0 || config.block.count() == 0) return;
    check_launch(config);
    run_blocks_kernel<<<to_dim3(config.grid), to_dim3(config.block),
                        static_cast<size_t>(config.shared_bytes),
                        at::cuda::getCurrentCUDAStream()>>>(fn);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  c10::cuda::CUDAGuard guard_;
};

}  // namespace mlk
