// CPU kernels of roi_align. The map is read channels-last, so a sample's four corners are four
// runs of C contiguous values and every loop over channels is a plain vectorizable loop; the
// per-sample positions and weights (roi_align_math.h) are computed once per bin and shared by
// all the channels a task handles.
//
// Forward: tasks are RoIs (split into channel ranges only when there are few RoIs); each output
// element is computed by one task with the same operations, whatever the split.
// Backward: tasks own (image, channel block) slices of the input gradient, so no two tasks
// write one address and no atomics are needed; each task adds its image's RoIs in index order,
// one term a pixel of a bin (for_each_bin_pixel, as the CUDA kernels: the deterministic one
// gives these bits).
// The box gradient is summed in the same pass, per channel block, and the blocks' partial sums
// are added in block order. Block sizes depend on C only, never on the thread count, so results
// are bitwise identical run to run and at any thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../common/cpu_runner.h"
#include "roi_align_kernels.h"

namespace mlk {
namespace roi_align {
namespace {

// ---- the loops over channels, where the time goes ----
// Compiled twice, for AVX2+FMA CPUs and for any x86-64; the loader picks one per machine
// (target_clones). Both run the same operations in the same order on a given machine.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MLK_CHANNEL_LOOP __attribute__((target_clones("arch=haswell", "default")))
#else
#define MLK_CHANNEL_LOOP
#endif

// acc[c] += the sample's bilinear value of channel c.
template <typename T>
inline void add_sample(T* __restrict__ acc, const T* img, int64_t stride, const Sample<T>& s,
                       int64_t n) {
  const T* __restrict__ r0 = img + s.pixel[0] * stride;
  const T* __restrict__ r1 = img + s.pixel[1] * stride;
  const T* __restrict__ r2 = img + s.pixel[2] * stride;
  const T* __restrict__ r3 = img + s.pixel[3] * stride;
  for (int64_t c = 0; c < n; ++c) acc[c] += corner_sum(s.w, r0[c], r1[c], r2[c], r3[c]);
}

// A bin's input gradient at one pixel over n channels: gs (grad / count) times its two axis
// weights (for_each_bin_pixel), in the order every kernel evaluates it.
template <typename T>
inline void scatter_pixel(T* __restrict__ gi, T wy, T wx, const T* __restrict__ gs, int64_t n) {
  for (int64_t c = 0; c < n; ++c) gi[c] += gs[c] * wy * wx;
}

// The sample's share of the box-gradient moments (roi_align_math.h) in per-channel sums ax..by,
// for the axes along which the sample moves (a clamped coordinate passes nothing, not
// 0 * value, which is NaN for an infinite map value).
template <bool kX, bool kY, typename T>
inline void axis_moments(const T* img, int64_t stride, const Sample<T>& s, const T* __restrict__ gs,
                         T* __restrict__ ax, T* __restrict__ bx, T* __restrict__ ay,
                         T* __restrict__ by, int64_t n) {
  const T* __restrict__ r0 = img + s.pixel[0] * stride;
  const T* __restrict__ r1 = img + s.pixel[1] * stride;
  const T* __restrict__ r2 = img + s.pixel[2] * stride;
  const T* __restrict__ r3 = img + s.pixel[3] * stride;
  const T fx = s.frac_x, fy = s.frac_y;
  for (int64_t c = 0; c < n; ++c) {
    if constexpr (kX) {
      const T tx = gs[c] * corner_sum(s.dx, r0[c], r1[c], r2[c], r3[c]);
      ax[c] += tx;
      bx[c] += fx * tx;
    }
    if constexpr (kY) {
      const T ty = gs[c] * corner_sum(s.dy, r0[c], r1[c], r2[c], r3[c]);
      ay[c] += ty;
      by[c] += fy * ty;
    }
  }
}

template <typename T>
inline void sample_moments(const T* img, int64_t stride, const Sample<T>& s, const T* gs, T* ax,
                           T* bx, T* ay, T* by, int64_t n) {
  if (s.moves_x && s.moves_y) {
    axis_moments<true, true>(img, stride, s, gs, ax, bx, ay, by, n);
  } else if (s.moves_x) {
    axis_moments<true, false>(img, stride, s, gs, ax, bx, ay, by, n);
  } else if (s.moves_y) {
    axis_moments<false, true>(img, stride, s, gs, ax, bx, ay, by, n);
  }
}

MLK_CHANNEL_LOOP void channel_forward(float* acc, const float* img, int64_t stride,
                                      const Sample<float>& s, int64_t n) {
  add_sample(acc, img, stride, s, n);
}
MLK_CHANNEL_LOOP void channel_forward(double* acc, const double* img, int64_t stride,
                                      const Sample<double>& s, int64_t n) {
  add_sample(acc, img, stride, s, n);
}
MLK_CHANNEL_LOOP void channel_scatter(float* gi, float wy, float wx, const float* gs, int64_t n) {
  scatter_pixel(gi, wy, wx, gs, n);
}
MLK_CHANNEL_LOOP void channel_scatter(double* gi, double wy, double wx, const double* gs,
                                      int64_t n) {
  scatter_pixel(gi, wy, wx, gs, n);
}
MLK_CHANNEL_LOOP void channel_moments(const float* img, int64_t stride, const Sample<float>& s,
                                      const float* gs, float* ax, float* bx, float* ay, float* by,
                                      int64_t n) {
  sample_moments(img, stride, s, gs, ax, bx, ay, by, n);
}
MLK_CHANNEL_LOOP void channel_moments(const double* img, int64_t stride, const Sample<double>& s,
                                      const double* gs, double* ax, double* bx, double* ay,
                                      double* by, int64_t n) {
  sample_moments(img, stride, s, gs, ax, bx, ay, by, n);
}

// Hands tasks [0, n) out one at a time to ATen's threads, so a thread slowed down (say by another
// process on its core) takes fewer. body(next) runs once per thread; next() returns the next
// task, or -1 when none is left. Every task owns its outputs, so which thread runs a task
// changes nothing in the results.
template <typename Body>
void parallel_tasks(int64_t n, Body&& body) {
  if (n <= 0) return;
  std::atomic<int64_t> counter{0};
  auto next = [&]() -> int64_t {
    const int64_t task = counter.fetch_add(1);
    return task < n ? task : -1;
  };
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) body(next);
  });
}

// Channels per backward task: about a quarter of C, 8..128, fixed by C. Each block recomputes
// the RoIs' samples, so fewer, longer blocks waste less; four per image still balance two
// threads when one is slowed down.
int64_t backward_channel_block(int64_t channels) {
  const int64_t quarter = (channels + 3) / 4;
  return std::max<int64_t>(8, std::min<int64_t>(128, (quarter + 7) / 8 * 8));
}

template <typename T>
void forward_impl(const at::Tensor& map, const at::Tensor& rois, const Args& a, at::Tensor& out) {
  const Params<T> p = to_params<T>(a, map);
  const int64_t num_rois = rois.size(0), channels = p.channels;
  const int64_t oh = p.pooled_height, ow = p.pooled_width, bins = oh * ow;
  const int64_t hwc = p.height * p.width * channels;
  // Enough tasks for every thread even with few RoIs; ranges of >= 16 channels keep loops long.
  const int64_t want = 4 * at::get_num_threads();
  int64_t splits = num_rois >= want ? 1 : (want + num_rois - 1) / num_rois;
  splits = std::max<int64_t>(1, std::min(splits, (channels + 15) / 16));
  const int64_t range = (channels + splits - 1) / splits;
  const T* map_p = map.data_ptr<T>();
  const T* rois_p = rois.data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  parallel_tasks(num_rois * splits, [&](auto& next) {
    // A task's bins x channels sums, written out channel by channel at the end: the output is
    // [K, C, oh, ow], and storing each bin's channels straight to it would touch a new cache
    // line per value.
    std::vector<T> acc_buf(static_cast<size_t>(bins * range));
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t k = task / splits, c0 = (task % splits) * range;
      const int64_t n = std::min(range, channels - c0);
      if (n <= 0) continue;
      const RoiGeometry<T> g = roi_geometry(rois_p + 5 * k, p);
      const T* img = map_p + g.batch * hwc + c0;
      std::fill(acc_buf.begin(), acc_buf.end(), T(0));
      for (int64_t ph = 0; ph < oh; ++ph) {
        for (int64_t pw = 0; pw < ow; ++pw) {
          T* acc = acc_buf.data() + (ph * ow + pw) * n;
          for_each_sample(g, p, ph, pw,
                          [&](const Sample<T>& s) { channel_forward(acc, img, channels, s, n); });
        }
      }
      T* o = out_p + (k * channels + c0) * bins;
      for (int64_t c = 0; c < n; ++c) {
        for (int64_t bin = 0; bin < bins; ++bin) o[c * bins + bin] = acc_buf[bin * n + c] / g.count;
      }
    }
  });
}

// grad: [K, C, oh, ow] contiguous; map and grad_map: [N, H, W, C] contiguous (grad_map zeroed);
// grad_rois: [K, 5]. Only the gradients in `mask` are computed (the other output is not touched).
template <typename T>
void backward_impl(const at::Tensor& grad, const at::Tensor& map, const at::Tensor& rois,
                   const Args& a, OutputMask mask, at::Tensor& grad_map, at::Tensor& grad_rois) {
  const Params<T> p = to_params<T>(a, map.permute({0, 3, 1, 2}));
  const int64_t num_rois = rois.size(0), batch = map.size(0), channels = p.channels;
  const int64_t oh = p.pooled_height, ow = p.pooled_width, bins = oh * ow;
  const int64_t hwc = p.height * p.width * channels;
  const int64_t block = backward_channel_block(channels);
  const int64_t blocks = (channels + block - 1) / block;
  const T* map_p = map.data_ptr<T>();
  const T* rois_p = rois.data_ptr<T>();
  const T* grad_p = grad.data_ptr<T>();
  T* grad_map_p = mask.input ? grad_map.data_ptr<T>() : nullptr;

  // The RoIs of each image, in index order (a counting sort on the batch index).
  std::vector<int64_t> first(static_cast<size_t>(batch + 1), 0), order(num_rois);
  for (int64_t k = 0; k < num_rois; ++k) ++first[roi_geometry(rois_p + 5 * k, p).batch + 1];
  for (int64_t n = 0; n < batch; ++n) first[n + 1] += first[n];
  {
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    for (int64_t k = 0; k < num_rois; ++k) order[next[roi_geometry(rois_p + 5 * k, p).batch]++] = k;
  }

  // Each (channel block, RoI) slot is written by exactly one task.
  std::vector<Moments<T>> partial(static_cast<size_t>(blocks * num_rois));
  parallel_tasks(batch * blocks, [&](auto& next) {
    std::vector<T> buf(static_cast<size_t>(5 * block));
    T* __restrict__ gs = buf.data();
    T* __restrict__ ax = gs + block;
    T* __restrict__ bx = ax + block;
    T* __restrict__ ay = bx + block;
    T* __restrict__ by = ay + block;
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t n = task / blocks, blk = task % blocks, c0 = blk * block;
      const int64_t m = std::min(block, channels - c0);
      const T* img = map_p + n * hwc + c0;
      T* grad_img = mask.input ? grad_map_p + n * hwc + c0 : nullptr;
      for (int64_t i = first[n]; i < first[n + 1]; ++i) {
        const int64_t k = order[i];
        const RoiGeometry<T> g = roi_geometry(rois_p + 5 * k, p);
        std::fill(ax, ax + 4 * block, T(0));
        for (int64_t ph = 0; ph < oh; ++ph) {
          for (int64_t pw = 0; pw < ow; ++pw) {
            // grad stays [K, C, oh, ow]: a RoI's channel block (C_b x bins values) stays in
            // cache across its bins, so a strided read here beats transposing all of grad.
            const T* gk = grad_p + (k * channels + c0) * bins + ph * ow + pw;
            for (int64_t c = 0; c < m; ++c) gs[c] = gk[c * bins] / g.count;
            if (mask.input) {
              for_each_bin_pixel<GeneralWalk>(g, p, ph, pw, [&](int64_t y, T wy, int64_t x, T wx) {
                channel_scatter(grad_img + (y * p.width + x) * channels, wy, wx, gs, m);
              });
            }
            if (mask.boxes) {
              for_each_sample(g, p, ph, pw, [&](const Sample<T>& s) {
                channel_moments(img, channels, s, gs, ax, bx, ay, by, m);
              });
            }
          }
        }
        Moments<T> mo = {{T(0), T(0), T(0), T(0)}};
        for (int64_t c = 0; c < m; ++c) {
          mo.m[0] += ax[c];
          mo.m[1] += bx[c];
          mo.m[2] += ay[c];
          mo.m[3] += by[c];
        }
        partial[blk * num_rois + k] = mo;
      }
    }
  });
  if (!mask.boxes) return;

  T* grad_rois_p = grad_rois.data_ptr<T>();
  at::parallel_for(0, num_rois, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      Moments<T> mo = {{T(0), T(0), T(0), T(0)}};
      for (int64_t blk = 0; blk < blocks; ++blk) {
        for (int q = 0; q < 4; ++q) mo.m[q] += partial[blk * num_rois + k].m[q];
      }
      box_grad_from_moments(roi_geometry(rois_p + 5 * k, p), mo, grad_rois_p + 5 * k);
    }
  });
}

}  // namespace

// The CPU's kernels (declared in roi_align_kernels.h, where they replace the runner kernels).
at::Tensor roi_align_forward_kernel(const CpuParallelRunner&, const at::Tensor& input,
                                    const at::Tensor& boxes, const Args& a) {
  check_forward(input, boxes, a);
  check_batch_index("roi_align", boxes, input.size(0));
  const auto acc_type = accumulation_type(input.scalar_type());
  auto out =
      allocate_output("roi_align", {boxes.size(0), input.size(1), a.pooled_height, a.pooled_width},
                      input.options().dtype(acc_type));
  if (out.numel() > 0) {
    const auto map =
        contiguous_input("roi_align", "input", input.to(acc_type), at::MemoryFormat::ChannelsLast);
    const auto rois = contiguous_input("roi_align", "boxes", boxes.to(acc_type));
    AT_DISPATCH_FLOATING_TYPES(acc_type, "roi_align",
                               [&] { forward_impl<scalar_t>(map, rois, a, out); });
  }
  return out.to(input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> roi_align_backward_kernel(const CpuParallelRunner&,
                                                             const at::Tensor& grad,
                                                             const at::Tensor& input,
                                                             const at::Tensor& boxes, const Args& a,
                                                             OutputMask mask) {
  check_backward(grad, input, boxes, a);
  check_batch_index("roi_align_backward", boxes, input.size(0));
  const auto acc_options = input.options().dtype(accumulation_type(input.scalar_type()));
  // [N, H, W, C] in memory: the task slices are channel runs of every pixel.
  const char* op = "roi_align_backward";
  auto grad_map =
      mask.input ? allocate_zeros(op, {input.size(0), input.size(2), input.size(3), input.size(1)},
                                  acc_options)
                 : at::empty({0}, acc_options);
  auto grad_rois = mask.boxes ? allocate_zeros(op, {boxes.size(0), 5}, acc_options)
                              : at::empty({0}, acc_options);
  // An empty map (H or W = 0) takes no samples: both gradients are zero, and nothing is sized
  // by the image count (which can be huge for an expanded, empty input).
  if (grad.numel() > 0 && input.numel() > 0 && (mask.input || mask.boxes)) {
    // [N, H, W, C] contiguous: channels-last memory seen through a permutation
    const auto map =
        contiguous_input(op, "input", input.to(acc_options.dtype()), at::MemoryFormat::ChannelsLast)
            .permute({0, 2, 3, 1});
    const auto rois = contiguous_input(op, "boxes", boxes.to(acc_options.dtype()));
    const auto grad_acc = contiguous_input(op, "grad", grad.to(acc_options.dtype()));
    AT_DISPATCH_FLOATING_TYPES(grad_acc.scalar_type(), "roi_align_backward", [&] {
      backward_impl<scalar_t>(grad_acc, map, rois, a, mask, grad_map, grad_rois);
    });
  }
  if (mask.input) grad_map = grad_map.permute({0, 3, 1, 2}).to(input.scalar_type()).contiguous();
  return {grad_map, grad_rois.to(boxes.scalar_type())};
}

}  // namespace roi_align
}  // namespace mlk

TORCH_LIBRARY_IMPL(mlkernels, CPU, m) {
  mlk::roi_align::register_roi_align<mlk::roi_align::Kernels<mlk::CpuParallelRunner>>(m);
}
