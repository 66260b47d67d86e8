// The kernels of the box ops, written once over a Runner: CudaRunner (boxes_cuda.cu) launches them
// on a GPU, EmulatorRunner (boxes_emulated.cpp) runs the same code on the CPU grid emulator, and
// CpuParallelRunner (boxes_cpu.cpp) runs it on the CPU's threads.
#pragma once

#include <torch/library.h>

#include <array>

#include "boxes.h"

namespace mlk {

struct CpuParallelRunner;  // csrc/common/cpu_runner.h

namespace boxes {

template <typename Runner>
at::Tensor encode_boxes_kernel(const Runner& run, const at::Tensor& boxes,
                               const at::Tensor& anchors, at::ArrayRef<double> weights) {
  check_weights("encode_boxes", weights);
  auto in = pair_boxes("encode_boxes", "boxes", boxes, "anchors", anchors);
  auto out = at::empty(in.shape, in.first.options());
  if (in.rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "encode_boxes", [&] {
    const auto wt = to_weights<scalar_t>(weights);
    const scalar_t* b = in.first.data_ptr<scalar_t>();
    const scalar_t* a = in.second.data_ptr<scalar_t>();
    scalar_t* d = out.data_ptr<scalar_t>();
    const int64_t rows = in.rows;
    run.threads(launch_config_1d(rows), [=] MLK_LAMBDA(const ThreadIndex& t) {
      encode_boxes_thread(t, rows, b, a, wt, d);
    });
  });
  return out;
}

template <typename Runner>
at::Tensor decode_boxes_kernel(const Runner& run, const at::Tensor& deltas,
                               const at::Tensor& anchors, at::ArrayRef<double> weights,
                               double clamp) {
  check_weights("decode_boxes", weights);
  check_clamp("decode_boxes", clamp);
  auto in = pair_boxes("decode_boxes", "deltas", deltas, "anchors", anchors);
  auto out = at::empty(in.shape, in.first.options());
  if (in.rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "decode_boxes", [&] {
    const auto wt = to_weights<scalar_t>(weights);
    const auto clip = static_cast<scalar_t>(clamp);
    const scalar_t* d = in.first.data_ptr<scalar_t>();
    const scalar_t* a = in.second.data_ptr<scalar_t>();
    scalar_t* b = out.data_ptr<scalar_t>();
    const int64_t rows = in.rows;
    run.threads(launch_config_1d(rows), [=] MLK_LAMBDA(const ThreadIndex& t) {
      decode_boxes_thread(t, rows, d, a, wt, clip, b);
    });
  });
  return out;
}

// Only the gradients in `mask` (deltas, anchors) are computed; the others are empty Tensor[0].
template <typename Runner>
std::tuple<at::Tensor, at::Tensor> decode_boxes_backward_kernel(
    const Runner& run, const at::Tensor& grad, const at::Tensor& deltas, const at::Tensor& anchors,
    at::ArrayRef<double> weights, double clamp, std::array<bool, 2> mask) {
  auto prepared = prepare_decode_backward(grad, deltas, anchors, weights, clamp);
  const PairedBoxes& in = prepared.first;
  const at::Tensor& g = prepared.second;
  const auto options = in.first.options();
  auto grad_deltas = mask[0] ? at::empty(in.shape, options) : at::empty({0}, options);
  auto grad_anchors = mask[1] ? at::empty(in.shape, options) : at::empty({0}, options);
  if (in.rows == 0 || !(mask[0] || mask[1])) return {grad_deltas, grad_anchors};
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "decode_boxes_backward", [&] {
    const auto wt = to_weights<scalar_t>(weights);
    const auto clip = static_cast<scalar_t>(clamp);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* d = in.first.data_ptr<scalar_t>();
    const scalar_t* a = in.second.data_ptr<scalar_t>();
    scalar_t* gd = mask[0] ? grad_deltas.data_ptr<scalar_t>() : nullptr;
    scalar_t* ga = mask[1] ? grad_anchors.data_ptr<scalar_t>() : nullptr;
    const int64_t rows = in.rows;
    run.threads(launch_config_1d(rows), [=] MLK_LAMBDA(const ThreadIndex& t) {
      decode_boxes_backward_thread(t, rows, gp, d, a, wt, clip, gd, ga);
    });
  });
  return {grad_deltas, grad_anchors};
}

// The CPU's own box_iou (boxes_cpu.cpp, structure-of-arrays and vectorized): for CpuParallelRunner,
// overload resolution picks it over the runner template below.
// Both take prepare_iou's inputs.
at::Tensor box_iou_kernel(const CpuParallelRunner& run, const at::Tensor& a, const at::Tensor& b);

template <typename Runner>
at::Tensor box_iou_kernel(const Runner& run, const at::Tensor& a, const at::Tensor& b) {
  const int64_t n = a.size(0), m = b.size(0);
  auto out = allocate_output("box_iou", {n, m}, a.options());
  if (n == 0 || m == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "box_iou", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    run.threads(launch_config_1d(n * m),
                [=] MLK_LAMBDA(const ThreadIndex& t) { box_iou_thread(t, n, m, pa, pb, po); });
  });
  return out;
}

// Every op of the family over one Runner, with the dispatcher's signatures: registered with
// CudaRunner (boxes_cuda.cu), EmulatorRunner (boxes_emulated.cpp) and CpuParallelRunner
// (boxes_cpu.cpp, where the CPU's own overloads replace the kernels it has CPU-tuned code for).
template <typename Runner>
struct Kernels {
  static at::Tensor encode_boxes(const at::Tensor& boxes, const at::Tensor& anchors,
                                 at::ArrayRef<double> weights) {
    return encode_boxes_kernel(Runner::on(boxes), boxes, anchors, weights);
  }
  static at::Tensor decode_boxes(const at::Tensor& deltas, const at::Tensor& anchors,
                                 at::ArrayRef<double> weights, double clamp) {
    return decode_boxes_kernel(Runner::on(deltas), deltas, anchors, weights, clamp);
  }
  static std::tuple<at::Tensor, at::Tensor> decode_boxes_backward(
      const at::Tensor& grad, const at::Tensor& deltas, const at::Tensor& anchors,
      at::ArrayRef<double> weights, double clamp, std::array<bool, 2> output_mask) {
    return decode_boxes_backward_kernel(Runner::on(deltas), grad, deltas, anchors, weights, clamp,
                                        output_mask);
  }
  static at::Tensor box_iou(const at::Tensor& boxes1, const at::Tensor& boxes2) {
    const IouInputs in = prepare_iou(boxes1, boxes2);
    return box_iou_kernel(Runner::on(boxes1), in.boxes1, in.boxes2).to(in.result_type);
  }
};

// The family's registration, written once: op names and the kernels behind them.
template <typename K>
void register_boxes(torch::Library& m) {
  m.impl("encode_boxes", &K::encode_boxes);
  m.impl("decode_boxes", &K::decode_boxes);
  m.impl("decode_boxes_backward", &K::decode_boxes_backward);
  m.impl("box_iou", &K::box_iou);
}

}  // namespace boxes
}  // namespace mlk
