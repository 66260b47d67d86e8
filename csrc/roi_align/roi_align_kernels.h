// The CUDA kernels of roi_align, written once over a Runner: CudaRunner (roi_align_cuda.cu)
// launches them on a GPU, EmulatorRunner (roi_align_emulated.cpp) runs the same code on the CPU
// grid emulator. All arithmetic is in float32 for float16/bfloat16 (at::opmath_type).
//
//  forward:         one thread per output element;
//  input gradient:  atomics (one thread per grad element), or, when
//                   torch.are_deterministic_algorithms_enabled(), one thread per (image, channel)
//                   plane adding its RoIs in index order;
//  box gradient:    one block per RoI, a tree sum of per-thread moments in shared memory.
#pragma once

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "roi_align.h"

namespace mlk {
namespace roi_align {

constexpr int64_t kBoxGradThreads = 256;  // a power of two: block_sum_phase halves it

// The box-gradient block function; a functor rather than a lambda because its Block type
// differs between runners (emulate::Block, DeviceBlock).
template <typename S, typename T>
struct BoxGradBlock {
  const S* grad;
  const S* input;
  const S* rois;
  Params<T> p;
  T* grad_rois;

  template <typename Block>
  MLK_HOST_DEVICE void operator()(Block& block) const {
    T* shared = block.template shared<T>();
    block.phase([&](const ThreadIndex& t) {
      box_grad_partial_phase(t, grad, input, rois, p, shared);
    });
    for (int64_t stride = kBoxGradThreads / 2; stride > 0; stride /= 2) {
      block.phase([&](const ThreadIndex& t) { block_sum_phase(t, stride, shared); });
    }
    block.phase([&](const ThreadIndex& t) { box_grad_write_phase(t, rois, p, shared, grad_rois); });
  }
};

template <typename Runner>
at::Tensor roi_align_forward_kernel(const Runner& run, const at::Tensor& input,
                                    const at::Tensor& boxes, const Args& a) {
  check_forward(input, boxes, a);
  auto out = at::empty({boxes.size(0), input.size(1), a.pooled_height, a.pooled_width},
                       input.options());
  if (out.numel() == 0) return out;
  const auto map = input.contiguous();
  const auto rois = boxes.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align", [&] {
    using T = at::opmath_type<scalar_t>;
    const Params<T> p = to_params<T>(a, map);
    const scalar_t* in_p = map.data_ptr<scalar_t>();
    const scalar_t* rois_p = rois.data_ptr<scalar_t>();
    scalar_t* out_p = out.data_ptr<scalar_t>();
    const int64_t total = out.numel();
    run.threads(launch_config_1d(total), [=] MLK_LAMBDA(const ThreadIndex& t) {
      forward_thread(t, total, in_p, rois_p, p, out_p);
    });
  });
  return out;
}

template <typename Runner>
std::tuple<at::Tensor, at::Tensor> roi_align_backward_kernel(const Runner& run,
                                                             const at::Tensor& grad,
                                                             const at::Tensor& input,
                                                             const at::Tensor& boxes,
                                                             const Args& a) {
  check_backward(grad, input, boxes, a);
  const auto acc_type = accumulation_type(input.scalar_type());
  auto grad_input = at::zeros(input.sizes(), input.options().dtype(acc_type));
  auto grad_rois = at::zeros({boxes.size(0), 5}, input.options().dtype(acc_type));
  if (grad.numel() > 0) {
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    const auto map = input.contiguous();
    const auto rois = boxes.contiguous();
    const auto g = grad.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_backward", [&] {
          using T = at::opmath_type<scalar_t>;
          const Params<T> p = to_params<T>(a, map);
          const scalar_t* in_p = map.data_ptr<scalar_t>();
          const scalar_t* rois_p = rois.data_ptr<scalar_t>();
          const scalar_t* g_p = g.data_ptr<scalar_t>();
          T* gi_p = grad_input.data_ptr<T>();
          T* gr_p = grad_rois.data_ptr<T>();
          const int64_t num_rois = rois.size(0);
          if (deterministic) {
            const int64_t planes = input.size(0) * input.size(1);
            run.threads(launch_config_1d(planes, 128), [=] MLK_LAMBDA(const ThreadIndex& t) {
              backward_input_plane_thread(t, planes, num_rois, g_p, rois_p, p, gi_p);
            });
          } else {
            const int64_t total = g.numel();
            run.threads(launch_config_1d(total), [=] MLK_LAMBDA(const ThreadIndex& t) {
              backward_input_atomic_thread(t, total, g_p, rois_p, p, gi_p);
            });
          }
          LaunchConfig config;
          config.grid.x = num_rois;
          config.block.x = kBoxGradThreads;
          config.shared_bytes = static_cast<int64_t>(4 * kBoxGradThreads * sizeof(T));
          run.blocks(config, BoxGradBlock<scalar_t, T>{g_p, in_p, rois_p, p, gr_p});
        });
  }
  return {grad_input.to(input.scalar_type()), grad_rois.to(boxes.scalar_type())};
}

}  // namespace roi_align
}  // namespace mlk
