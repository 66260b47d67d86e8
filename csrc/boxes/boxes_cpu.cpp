// CPU kernels of the box ops: rows split across threads with at::parallel_for; the per-box math
// is the host+device code of boxes_math.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "boxes.h"

namespace mlk {
namespace boxes {
namespace {

// Rows per task: a row is a few dozen flops, so small inputs stay on one thread.
constexpr int64_t kGrain = 2048;

at::Tensor encode_boxes_cpu(const at::Tensor& boxes, const at::Tensor& anchors,
                            at::ArrayRef<double> weights) {
  check_weights("encode_boxes", weights);
  auto in = pair_boxes("encode_boxes", "boxes", boxes, "anchors", anchors);
  auto out = at::empty(in.shape, in.first.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "encode_boxes", [&] {
    const auto wt = to_weights<scalar_t>(weights);
    const scalar_t* b = in.first.data_ptr<scalar_t>();
    const scalar_t* a = in.second.data_ptr<scalar_t>();
    scalar_t* d = out.data_ptr<scalar_t>();
    at::parallel_for(0, in.rows, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) encode_box(b + 4 * i, a + 4 * i, wt, d + 4 * i);
    });
  });
  return out;
}

at::Tensor decode_boxes_cpu(const at::Tensor& deltas, const at::Tensor& anchors,
                            at::ArrayRef<double> weights, double clamp) {
  check_weights("decode_boxes", weights);
  check_clamp("decode_boxes", clamp);
  auto in = pair_boxes("decode_boxes", "deltas", deltas, "anchors", anchors);
  auto out = at::empty(in.shape, in.first.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "decode_boxes", [&] {
    const auto wt = to_weights<scalar_t>(weights);
    const auto clip = static_cast<scalar_t>(clamp);
    const scalar_t* d = in.first.data_ptr<scalar_t>();
    const scalar_t* a = in.second.data_ptr<scalar_t>();
    scalar_t* b = out.data_ptr<scalar_t>();
    at::parallel_for(0, in.rows, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) decode_box(d + 4 * i, a + 4 * i, wt, clip, b + 4 * i);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> decode_boxes_backward_cpu(const at::Tensor& grad,
                                                             const at::Tensor& deltas,
                                                             const at::Tensor& anchors,
                                                             at::ArrayRef<double> weights,
                                                             double clamp) {
  auto prepared = prepare_decode_backward(grad, deltas, anchors, weights, clamp);
  const PairedBoxes& in = prepared.first;
  const at::Tensor& g = prepared.second;
  auto grad_deltas = at::empty(in.shape, in.first.options());
  auto grad_anchors = at::empty(in.shape, in.first.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "decode_boxes_backward", [&] {
    const auto wt = to_weights<scalar_t>(weights);
    const auto clip = static_cast<scalar_t>(clamp);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* d = in.first.data_ptr<scalar_t>();
    const scalar_t* a = in.second.data_ptr<scalar_t>();
    scalar_t* gd = grad_deltas.data_ptr<scalar_t>();
    scalar_t* ga = grad_anchors.data_ptr<scalar_t>();
    at::parallel_for(0, in.rows, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        decode_box_backward(gp + 4 * i, d + 4 * i, a + 4 * i, wt, clip, gd + 4 * i, ga + 4 * i);
      }
    });
  });
  return {grad_deltas, grad_anchors};
}

at::Tensor box_iou_cpu(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  auto [a, b] = prepare_iou(boxes1, boxes2);
  const int64_t n = a.size(0), m = b.size(0);
  auto out = at::empty({n, m}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "box_iou", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    // The second set as structure-of-arrays with its areas, once: the inner loop then reads
    // five contiguous arrays and the compiler vectorizes it.
    std::vector<scalar_t> soa(static_cast<size_t>(5 * m));
    scalar_t *x1 = soa.data(), *y1 = x1 + m, *x2 = y1 + m, *y2 = x2 + m, *area = y2 + m;
    for (int64_t j = 0; j < m; ++j) {
      x1[j] = pb[4 * j];
      y1[j] = pb[4 * j + 1];
      x2[j] = pb[4 * j + 2];
      y2[j] = pb[4 * j + 3];
      area[j] = box_area(pb + 4 * j);
    }
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(m, 1));
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* a_i = pa + 4 * i;
        const scalar_t ax1 = a_i[0], ay1 = a_i[1], ax2 = a_i[2], ay2 = a_i[3];
        const scalar_t area_a = box_area(a_i);
        scalar_t* row = po + i * m;
        for (int64_t j = 0; j < m; ++j) {
          row[j] = box_iou(ax1, ay1, ax2, ay2, area_a, x1[j], y1[j], x2[j], y2[j], area[j]);
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace boxes
}  // namespace mlk

TORCH_LIBRARY_IMPL(mlkernels, CPU, m) {
  m.impl("encode_boxes", &mlk::boxes::encode_boxes_cpu);
  m.impl("decode_boxes", &mlk::boxes::decode_boxes_cpu);
  m.impl("decode_boxes_backward", &mlk::boxes::decode_boxes_backward_cpu);
  m.impl("box_iou", &mlk::boxes::box_iou_cpu);
}
