// CPU kernels of the box ops: box coding is the runner kernels of boxes_kernels.h on
// CpuParallelRunner; box_iou is CPU-tuned (structure-of-arrays, vectorized), over the same
// host+device math of boxes_math.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/cpu_runner.h"
#include "boxes_kernels.h"

namespace mlk {
namespace boxes {

// IoUs per parallel task: a pair is a few flops, so small inputs stay on one thread.
constexpr int64_t kGrain = 2048;

// The CPU's box_iou (declared in boxes_kernels.h, where it replaces the runner kernel).
at::Tensor box_iou_kernel(const CpuParallelRunner&, const at::Tensor& a, const at::Tensor& b) {
  const int64_t n = a.size(0), m = b.size(0);
  auto out = allocate_output("box_iou", {n, m}, a.options());
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

}  // namespace boxes
}  // namespace mlk

TORCH_LIBRARY_IMPL(mlkernels, CPU, m) {
  mlk::boxes::register_boxes<mlk::boxes::Kernels<mlk::CpuParallelRunner>>(m);
}
