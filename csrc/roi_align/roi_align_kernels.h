// The CUDA kernels of roi_align, written once over a Runner: CudaRunner (roi_align_cuda.cu)
// launches them on a GPU, EmulatorRunner (roi_align_emulated.cpp) runs the same code on the CPU
// grid emulator. Kernels<Runner> and register_roi_align below are the family's one registration.
// All arithmetic is in float32 for float16/bfloat16 (at::opmath_type).
//
//  forward:         one thread per output element for the RoIs of ordinary size (PlainWalk), then
//                   one block per RoI for the others (huge grids; see forward_plain_thread);
//  input gradient:  atomics, laid out as the forward, or, when
//                   torch.are_deterministic_algorithms_enabled(), one thread per (image, map
//                   row, channel) adding the terms in its row of its image's RoIs' bins, in index
//                   order (PlainWalk; then the general walk redoes the images with a huge RoI);
//  box gradient:    blocks over chunks of the plain RoIs' outputs (PlainChunkBlock; with the
//                   atomic input gradient in the same pass when both are asked for), then one
//                   block per RoI (BoxGradBlock) adding up its chunks' moments, or walking a RoI
//                   the chunks left; tree sums in shared memory, no atomics: deterministic.
#pragma once

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <limits>

#include "roi_align.h"

namespace mlk {

struct CpuParallelRunner;  // csrc/common/cpu_runner.h

namespace roi_align {

constexpr int64_t kBoxGradThreads = 256;  // a power of two: block_sum_phase halves it
constexpr int64_t kGeneralRoiThreads = 256;

// Whether a grid-stride loop over [0, total) under `config` can count in int32_t (BinIndex): its
// last step, the largest index plus the grid's size, must not overflow.
inline bool fits_int32(int64_t total, const LaunchConfig& config) {
  return total + config.grid.x * config.block.x <= std::numeric_limits<int32_t>::max();
}

// Whether the plain launches run: their indices (outputs, pixels of a map plane) fit in int32_t.
template <typename T>
bool plain_launch_fits(int64_t total, const LaunchConfig& config, const Params<T>& p) {
  return fits_int32(total, config) && plain_walk_map_fits(p);
}

// The launch of the *_general_roi_thread functions: one block per RoI.
inline LaunchConfig general_roi_config(int64_t num_rois) {
  LaunchConfig config;
  config.grid.x = num_rois;
  config.block.x = kGeneralRoiThreads;
  return config;
}

// The chunks of plain_chunk_phase: kBoxGradThreads outputs each.
inline int64_t chunks_per_roi(int64_t channels, int64_t bins) {
  return (channels * bins + kBoxGradThreads - 1) / kBoxGradThreads;
}

// The tree sum of a block's moments in shared memory, one halving a phase.
template <typename Block, typename T>
MLK_HOST_DEVICE void block_sum(Block& block, T* shared) {
  for (int64_t stride = kBoxGradThreads / 2; stride > 0; stride /= 2) {
    block.phase([&](const ThreadIndex& t) { block_sum_phase(t, stride, shared); });
  }
}

// The block functions of the box gradient; functors rather than lambdas because their Block type
// differs between runners (emulate::Block, DeviceBlock). PlainChunkBlock: chunks of the plain
// RoIs' outputs (and their input gradient, kInput), moments into partial.
template <bool kInput, typename S, typename T>
struct PlainChunkBlock {
  const S* grad;
  const S* input;
  const S* rois;
  Params<T> p;
  int32_t chunks;
  T* grad_input;
  T* partial;

  template <typename Block>
  MLK_HOST_DEVICE void operator()(Block& block) const {
    T* shared = block.template shared<T>();
    block.phase([&](const ThreadIndex& t) {
      plain_chunk_phase<kInput>(t, chunks, grad, input, rois, p, grad_input, shared);
    });
    block_sum(block, shared);
    block.phase([&](const ThreadIndex& t) { plain_chunk_write_phase(t, shared, partial); });
  }
};

// One block per RoI: the RoI's gradient row, from its chunks' moments (partial) or its own walk
// (see box_grad_partial_phase).
template <typename S, typename T>
struct BoxGradBlock {
  const S* grad;
  const S* input;
  const S* rois;
  Params<T> p;
  const T* partial;
  int64_t chunks;
  T* grad_rois;

  template <typename Block>
  MLK_HOST_DEVICE void operator()(Block& block) const {
    T* shared = block.template shared<T>();
    block.phase([&](const ThreadIndex& t) {
      box_grad_partial_phase(t, grad, input, rois, p, partial, chunks, shared);
    });
    block_sum(block, shared);
    block.phase([&](const ThreadIndex& t) { box_grad_write_phase(t, rois, p, shared, grad_rois); });
  }
};

// The CPU's own kernels (roi_align_cpu.cpp: channels-last, no atomics, deterministic): for
// CpuParallelRunner, overload resolution picks them over the runner templates below.
at::Tensor roi_align_forward_kernel(const CpuParallelRunner& run, const at::Tensor& input,
                                    const at::Tensor& boxes, const Args& a);
std::tuple<at::Tensor, at::Tensor> roi_align_backward_kernel(const CpuParallelRunner& run,
                                                             const at::Tensor& grad,
                                                             const at::Tensor& input,
                                                             const at::Tensor& boxes, const Args& a,
                                                             OutputMask mask);

template <typename Runner>
at::Tensor roi_align_forward_kernel(const Runner& run, const at::Tensor& input,
                                    const at::Tensor& boxes, const Args& a) {
  check_forward(input, boxes, a);
  auto out =
      allocate_output("roi_align", {boxes.size(0), input.size(1), a.pooled_height, a.pooled_width},
                      input.options());
  if (out.numel() == 0) return out;
  const auto map = contiguous_input("roi_align", "input", input);
  const auto rois = contiguous_input("roi_align", "boxes", boxes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align", [&] {
    using T = at::opmath_type<scalar_t>;
    const Params<T> p = to_params<T>(a, map);
    const scalar_t* in_p = map.data_ptr<scalar_t>();
    const scalar_t* rois_p = rois.data_ptr<scalar_t>();
    scalar_t* out_p = out.data_ptr<scalar_t>();
    const int64_t total = out.numel();
    const LaunchConfig config = launch_config_1d(total);
    const bool plain = plain_launch_fits(total, config, p);
    if (plain) {
      const int32_t total32 = static_cast<int32_t>(total);
      run.threads(config, [=] MLK_LAMBDA(const ThreadIndex& t) {
        forward_plain_thread(t, total32, in_p, rois_p, p, out_p);
      });
    }
    run.threads(general_roi_config(boxes.size(0)), [=] MLK_LAMBDA(const ThreadIndex& t) {
      forward_general_roi_thread(t, !plain, in_p, rois_p, p, out_p);
    });
  });
  return out;
}

template <typename Runner>
std::tuple<at::Tensor, at::Tensor> roi_align_backward_kernel(const Runner& run,
                                                             const at::Tensor& grad,
                                                             const at::Tensor& input,
                                                             const at::Tensor& boxes, const Args& a,
                                                             OutputMask mask) {
  check_backward(grad, input, boxes, a);
  const auto acc_type = accumulation_type(input.scalar_type());
  const auto acc_options = input.options().dtype(acc_type);
  auto grad_input = mask.input ? allocate_zeros("roi_align_backward", input.sizes(), acc_options)
                               : at::empty({0}, acc_options);
  auto grad_rois = mask.boxes
                       ? allocate_zeros("roi_align_backward", {boxes.size(0), 5}, acc_options)
                       : at::empty({0}, acc_options);
  // An empty map (H or W = 0) takes no samples: both gradients are zero, and nothing is sized
  // by the image count (which can be huge for an expanded, empty input).
  if (grad.numel() > 0 && input.numel() > 0 && (mask.input || mask.boxes)) {
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    const auto map = contiguous_input("roi_align_backward", "input", input);
    const auto rois = contiguous_input("roi_align_backward", "boxes", boxes);
    const auto g = contiguous_input("roi_align_backward", "grad", grad);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_backward", [&] {
          using T = at::opmath_type<scalar_t>;
          const Params<T> p = to_params<T>(a, map);
          const scalar_t* in_p = map.data_ptr<scalar_t>();
          const scalar_t* rois_p = rois.data_ptr<scalar_t>();
          const scalar_t* g_p = g.data_ptr<scalar_t>();
          const int64_t num_rois = rois.size(0);
          const int64_t total = g.numel();
          const LaunchConfig config = launch_config_1d(total);
          const bool plain = plain_launch_fits(total, config, p);
          // Both gradients of the plain RoIs in one pass (PlainChunkBlock<true>), unless the
          // input gradient must be deterministic; the others' input gradient in the general
          // atomic kernel, their box gradient in BoxGradBlock.
          const bool fused = mask.input && mask.boxes && plain && !deterministic;
          T* gi_p = mask.input ? grad_input.data_ptr<T>() : nullptr;
          if (mask.input && deterministic) {
            // The plain rows, then the rows of the images with a RoI the plain walk does not fit
            // (every row where the map is too large for it), redone (backward_input_row_thread).
            const int64_t rows = input.size(0) * input.size(1) * input.size(2);
            const LaunchConfig row_config = launch_config_1d(rows, 128);
            at::Tensor general_images;
            int32_t* general_p = nullptr;
            if (plain_walk_map_fits(p)) {
              general_images = at::zeros({input.size(0)}, input.options().dtype(at::kInt));
              general_p = general_images.data_ptr<int32_t>();
              run.threads(row_config, [=] MLK_LAMBDA(const ThreadIndex& t) {
                backward_input_row_thread<PlainWalk>(t, rows, num_rois, g_p, rois_p, p, gi_p,
                                                     general_p);
              });
            }
            run.threads(row_config, [=] MLK_LAMBDA(const ThreadIndex& t) {
              backward_input_row_thread<GeneralWalk>(t, rows, num_rois, g_p, rois_p, p, gi_p,
                                                     general_p);
            });
          } else if (mask.input) {
            if (plain && !fused) {
              const int32_t total32 = static_cast<int32_t>(total);
              run.threads(config, [=] MLK_LAMBDA(const ThreadIndex& t) {
                backward_input_plain_thread(t, total32, g_p, rois_p, p, gi_p);
              });
            }
            run.threads(general_roi_config(num_rois), [=] MLK_LAMBDA(const ThreadIndex& t) {
              backward_input_general_roi_thread(t, !plain, g_p, rois_p, p, gi_p);
            });
          }
          if (mask.boxes) {
            const int64_t chunks = chunks_per_roi(p.channels, p.pooled_height * p.pooled_width);
            LaunchConfig block_config;
            block_config.block.x = kBoxGradThreads;
            block_config.shared_bytes = static_cast<int64_t>(4 * kBoxGradThreads * sizeof(T));
            at::Tensor partial;
            if (plain) {
              partial = at::empty({num_rois * chunks * 4}, acc_options);
              block_config.grid.x = num_rois * chunks;
              const int32_t chunks32 = static_cast<int32_t>(chunks);
              T* partial_p = partial.data_ptr<T>();
              if (fused) {
                run.blocks(block_config, PlainChunkBlock<true, scalar_t, T>{
                                             g_p, in_p, rois_p, p, chunks32, gi_p, partial_p});
              } else {
                run.blocks(block_config, PlainChunkBlock<false, scalar_t, T>{
                                             g_p, in_p, rois_p, p, chunks32, nullptr, partial_p});
              }
            }
            block_config.grid.x = num_rois;
            run.blocks(block_config,
                       BoxGradBlock<scalar_t, T>{g_p, in_p, rois_p, p,
                                                 plain ? partial.data_ptr<T>() : nullptr, chunks,
                                                 grad_rois.data_ptr<T>()});
          }
        });
  }
  return {grad_input.to(input.scalar_type()), grad_rois.to(boxes.scalar_type())};
}

// Every op of the family over one Runner, with the dispatcher's signatures: registered with
// CudaRunner (roi_align_cuda.cu), EmulatorRunner (roi_align_emulated.cpp) and CpuParallelRunner
// (roi_align_cpu.cpp, whose own overloads above replace both kernels).
template <typename Runner>
struct Kernels {
  static at::Tensor roi_align(const at::Tensor& input, const at::Tensor& boxes,
                              double spatial_scale, int64_t pooled_height, int64_t pooled_width,
                              int64_t sampling_ratio, bool aligned) {
    const Args a{spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned};
    return roi_align_forward_kernel(Runner::on(input), input, boxes, a);
  }
  static std::tuple<at::Tensor, at::Tensor> roi_align_backward(
      const at::Tensor& grad, const at::Tensor& input, const at::Tensor& boxes,
      double spatial_scale, int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
      bool aligned, std::array<bool, 2> output_mask) {
    const Args a{spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned};
    return roi_align_backward_kernel(Runner::on(input), grad, input, boxes, a,
                                     OutputMask{output_mask[0], output_mask[1]});
  }
};

// The family's registration, written once: op names and the kernels behind them.
template <typename K>
void register_roi_align(torch::Library& m) {
  m.impl("roi_align", &K::roi_align);
  m.impl("roi_align_backward", &K::roi_align_backward);
}

}  // namespace roi_align
}  // namespace mlk
