// The CPU grid emulator: runs a CUDA kernel's MLK_HOST_DEVICE thread functions over the same
// launch grid on the CPU, so the kernel's logic is tested on machines without a GPU.
//
// Two shapes of kernel are supported:
//  * independent threads (no barriers): emulate::launch(config, fn) calls fn(ThreadIndex) for
//    every thread of every block;
//  * cooperative blocks (shared memory, __syncthreads): emulate::launch_blocks(config, fn) calls
//    fn(Block&) once per block; the function runs each phase between two barriers with
//    block.phase(...), which calls the phase for every thread of the block before returning, so
//    a phase sees everything the previous phase wrote, as after __syncthreads().
//
// Threads of a phase run in reverse rank order: a kernel whose result depends on threads of one
// phase running in rank order (a missing barrier) then fails in the emulator as it could on a GPU.
// Blocks run one after another; kernels must not depend on block order either, and block-order
// races (e.g. non-atomic writes to the same global address) are the kernels' own responsibility.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "grid.h"

namespace mlk {
namespace emulate {

// A per-thread state (the registers a thread keeps across barriers): one S per thread of the block.
template <typename S>
class PerThread {
 public:
  explicit PerThread(int64_t n) : states_(static_cast<size_t>(n)) {}
  S& operator[](const ThreadIndex& t) { return states_[static_cast<size_t>(t.thread_rank())]; }

 private:
  std::vector<S> states_;
};

class Block {
 public:
  Block(const LaunchConfig& config, Dim3 block_index)
      : config_(config),
        index_(block_index),
        shared_(static_cast<size_t>(config.shared_bytes) / sizeof(double) + 1, 0.0) {
    // All bits set: NaN as float or double, -1 as an integer. A kernel that reads shared memory
    // before writing it gets garbage on a GPU; here it gets values that show.
    std::memset(shared_.data(), 0xff, shared_.size() * sizeof(double));
  }

  int64_t num_threads() const { return config_.block.count(); }
  const Dim3& index() const { return index_; }

  // The block's dynamic shared memory (config.shared_bytes bytes). CUDA leaves it uninitialized;
  // the emulator fills it with all-ones bytes at block start, so a kernel relying on zeros fails.
  template <typename T>
  T* shared() {
    return reinterpret_cast<T*>(shared_.data());
  }

  // Runs phase(ThreadIndex) for every thread of the block: one stretch between two barriers.
  template <typename Phase>
  void phase(Phase&& phase_fn) const {
    const Dim3& bd = config_.block;
    for (int64_t rank = bd.count() - 1; rank >= 0; --rank) {
      phase_fn(thread_at(rank));
    }
  }

  template <typename S>
  PerThread<S> per_thread() const {
    return PerThread<S>(num_threads());
  }

  ThreadIndex thread_at(int64_t rank) const {
    ThreadIndex t;
    t.block = index_;
    t.block_dim = config_.block;
    t.grid_dim = config_.grid;
    t.thread.x = rank % config_.block.x;
    t.thread.y = (rank / config_.block.x) % config_.block.y;
    t.thread.z = rank / (config_.block.x * config_.block.y);
    return t;
  }

 private:
  LaunchConfig config_;
  Dim3 index_;
  std::vector<double> shared_;  // double-typed so the storage is suitably aligned
};

// Refuses, as a GPU would, a launch beyond CUDA's limits (grid.h); std::runtime_error, which the
// dispatcher reports as a RuntimeError, since this header needs no ATen.
inline void check_launch(const LaunchConfig& config) {
  const std::string error = launch_config_error(config);
  if (!error.empty()) throw std::runtime_error(error);
}

template <typename BlockFn>
void launch_blocks(const LaunchConfig& config, BlockFn&& block_fn) {
  check_launch(config);
  const Dim3& g = config.grid;
  for (int64_t z = 0; z < g.z; ++z)
    for (int64_t y = 0; y < g.y; ++y)
      for (int64_t x = 0; x < g.x; ++x) {
        Block block(config, Dim3{x, y, z});
        block_fn(block);
      }
}

template <typename ThreadFn>
void launch(const LaunchConfig& config, ThreadFn&& thread_fn) {
  launch_blocks(config, [&](Block& block) { block.phase(thread_fn); });
}

}  // namespace emulate

// Runs a family's kernels (its *_kernels.h, written over a Runner) on the emulator. The CUDA
// counterpart is CudaRunner in cuda_runner.cuh: the same host code drives both.
struct EmulatorRunner {
  // The runner for an op's tensors (all on the CPU here); a template, so that this header needs
  // no ATen (the emulator's self-test compiles without torch).
  template <typename Tensor>
  static EmulatorRunner on(const Tensor&) {
    return {};
  }
  // What a cooperative kernel's lambda takes: `[=] MLK_LAMBDA(typename Runner::Block& block)`.
  using Block = emulate::Block;
  template <typename ThreadFn>
  void threads(const LaunchConfig& config, ThreadFn&& fn) const {
    emulate::launch(config, fn);
  }
  template <typename BlockFn>
  void blocks(const LaunchConfig& config, BlockFn&& fn) const {
    emulate::launch_blocks(config, fn);
  }
};

}  // namespace mlk
