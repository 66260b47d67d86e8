// The kernel of beam_search_step, written once over a Runner: CudaRunner (beam_search_cuda.cu)
// launches it on a GPU, EmulatorRunner (beam_search_emulated.cpp) runs the same code on the CPU
// grid emulator. The CPU has its own kernel (beam_search_cpu.cpp: a bounded heap per row over a
// vectorized filter), declared below; both select by the keys of beam_search_math.h.
#pragma once

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "beam_search.h"

// The block functor below is a __host__ __device__ template over the block type; each
// instantiation calls only the functions of its own side, which nvcc's cross-space check cannot
// see through.
#ifndef MLK_EXEC_CHECK_DISABLE
#if defined(__CUDACC__)
#define MLK_EXEC_CHECK_DISABLE _Pragma("nv_exec_check_disable")
#else
#define MLK_EXEC_CHECK_DISABLE
#endif
#endif

namespace mlk {

struct CpuParallelRunner;  // csrc/common/cpu_runner.h

namespace beam_search {

// The most threads of the CUDA kernel's blocks (a power of two, as the tree sum needs).
constexpr int64_t kMaxThreads = 256;
// Dynamic shared memory a block may take without opting in on any GPU (grid.h; the runners refuse
// more).
constexpr int64_t kMaxSharedBytes = kMaxDynamicSharedBytes;

// The largest K whose shared memory fits kMaxSharedBytes with `threads` threads.
inline int64_t max_cuda_beams(int64_t threads) {
  int64_t beams = (kMaxSharedBytes - shared_bytes(0, threads)) / 20;
  while (beams > 0 && shared_bytes(beams, threads) > kMaxSharedBytes) --beams;
  return beams;
}

// One batch row per block (see beam_search_math.h for the phases).
template <typename T>
struct StepBlock {
  StepArgs<T> a;

  MLK_EXEC_CHECK_DISABLE
  template <typename Block>
  MLK_HOST_DEVICE void operator()(Block& block) const {
    const StepArgs<T>& args = a;
    const int64_t threads = block.num_threads();
    const SharedLayout s =
        shared_layout(block.template shared<unsigned char>(), args.beams, threads);
    const auto tree_sum = [&]() {
      for (int64_t stride = threads / 2; stride > 0; stride /= 2) {
        block.phase([&](const ThreadIndex& t) { sum_phase(t, s, stride); });
      }
    };
    block.phase([&](const ThreadIndex& t) { classify_phase(t, args, s); });
    block.phase([&](const ThreadIndex& t) { count_phase(t, args, s, 64); });
    tree_sum();
    block.phase([&](const ThreadIndex& t) { start_select_phase(t, s, args.beams); });
    for (int bit = 63; bit >= 0 && !select_done(s); --bit) {
      block.phase([&](const ThreadIndex& t) { count_phase(t, args, s, bit); });
      tree_sum();
      block.phase([&](const ThreadIndex& t) { decide_bit_phase(t, s, bit); });
    }
    block.phase([&](const ThreadIndex& t) { count_selected_phase(t, args, s); });
    block.phase([&](const ThreadIndex& t) { offsets_phase(t, s); });
    block.phase([&](const ThreadIndex& t) { compact_phase(t, args, s); });
    block.phase([&](const ThreadIndex& t) { write_phase(t, args, s); });
  }
};

// The CPU's own kernel (beam_search_cpu.cpp): for CpuParallelRunner, overload resolution picks it
// over the runner template below.
void step_kernel(const CpuParallelRunner& run, const StepInputs& in, const StepOutputs& out);

template <typename Runner>
void step_kernel(const Runner& run, const StepInputs& in, const StepOutputs& out) {
  // Threads: enough for a row's candidates, a power of two from a warp to kMaxThreads.
  const int64_t count = in.beams * (in.labels + 1);
  int64_t threads = 32;
  while (threads < kMaxThreads && threads < count) threads *= 2;
  LaunchConfig config;
  config.grid.x = in.batch;
  config.block.x = threads;
  config.shared_bytes = shared_bytes(in.beams, threads);
  TORCH_CHECK(config.shared_bytes <= kMaxSharedBytes, in.op,
              ": the CUDA kernel keeps a row's K beams in shared memory and takes K up to ",
              max_cuda_beams(threads), " (log_probs Tensor[B, K, C]), got K = ", in.beams);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.log_probs.scalar_type(), kOp, [&] {
    run.blocks(config, StepBlock<scalar_t>{step_args<scalar_t>(in, out)});
  });
}

// The step's parents [B * K] turned, in place, into the rows they came from (source_row).
struct SourceRowsThread {
  int64_t* parents;
  int64_t rows, beams;
  MLK_HOST_DEVICE void operator()(const ThreadIndex& t) const {
    for (int64_t i = t.global_x(); i < rows; i += t.grid_stride_x()) {
      parents[i] = source_row(i, parents[i], beams);
    }
  }
};

// One thread per final beam (beam_search_math.h's backtrack_row).
struct BacktrackThread {
  BacktrackArgs a;
  MLK_HOST_DEVICE void operator()(const ThreadIndex& t) const {
    for (int64_t row = t.global_x(); row < a.rows; row += t.grid_stride_x()) backtrack_row(a, row);
  }
};

// Every op of the family over one Runner, with the dispatcher's signatures: registered with
// CudaRunner, EmulatorRunner and CpuParallelRunner (whose own step_kernel replaces the runner's).
template <typename Runner>
struct Kernels {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> beam_search_step(
      const at::Tensor& log_probs, const at::Tensor& scores, const at::Tensor& used,
      const at::Tensor& finished, double log_threshold, int64_t max_length) {
    const StepInputs in =
        prepare_step(log_probs, scores, used, finished, log_threshold, max_length);
    const StepOutputs out = allocate_step_outputs(in);
    if (in.batch > 0 && in.beams > 0) step_kernel(Runner::on(in.scores), in, out);
    return out.as_tuple();
  }

  // beam_search_step, then its parents as rows (the returned `sources`, with `labels`, flat
  // [B * K]), each state tensor's rows picked by them, and whether every beam has finished: a
  // step of the driver in one call.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    std::vector<at::Tensor>, at::Tensor>
  beam_search_advance(const at::Tensor& log_probs, const at::Tensor& scores,
                      const at::Tensor& used, const at::Tensor& finished, at::TensorList state,
                      double log_threshold, int64_t max_length) {
    const StepInputs in =
        prepare_step(log_probs, scores, used, finished, log_threshold, max_length, kAdvanceOp);
    check_state(in, state);
    const StepOutputs out = allocate_step_outputs(in);
    const int64_t rows = in.batch * in.beams;
    if (rows > 0) {
      step_kernel(Runner::on(in.scores), in, out);
      const SourceRowsThread to_rows{out.parents.data_ptr<int64_t>(), rows, in.beams};
      Runner::on(in.scores).threads(launch_config_1d(rows), to_rows);
    }
    const at::Tensor sources = out.parents.view({rows});
    return {out.scores,
            sources,
            out.labels.view({rows}),
            out.used,
            out.finished,
            reorder_state(kAdvanceOp, state, sources),
            all_finished(out.finished)};
  }

  static std::tuple<at::Tensor, at::Tensor> beam_search_backtrack(const at::Tensor& sources,
                                                                  const at::Tensor& labels,
                                                                  const at::Tensor& scores,
                                                                  int64_t width) {
    const BacktrackInputs in = prepare_backtrack(sources, labels, scores, width);
    const auto options = in.scores.options().dtype(at::kLong);
    at::Tensor paths = allocate_output(kBacktrackOp, {scores.size(0), scores.size(1), width},
                                       options);
    at::Tensor lengths = allocate_output(kBacktrackOp, {scores.size(0), scores.size(1)}, options);
    if (in.rows == 0) return {paths, lengths};
    BacktrackArgs a;
    a.sources = in.sources.data_ptr<int64_t>();
    a.labels = in.labels.data_ptr<int64_t>();
    a.scores = in.scores.data_ptr<float>();
    a.steps = in.steps;
    a.rows = in.rows;
    a.width = in.width;
    a.out_paths = paths.data_ptr<int64_t>();
    a.out_lengths = lengths.data_ptr<int64_t>();
    int bad_source = 0;
    if (!in.scores.is_cuda()) a.bad_source = &bad_source;
    Runner::on(in.scores).threads(launch_config_1d(in.rows), BacktrackThread{a});
    TORCH_CHECK_INDEX(bad_source == 0, kBacktrackOp, ": sources must hold rows in [0, R = ",
                      in.rows, "), got a value outside it");
    return {paths, lengths};
  }
};

// The family's registration, written once: op names and the kernels behind them.
template <typename K>
void register_beam_search(torch::Library& m) {
  m.impl("beam_search_step", &K::beam_search_step);
  m.impl("beam_search_backtrack", &K::beam_search_backtrack);
  m.impl("beam_search_advance", &K::beam_search_advance);
}

}  // namespace beam_search
}  // namespace mlk
