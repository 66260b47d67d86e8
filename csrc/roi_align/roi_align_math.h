// Bilinear RoI sampling math shared by the CPU kernels, the CUDA kernels and the grid emulator:
// where a RoI's samples lie, their bilinear corners and weights, the weights' derivatives, and
// how a sample moves when the box moves. Nothing of this is written anywhere else.
//
// Conventions follow torchvision's roi_align so that forward results agree with it:
//  * a RoI row is (batch index, x1, y1, x2, y2); corners are `coord * spatial_scale - offset`,
//    offset 0.5 when aligned; without `aligned` the width and height are clamped to >= 1;
//  * a bin averages grid_h x grid_w samples (sampling_ratio each way, or ceil(size / bins));
//  * a sample outside [-1, H] x [-1, W] contributes 0, others are clamped to the border.
// Operation order follows torchvision's so that float32 results agree with it.
//
// Box gradient: a sample's x is x1*s - offset + frac * roi_w, with frac its fixed position in the
// box (in [0, 1]) and roi_w = (x2 - x1) * s unless clamped. So dx/dx1 = s - free*s*frac and
// dx/dx2 = free*s*frac (free: the width is not clamped). Kernels accumulate two moments per axis,
// A = sum g * df/dx and B = sum g * frac * df/dx, and box_grad_from_moments turns them into the
// four coordinate gradients. With adaptive sampling the grid size is piecewise constant in the
// box size and is held constant (its derivative is zero between jumps).
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/atomics.h"
#include "../common/grid.h"
#include "../common/kernel_check.h"
#include "../common/macros.h"

namespace mlk {
namespace roi_align {

// The op's scalar arguments, and the map's shape.
template <typename T>
struct Params {
  T spatial_scale;
  int64_t pooled_height, pooled_width, sampling_ratio;
  bool aligned;
  int64_t images, channels, height, width;
};

// One RoI's sampling geometry in map pixels.
template <typename T>
struct RoiGeometry {
  int64_t batch;
  T start_x, start_y;
  T bin_w, bin_h;
  int64_t grid_w, grid_h;  // samples per bin each way; <= 0 means none
  T count;                 // the divisor of a bin's sum: max(grid_h * grid_w, 1), as torchvision
  bool free_w, free_h;     // the width / height follow the box (not clamped to 1)
  T scale;
};

template <typename T>
MLK_HOST_DEVICE bool is_nan(T v) {
  return !(v == v);
}

// Adaptive samples per bin, ceil(size / bins), as an integer without undefined conversions:
// 0 for a NaN or non-positive size (no samples, as torchvision's empty loops), capped at 2^62 for
// sizes beyond int64 (boxes ~10^18 pixels; their samples are tested in sample_range's window).
template <typename T>
MLK_HOST_DEVICE int64_t adaptive_grid(T size, int64_t bins) {
  const T grid = std::ceil(size / static_cast<T>(bins));
  if (!(grid > T(0))) return 0;
  const T cap = T(4611686018427387904.0);  // 2^62
  return grid < cap ? static_cast<int64_t>(grid) : static_cast<int64_t>(cap);
}

// The image a RoI samples, from its batch-index column. The one check of that column for the
// CUDA kernels and the emulator, made where every kernel reads it (the CPU kernels check the
// column before they start, with the smallest and largest index in the message; see
// check_batch_index in roi_align.h): it must be an integer in [0, images). A bad index stops a
// CUDA kernel with a device-side assert (no host sync, see kernel_check.h) and throws in the
// emulator; `valid` is false for it, and the index returned is 0, so that nothing reads outside
// the map even where device asserts are compiled out.
template <typename T>
MLK_HOST_DEVICE int64_t checked_batch_index(T index, int64_t images, bool& valid) {
  // Integral and in [0, 2^62) before the conversion (NaN fails both), then compared as int64,
  // exactly for any image count.
  valid = index == std::floor(index) && index >= T(0) && index < T(4611686018427387904.0) &&
          static_cast<int64_t>(index) < images;
  MLK_KERNEL_CHECK(valid,
                   "roi_align: boxes[:, 0] (batch index) must be an integer in [0, N), "
                   "N = input.size(0)",
                   ", got ", index, " (N = ", images, ")");
  return valid ? static_cast<int64_t>(index) : 0;
}

template <typename T, typename S>
MLK_HOST_DEVICE RoiGeometry<T> roi_geometry(const S* roi, const Params<T>& p) {
  RoiGeometry<T> g;
  bool valid_batch;
  g.batch = checked_batch_index(static_cast<T>(roi[0]), p.images, valid_batch);
  const T offset = p.aligned ? T(0.5) : T(0);
  g.scale = p.spatial_scale;
  g.start_x = static_cast<T>(roi[1]) * p.spatial_scale - offset;
  g.start_y = static_cast<T>(roi[2]) * p.spatial_scale - offset;
  const T end_x = static_cast<T>(roi[3]) * p.spatial_scale - offset;
  const T end_y = static_cast<T>(roi[4]) * p.spatial_scale - offset;
  T roi_w = end_x - g.start_x;
  T roi_h = end_y - g.start_y;
  // The rule at a width of exactly 1 is torch.clamp(min=1)'s (and so the reference's): the
  // clamp is active at equality and the width passes no gradient.
  g.free_w = p.aligned || roi_w > T(1);
  g.free_h = p.aligned || roi_h > T(1);
  if (!g.free_w) roi_w = T(1);
  if (!g.free_h) roi_h = T(1);
  g.bin_w = roi_w / static_cast<T>(p.pooled_width);
  g.bin_h = roi_h / static_cast<T>(p.pooled_height);
  g.grid_w = p.sampling_ratio > 0 ? p.sampling_ratio : adaptive_grid(roi_w, p.pooled_width);
  g.grid_h = p.sampling_ratio > 0 ? p.sampling_ratio : adaptive_grid(roi_h, p.pooled_height);
  // In floating point: grid_h * grid_w overflows int64 for boxes ~10^10 times the bins. Below
  // 2^24 (float) it rounds as torchvision's integer product does: not at all.
  const T n = static_cast<T>(g.grid_h) * static_cast<T>(g.grid_w);
  g.count = n > T(1) ? n : T(1);
  // A NaN coordinate makes the RoI's bins NaN (and its box gradient, box_grad_from_moments):
  // its samples have no position, and averaging none of them into 0 would hide the NaN.
  if (is_nan(g.start_x) || is_nan(g.start_y) || is_nan(end_x) || is_nan(end_y)) {
    g.count = static_cast<T>(NAN);
  }
  // A bad batch index (only where device asserts are compiled out): no samples, a NaN result.
  if (!valid_batch) {
    g.grid_w = g.grid_h = 0;
    g.count = static_cast<T>(NAN);
  }
  return g;
}

// One valid sample: its four corners (pixel index y * W + x: low-low, low-high, high-low,
// high-high), their weights, the weights' derivatives w.r.t. the sample's x and y (zero where
// the coordinate is clamped to the border), and its fixed position in the box. I is the pixel
// index type: int32_t on the plain walk (PlainWalk), whose maps have fewer than 2^31 pixels.
template <typename T, typename I = int64_t>
struct Sample {
  I pixel[4];
  T w[4];
  T dx[4];
  T dy[4];
  T frac_x, frac_y;
  bool moves_x, moves_y;  // the coordinate is not clamped: it has a box gradient
};

// Clamps one coordinate as torchvision does; returns the low/high pixel, the fraction past the
// low pixel, and whether the coordinate moves with the sample (not clamped).
template <typename T, typename I>
MLK_HOST_DEVICE void clamp_axis(T v, I size, I& low, I& high, T& frac, bool& moves) {
  moves = true;
  if (v <= T(0)) {
    v = T(0);
    moves = false;
  }
  low = static_cast<I>(v);
  if (low >= size - 1) {
    high = low = size - 1;
    v = static_cast<T>(low);
    moves = false;
  } else {
    high = low + 1;
  }
  frac = v - static_cast<T>(low);
}

// The bilinear sample at (y, x) of an H x W map; false when it contributes nothing.
template <typename T, typename I>
MLK_HOST_DEVICE bool bilinear_sample(T y, T x, I height, I width, Sample<T, I>& s) {
  if (height <= 0 || width <= 0) return false;
  // Written so that NaN coordinates are rejected too (they would index outside the map).
  if (!(y >= T(-1) && y <= static_cast<T>(height) && x >= T(-1) && x <= static_cast<T>(width))) {
    return false;
  }
  I y_low, y_high, x_low, x_high;
  T ly, lx;
  bool y_moves, x_moves;
  clamp_axis(y, height, y_low, y_high, ly, y_moves);
  clamp_axis(x, width, x_low, x_high, lx, x_moves);
  const T hy = T(1) - ly, hx = T(1) - lx;
  s.pixel[0] = y_low * width + x_low;
  s.pixel[1] = y_low * width + x_high;
  s.pixel[2] = y_high * width + x_low;
  s.pixel[3] = y_high * width + x_high;
  s.w[0] = hy * hx;
  s.w[1] = hy * lx;
  s.w[2] = ly * hx;
  s.w[3] = ly * lx;
  s.moves_x = x_moves;
  s.moves_y = y_moves;
  const T mx = x_moves ? T(1) : T(0);
  const T my = y_moves ? T(1) : T(0);
  s.dx[0] = -hy * mx;
  s.dx[1] = hy * mx;
  s.dx[2] = -ly * mx;
  s.dx[3] = ly * mx;
  s.dy[0] = -hx * my;
  s.dy[1] = -lx * my;
  s.dy[2] = hx * my;
  s.dy[3] = lx * my;
  return true;
}

// The samples [lo, hi) of one axis of a bin that can fall in [-1, size], in closed form: sample i
// lies at base + (i + 0.5) * step, step = bin / grid. Adaptive sampling of a box much larger than
// the map gives grids of up to 2^62 samples a side, nearly all off the map; only the window that
// can reach it is visited. The window is widened by the rounding error of a computed position
// (a few ulps of the magnitudes involved: the float (i + 0.5f) of torchvision's formula, then
// four roundings in T), so that no sample that the computed positions put on the map is dropped;
// each sample in it is still tested exactly by bilinear_sample.
template <typename T>
MLK_HOST_DEVICE void sample_range(T base, T bin, int64_t grid, int64_t size, int64_t& lo,
                                  int64_t& hi) {
  lo = 0;
  hi = grid > 0 ? grid : 0;
  const T step = bin / static_cast<T>(grid);
  if (grid <= 4) return;
  // A NaN base, or an infinite or NaN step, puts every sample at NaN or +-infinity: none is valid
  // (the grid of an infinite box is 2^62 samples: looping over it would never end).
  if (is_nan(base) || is_nan(step - step)) {
    hi = lo;
    return;
  }
  if (!(step > T(0))) return;  // a fixed sampling_ratio (bounded) over a negative-width box
  const T magnitude = std::fabs(base) + std::fabs(bin) + static_cast<T>(size) + T(1);
  const T slack = T(4e-7) * magnitude / step + T(2);  // in samples
  const T first = (T(-1) - base) / step - T(0.5) - slack;
  const T last = (static_cast<T>(size) - base) / step - T(0.5) + slack;
  if (first > T(0)) lo = first >= static_cast<T>(grid) ? grid : static_cast<int64_t>(first);
  if (last < static_cast<T>(grid))
    hi = last <= static_cast<T>(lo) ? lo : static_cast<int64_t>(last);
}

// The last index j in [i, hi) whose computed position equals `value` = position(i). Positions
// are non-decreasing in the index (each rounding is monotone), so equal ones form one run; a
// gallop then a bisection find its end in O(log run) evaluations.
template <typename T, typename Position>
MLK_HOST_DEVICE int64_t run_end(int64_t i, int64_t hi, T value, const Position& position) {
  if (i + 1 >= hi || !(position(i + 1) == value)) return i;
  int64_t good = i + 1, jump = 1;
  while (jump < hi - good && position(good + jump) == value) {
    good += jump;
    jump *= 2;
  }
  int64_t bad = jump < hi - good ? good + jump : hi;  // position(bad) != value, or bad == hi
  while (bad - good > 1) {
    const int64_t mid = good + (bad - good) / 2;
    if (position(mid) == value) {
      good = mid;
    } else {
      bad = mid;
    }
  }
  return good;
}

// The position of sample i of a bin along one axis, as torchvision computes it (i + .5f is the
// same float for an int32_t and an int64_t i).
template <typename T, typename I>
struct SamplePosition {
  T base, bin;  // the bin's start and size
  I grid;
  MLK_HOST_DEVICE T operator()(I i) const {
    return base + static_cast<T>(i + .5f) * bin / static_cast<T>(grid);
  }
};

// w[0] * v0 + w[1] * v1 + w[2] * v2 + w[3] * v3 in torchvision's order: a sample's bilinear value
// (w = Sample::w) or its derivative along x or y (w = Sample::dx, Sample::dy). The CPU's channel
// loops and the CUDA threads all call it, so they round alike.
template <typename T, typename V>
MLK_HOST_DEVICE T corner_sum(const T* w, V v0, V v1, V v2, V v3) {
  return w[0] * static_cast<T>(v0) + w[1] * static_cast<T>(v1) + w[2] * static_cast<T>(v2) +
         w[3] * static_cast<T>(v3);
}

// The sample positions of bin row ph (bin column pw) of a RoI of geometry g.
template <typename I, typename T>
MLK_HOST_DEVICE SamplePosition<T, I> row_positions(const RoiGeometry<T>& g, I ph) {
  return {g.start_y + static_cast<T>(ph) * g.bin_h, g.bin_h, static_cast<I>(g.grid_h)};
}
template <typename I, typename T>
MLK_HOST_DEVICE SamplePosition<T, I> column_positions(const RoiGeometry<T>& g, I pw) {
  return {g.start_x + static_cast<T>(pw) * g.bin_w, g.bin_w, static_cast<I>(g.grid_w)};
}

// A row filter of for_each_bin_pixel that keeps every row.
struct EveryRow {
  template <typename T>
  MLK_HOST_DEVICE bool operator()(T) const {
    return true;
  }
};

// Windows above this many samples more than the map's side collapse runs of equal positions.
constexpr int64_t kRunSlack = 8;

// How for_each_sample walks a bin's samples.
// GeneralWalk: any RoI (huge, NaN, infinite), any map; int64_t indices, each axis limited to the
// window of samples that can reach the map (sample_range) and runs of equal positions collapsed.
// PlainWalk: the whole grid, one sample at a time, in int32_t; for RoIs whose grids are at most
// the map's side plus kRunSlack a side (plain_walk_fits), on maps of fewer than 2^31 - kRunSlack
// pixels (the launch's choice, plain_walk_map_fits). It visits the very samples the general walk
// does (those outside sample_range's window fail bilinear_sample's test; no run is collapsed
// below kRunSlack) with the very same floating-point operations, so it gives the same bits; it
// only drops the windows, the runs and the 64-bit indices (registers and instructions on a GPU).
struct GeneralWalk {
  using Index = int64_t;
  static constexpr bool kPlain = false;
};
struct PlainWalk {
  using Index = int32_t;
  static constexpr bool kPlain = true;
};

template <typename T>
MLK_HOST_DEVICE bool plain_walk_fits(const RoiGeometry<T>& g, const Params<T>& p) {
  return g.grid_h <= p.height + kRunSlack && g.grid_w <= p.width + kRunSlack;
}

// The map's condition of PlainWalk: every pixel index and every loop bound fit in int32_t.
template <typename T>
MLK_HOST_DEVICE bool plain_walk_map_fits(const Params<T>& p) {
  return p.height * p.width <= INT32_MAX - kRunSlack;
}

// The samples [lo, hi) of one axis of a bin that Walk visits, and whether it collapses runs of
// equal positions in them (runs): the whole grid for PlainWalk; sample_range's window for
// GeneralWalk, with runs where the window holds more than the map's side + kRunSlack samples.
template <typename Walk, typename T>
MLK_HOST_DEVICE void sample_window(const SamplePosition<T, typename Walk::Index>& pos, int64_t size,
                                   typename Walk::Index& lo, typename Walk::Index& hi, bool& runs) {
  lo = 0;
  hi = pos.grid > 0 ? pos.grid : 0;
  runs = false;
  if constexpr (!Walk::kPlain) {
    sample_range(pos.base, pos.bin, pos.grid, size, lo, hi);
    runs = hi - lo > size + kRunSlack;
  }
}

// Calls fn(sample) for every valid sample of bin (ph, pw), in torchvision's order (iy, then ix);
// Walk as above.
// Where a window holds more samples than the map has pixels (step < 1 pixel, or a huge box whose
// computed positions round to a few values), samples whose computed positions are equal are
// visited once, with their weights and derivatives multiplied by their count and their mean
// position in the box: the work is bounded by the distinct positions, and a run of one (every
// sample of an ordinary box) is computed exactly as torchvision does.
template <typename Walk = GeneralWalk, typename T, typename Fn>
MLK_HOST_DEVICE void for_each_sample(const RoiGeometry<T>& g, const Params<T>& p,
                                     typename Walk::Index ph, typename Walk::Index pw, Fn&& fn) {
  using I = typename Walk::Index;
  const I height = static_cast<I>(p.height), width = static_cast<I>(p.width);
  Sample<T, I> s;
  const T inv_y = T(1) / (static_cast<T>(g.grid_h) * static_cast<T>(p.pooled_height));
  const T inv_x = T(1) / (static_cast<T>(g.grid_w) * static_cast<T>(p.pooled_width));
  const SamplePosition<T, I> pos_y = row_positions<I>(g, ph), pos_x = column_positions<I>(g, pw);
  I iy_lo, iy_hi, ix_lo, ix_hi;
  bool runs_y, runs_x;
  sample_window<Walk>(pos_y, p.height, iy_lo, iy_hi, runs_y);
  sample_window<Walk>(pos_x, p.width, ix_lo, ix_hi, runs_x);
  for (I iy = iy_lo; iy < iy_hi; ++iy) {
    const T y = pos_y(iy);
    const I iy_first = iy;
    if constexpr (!Walk::kPlain) {
      if (runs_y) iy = run_end(iy, iy_hi, y, pos_y);
    }
    // rows outside [-1, H] hold no valid sample: skip them before the loop over columns
    if (!(y >= T(-1) && y <= static_cast<T>(height))) continue;
    // (ph + (iy + 0.5) / grid_h) / pooled_height, with the division hoisted out of the loops
    s.frac_y = (static_cast<T>(ph) * static_cast<T>(g.grid_h) +
                (static_cast<T>(iy_first) + static_cast<T>(iy - iy_first) * T(0.5)) + T(0.5)) *
               inv_y;
    for (I ix = ix_lo; ix < ix_hi; ++ix) {
      const T x = pos_x(ix);
      const I ix_first = ix;
      if constexpr (!Walk::kPlain) {
        if (runs_x) ix = run_end(ix, ix_hi, x, pos_x);
      }
      if (!bilinear_sample(y, x, height, width, s)) continue;
      s.frac_x = (static_cast<T>(pw) * static_cast<T>(g.grid_w) +
                  (static_cast<T>(ix_first) + static_cast<T>(ix - ix_first) * T(0.5)) + T(0.5)) *
                 inv_x;
      if constexpr (!Walk::kPlain) {
        const int64_t count = (iy - iy_first + 1) * (ix - ix_first + 1);
        if (count > 1) {
          const T c = static_cast<T>(count);
          for (int q = 0; q < 4; ++q) {
            s.w[q] *= c;
            s.dx[q] *= c;
            s.dy[q] *= c;
          }
        }
      }
      fn(s);
    }
  }
}

// The pixels of one axis of a bin that its valid samples' corners fall on, each with the sum of
// those corners' weights along the axis (1 - frac for a sample's low corner, frac for its high
// one, clamped as bilinear_sample clamps; times the run's length where Walk collapses a run of
// equal positions, as for_each_sample does): fn(pixel, weight), in the corners' order, once per
// pixel for the samples of an ordinary box (positions in increasing order; a pixel the samples
// come back to, on a box of negative width, is reported again, with the weights since).
// A sample is valid when its position on each axis is in [-1, size]: the valid samples of a bin
// are the product of its valid rows and valid columns, and a sample's corner weight is the
// product of its two axes' (Sample::w), so the bin's samples put gv * Wy(Y) * Wx(X) on pixel
// (Y, X) in all: for_each_bin_pixel. The samples visited are for_each_sample's (Walk as there).
template <typename Walk, typename T, typename Fn>
MLK_HOST_DEVICE void for_each_axis_pixel(const SamplePosition<T, typename Walk::Index>& pos,
                                         typename Walk::Index size, Fn&& fn) {
  using I = typename Walk::Index;
  if (size <= 0) return;
  I lo, hi;
  bool runs;
  sample_window<Walk>(pos, size, lo, hi, runs);
  // The last two pixels seen, -1 before there are any, and their weights: a sample's corners are
  // a pixel and the next, and the next sample's low corner is one of those two or past them.
  // Past the last sample, two non-pixels (-2, -3) push the pending ones out; fn is called from
  // one place, so a GPU kernel holds one copy of what it does.
  I pixel0 = -1, pixel1 = -1;
  T weight0 = T(0), weight1 = T(0);
  for (I i = lo; i <= hi; ++i) {
    I low = -2, high = -3;
    T frac = T(0), count = T(1);
    if (i < hi) {
      const T v = pos(i);
      if constexpr (!Walk::kPlain) {
        const I first = i;
        if (runs) i = run_end(i, hi, v, pos);
        count = static_cast<T>(i - first + 1);
      }
      if (!(v >= T(-1) && v <= static_cast<T>(size))) continue;  // NaN too
      bool moves;
      clamp_axis(v, size, low, high, frac, moves);
    }
    MLK_NO_UNROLL
    for (int corner = 0; corner < 2; ++corner) {
      const I pixel = corner == 0 ? low : high;
      T weight = corner == 0 ? T(1) - frac : frac;
      if constexpr (!Walk::kPlain) weight *= count;  // 1 but in a run: exact
      if (pixel == pixel0) {
        weight0 += weight;
      } else if (pixel == pixel1) {
        weight1 += weight;
      } else {  // a third pixel: the oldest is done
        if (pixel0 >= 0) fn(pixel0, weight0);
        pixel0 = pixel1;
        weight0 = weight1;
        pixel1 = pixel;
        weight1 = weight;
      }
    }
  }
}

// fn(y, wy, x, wx) for each pixel (y, x) of the map that the valid samples of bin (ph, pw) have a
// corner on, with its two axis weights (for_each_axis_pixel), rows y that pass keep_row(y) only;
// the bin's input gradient there is gv * wy * wx, evaluated in that order by every kernel (the
// CPU's, the atomic and the deterministic CUDA ones), so that where they add the same terms in
// the same order they give the same bits. Walk as for_each_sample.
template <typename Walk, typename T, typename Fn, typename RowFilter = EveryRow>
MLK_HOST_DEVICE void for_each_bin_pixel(const RoiGeometry<T>& g, const Params<T>& p,
                                        typename Walk::Index ph, typename Walk::Index pw, Fn&& fn,
                                        RowFilter keep_row = RowFilter()) {
  using I = typename Walk::Index;
  const I height = static_cast<I>(p.height), width = static_cast<I>(p.width);
  const SamplePosition<T, I> pos_x = column_positions<I>(g, pw);
  for_each_axis_pixel<Walk>(row_positions<I>(g, ph), height, [&](I y, T wy) {
    if (!keep_row(y)) return;
    for_each_axis_pixel<Walk>(pos_x, width, [&](I x, T wx) { fn(y, wy, x, wx); });
  });
}

// Moments of one RoI's gradient (see the header comment): a[0..1] = (A_x, B_x), a[2..3] = (A_y,
// B_y).
template <typename T>
struct Moments {
  T m[4];
};

// Adds one sample's share: gdx = sum over channels of g * df/dx, gdy likewise.
template <typename T, typename I>
MLK_HOST_DEVICE void add_moments(Moments<T>& mo, const Sample<T, I>& s, T gdx, T gdy) {
  mo.m[0] += gdx;
  mo.m[1] += s.frac_x * gdx;
  mo.m[2] += gdy;
  mo.m[3] += s.frac_y * gdy;
}

// The gradient w.r.t. (x1, y1, x2, y2) of the box, from its moments.
template <typename T, typename S>
MLK_HOST_DEVICE void box_grad_from_moments(const RoiGeometry<T>& g, const Moments<T>& mo,
                                           S* grad_roi) {
  const T nan = g.count - g.count;  // 0, or NaN for a box with a NaN coordinate
  // A width (height) clamped to 1 passes nothing: 0, not 0 * moment (NaN for a non-finite map).
  const T width_x = g.free_w ? mo.m[1] : T(0);
  const T width_y = g.free_h ? mo.m[3] : T(0);
  grad_roi[0] = S(0);  // the batch index gets no gradient
  grad_roi[1] = static_cast<S>(g.scale * (mo.m[0] - width_x) + nan);
  grad_roi[2] = static_cast<S>(g.scale * (mo.m[2] - width_y) + nan);
  grad_roi[3] = static_cast<S>(g.scale * width_x + nan);
  grad_roi[4] = static_cast<S>(g.scale * width_y + nan);
}

// ---- CUDA thread functions ----

// The (RoI k, channel c, bin ph, pw) of element i of a [K, C, oh, ow] tensor. I is the index type:
// int32_t when every index fits (the kernels' launches choose, see kernels.h), since a GPU divides
// 32-bit integers in a few instructions and 64-bit ones in a software routine of dozens.
template <typename I>
struct BinIndex {
  I k, c, ph, pw;
};

template <typename I, typename T>
MLK_HOST_DEVICE BinIndex<I> bin_index(I i, const Params<T>& p) {
  const I ow = static_cast<I>(p.pooled_width), oh = static_cast<I>(p.pooled_height);
  const I channels = static_cast<I>(p.channels);
  const I bin_row = i / ow, plane = bin_row / oh;
  return {plane / channels, plane % channels, bin_row % oh, i % ow};
}

// The start of the map plane of image `batch`, channel c, in an NCHW tensor.
template <typename T, typename P>
MLK_HOST_DEVICE P* map_plane(P* map, const Params<T>& p, int64_t batch, int64_t c) {
  return map + (batch * p.channels + c) * (p.height * p.width);
}

// The forward's output (k, c, ph, pw) of RoI k of geometry g, NCHW input; Walk as for_each_sample.
template <typename Walk, typename S, typename T>
MLK_HOST_DEVICE S forward_value(const RoiGeometry<T>& g, const S* input, const Params<T>& p,
                                int64_t c, typename Walk::Index ph, typename Walk::Index pw) {
  const S* plane = map_plane(input, p, g.batch, c);
  T acc = T(0);
  for_each_sample<Walk>(g, p, ph, pw, [&](const auto& s) {
    acc += corner_sum(s.w, plane[s.pixel[0]], plane[s.pixel[1]], plane[s.pixel[2]],
                      plane[s.pixel[3]]);
  });
  return static_cast<S>(acc / g.count);
}

// The box-gradient moments (see the header comment) of output (k, c, ph, pw) of RoI k of geometry
// g, whose grad value over the bin's count is gv, into mo, from its samples' corners in the map
// (NCHW). Walk as for_each_sample.
template <typename Walk, typename S, typename T>
MLK_HOST_DEVICE void add_output_moments(const RoiGeometry<T>& g, T gv, const S* input,
                                        const Params<T>& p, int64_t c, typename Walk::Index ph,
                                        typename Walk::Index pw, Moments<T>& mo) {
  const S* plane = map_plane(input, p, g.batch, c);
  for_each_sample<Walk>(g, p, ph, pw, [&](const auto& s) {
    const S v0 = plane[s.pixel[0]], v1 = plane[s.pixel[1]];
    const S v2 = plane[s.pixel[2]], v3 = plane[s.pixel[3]];
    // A clamped coordinate passes nothing, not 0 * value (NaN for an infinite map value).
    add_moments(mo, s, s.moves_x ? gv * corner_sum(s.dx, v0, v1, v2, v3) : T(0),
                s.moves_y ? gv * corner_sum(s.dy, v0, v1, v2, v3) : T(0));
  });
}

// The atomic input gradient of bin (ph, pw) of a RoI of geometry g, whose grad value over the
// bin's count is gv, into the map plane grad_plane: one atomic a pixel its samples' corners fall
// on (for_each_bin_pixel), where torchvision makes one a corner of every sample (16 a bin at 2x2
// samples). At the bench's boxes (bins of 0.3-3.9 pixels) that is about half the atomics, the
// backward's bound on a GPU. Walk as for_each_sample. The emulator counts its axis walks.
template <typename Walk, typename T>
MLK_HOST_DEVICE void add_bin_input_grad(const RoiGeometry<T>& g, const Params<T>& p,
                                        typename Walk::Index ph, typename Walk::Index pw, T gv,
                                        T* grad_plane) {
  const typename Walk::Index width = static_cast<typename Walk::Index>(p.width);
  count_emulated(EmulatorCount::kRowWalks);
  const auto walk_columns = [](auto) {
    count_emulated(EmulatorCount::kColumnWalks);
    return true;
  };
  for_each_bin_pixel<Walk>(
      g, p, ph, pw,
      [&](auto y, T wy, auto x, T wx) { atomic_add(grad_plane + (y * width + x), gv * wy * wx); },
      walk_columns);
}

// The forward and the atomic input gradient run as two launches. The first, one output element
// (k, c, ph, pw) per loop step in int32_t, takes the RoIs that PlainWalk fits (every RoI of
// ordinary boxes) and leaves the others; it runs only where the map and the launch's indices
// fit in int32_t (plain_walk_map_fits, fits_int32 in kernels.h). The second, one block per RoI
// (block index x = k), returns at once for the RoIs the first took and walks the others'
// outputs with GeneralWalk (every RoI where the first did not run: every_roi). Each output is
// computed by exactly one of them, with the same floating-point operations either way.
// for_each_plain_output and for_each_general_output are their loops: fn(g, i, c, ph, pw) for
// output i = (k, c, ph, pw) of a RoI of geometry g (i counted from the RoI's first output in
// the second).
template <typename T, typename S, typename Fn>
MLK_HOST_DEVICE void for_each_plain_output(const ThreadIndex& t, int32_t total, const S* rois,
                                           const Params<T>& p, Fn&& fn) {
  const int32_t stride = static_cast<int32_t>(t.grid_stride_x());
  for (int32_t i = static_cast<int32_t>(t.global_x()); i < total; i += stride) {
    const BinIndex<int32_t> b = bin_index(i, p);
    const RoiGeometry<T> g = roi_geometry(rois + 5 * b.k, p);
    if (plain_walk_fits(g, p)) fn(g, i, b.c, b.ph, b.pw);  // else for_each_general_output's
  }
}

template <typename T, typename S, typename Fn>
MLK_HOST_DEVICE void for_each_general_output(const ThreadIndex& t, bool every_roi, const S* rois,
                                             const Params<T>& p, Fn&& fn) {
  const int64_t k = t.block.x, bins = p.pooled_height * p.pooled_width;
  const RoiGeometry<T> g = roi_geometry(rois + 5 * k, p);
  if (!every_roi && plain_walk_fits(g, p)) return;  // for_each_plain_output's
  for (int64_t e = t.thread_rank(); e < p.channels * bins; e += t.block_dim.count()) {
    const int64_t bin = e % bins;
    fn(g, e, e / bins, bin / p.pooled_width, bin % p.pooled_width);
  }
}

template <typename S, typename T>
MLK_HOST_DEVICE void forward_plain_thread(const ThreadIndex& t, int32_t total, const S* input,
                                          const S* rois, Params<T> p, S* out) {
  for_each_plain_output(t, total, rois, p, [&](const RoiGeometry<T>& g, int32_t i, int32_t c,
                                               int32_t ph, int32_t pw) {
    out[i] = forward_value<PlainWalk>(g, input, p, c, ph, pw);
  });
}

template <typename S, typename T>
MLK_HOST_DEVICE void forward_general_roi_thread(const ThreadIndex& t, bool every_roi,
                                                const S* input, const S* rois, Params<T> p,
                                                S* out) {
  S* roi_out = out + t.block.x * p.channels * p.pooled_height * p.pooled_width;
  for_each_general_output(t, every_roi, rois, p, [&](const RoiGeometry<T>& g, int64_t e,
                                                     int64_t c, int64_t ph, int64_t pw) {
    roi_out[e] = forward_value<GeneralWalk>(g, input, p, c, ph, pw);
  });
}

// The atomic input gradient, the same two launches.
template <typename S, typename T>
MLK_HOST_DEVICE void backward_input_plain_thread(const ThreadIndex& t, int32_t total,
                                                 const S* grad, const S* rois, Params<T> p,
                                                 T* grad_input) {
  for_each_plain_output(t, total, rois, p, [&](const RoiGeometry<T>& g, int32_t i, int32_t c,
                                               int32_t ph, int32_t pw) {
    add_bin_input_grad<PlainWalk>(g, p, ph, pw, static_cast<T>(grad[i]) / g.count,
                                  map_plane(grad_input, p, g.batch, c));
  });
}

template <typename S, typename T>
MLK_HOST_DEVICE void backward_input_general_roi_thread(const ThreadIndex& t, bool every_roi,
                                                       const S* grad, const S* rois, Params<T> p,
                                                       T* grad_input) {
  const S* roi_grad = grad + t.block.x * p.channels * p.pooled_height * p.pooled_width;
  for_each_general_output(t, every_roi, rois, p, [&](const RoiGeometry<T>& g, int64_t e,
                                                     int64_t c, int64_t ph, int64_t pw) {
    add_bin_input_grad<GeneralWalk>(g, p, ph, pw, static_cast<T>(roi_grad[e]) / g.count,
                                    map_plane(grad_input, p, g.batch, c));
  });
}

// Input gradient, deterministic form: one row (image n, map row r, channel c) of grad_input per
// loop step, owned by one thread, which adds the terms in row r of every bin of image n's RoIs,
// RoIs by index, then bins in order. No atomics; each pixel gets its terms in the order of the
// CPU kernel (RoIs of an image by index, bins, the bin's pixels), so without fused multiply-adds
// (the emulator, the CPU) the sums are the CPU's to the bit.
// Channels are the fastest index: the 32 threads of a warp hold 32 channels of one row (where
// C is a multiple of 32), so they take the same RoIs, bin rows and pixels in lockstep, each with
// its own channel's grad values. (With rows the fastest index, a warp's threads held 32 rows,
// each of which needed other bin rows, and the warp ran all of them for every thread.)
// A bin row is skipped at once when it lies two rows or more from r; otherwise its y axis is
// walked once for the bin row (for_each_axis_pixel, for_each_bin_pixel's y walk, which is the
// same for each bin of the row) to find its weight on row r, and only a bin row with a corner
// on r walks its bins' columns, with for_each_bin_pixel's terms gv * wy * wx in its order. The y
// walk reports r once on an ordinary box; on a box of negative height (aligned) it may report it
// again, and each report takes a column walk of its own, its weight found by walking y again.
// Two launches, as the other kernels (a kernel gets the registers of its heaviest path):
// Walk = PlainWalk does every row of every image whose RoIs the plain walk fits; at the first RoI
// it does not fit, it marks the image in general_images and leaves the row (it will be redone).
// Walk = GeneralWalk then redoes, from zero, the rows of the marked images (of every image when
// general_images is null: a map the plain walk cannot index) with the general walk, which gives
// the plain walk's bits on the RoIs both fit: each row is the CPU's either way.
template <typename Walk, typename S, typename T>
MLK_HOST_DEVICE void backward_input_row_thread(const ThreadIndex& t, int64_t rows, int64_t num_rois,
                                               const S* grad, const S* rois, Params<T> p,
                                               T* grad_input, int32_t* general_images) {
  using I = typename Walk::Index;
  const int64_t ow = p.pooled_width, oh = p.pooled_height;
  const I width = static_cast<I>(p.width), height = static_cast<I>(p.height);
  for (int64_t row_index = t.global_x(); row_index < rows; row_index += t.grid_stride_x()) {
    const int64_t c = row_index % p.channels, image_row = row_index / p.channels;
    const I r = static_cast<I>(image_row % p.height);
    const int64_t n = image_row / p.height;
    T* row_r = grad_input + ((n * p.channels + c) * p.height + r) * p.width;
    if constexpr (!Walk::kPlain) {
      if (general_images != nullptr) {  // after the plain launch: its marked images only
        if (general_images[n] == 0) continue;
        for (I x = 0; x < width; ++x) row_r[x] = T(0);  // its partial row
      }
    }
    for (int64_t k = 0; k < num_rois; ++k) {
      // The batch index first: of the K RoIs, only image n's need their geometry (1/N of them).
      bool valid_batch;
      if (checked_batch_index(static_cast<T>(rois[5 * k]), p.images, valid_batch) != n ||
          !valid_batch) {
        continue;
      }
      const RoiGeometry<T> g = roi_geometry(rois + 5 * k, p);
      if constexpr (Walk::kPlain) {
        if (!plain_walk_fits(g, p)) {
          general_images[n] = 1;  // every row of image n is redone by the general launch
          break;
        }
      }
      const S* gk = grad + (k * p.channels + c) * oh * ow;
      for (int64_t ph = 0; ph < oh; ++ph) {
        // The bin row's samples lie in [base, base + bin_h] (up to rounding, which the slack
        // covers as sample_range's does) and touch the rows of their floor and the one after:
        // a bin row two rows or more away from r has nothing for it. NaN bounds skip nothing.
        const SamplePosition<T, I> pos_y = row_positions<I>(g, static_cast<I>(ph));
        const T base = pos_y.base, end = base + pos_y.bin;
        const T slack = T(2) + T(4e-7) * (std::fabs(base) + std::fabs(pos_y.bin));
        const T row = static_cast<T>(r);
        if (row + slack < (base < end ? base : end) || row - slack > (base < end ? end : base)) {
          continue;
        }
        int reports = 0;
        T wy_r = T(0);
        count_emulated(EmulatorCount::kRowWalks);
        for_each_axis_pixel<Walk>(pos_y, height, [&](I y, T wy) {
          if (y != r) return;
          ++reports;
          wy_r = wy;
        });
        for (int64_t pw = 0; pw < ow && reports > 0; ++pw) {
          const T gv = static_cast<T>(gk[ph * ow + pw]) / g.count;
          const SamplePosition<T, I> pos_x = column_positions<I>(g, static_cast<I>(pw));
          for (int report = 0; report < reports; ++report) {
            T wy = wy_r;  // the one report of an ordinary box
            if (reports > 1) {  // report number `report` of row r, walked again
              int seen = 0;
              count_emulated(EmulatorCount::kRowWalks);
              for_each_axis_pixel<Walk>(pos_y, height, [&](I y, T w) {
                if (y == r && seen++ == report) wy = w;
              });
            }
            count_emulated(EmulatorCount::kColumnWalks);
            for_each_axis_pixel<Walk>(pos_x, width, [&](I x, T wx) { row_r[x] += gv * wy * wx; });
          }
        }
      }
    }
  }
}

// Both gradients of the plain RoIs in one pass, or their box gradient alone (kInput false): a
// cooperative kernel over chunks of a RoI's outputs, one output a thread. Block b is chunk
// b % chunks of RoI b / chunks; its thread r takes output e = chunk * threads + r. Phase 1: the
// thread's moments into shared[4 * rank ...] (zeros for a RoI PlainWalk does not fit:
// BoxGradBlock walks it), then block_sum_phase's tree and plain_chunk_write_phase, which leaves
// the chunk's moments in partial[4 * b ...] for BoxGradBlock to add up. One output a thread, not
// a loop over several: a loop keeps the RoI's geometry live across its steps, 72 registers on
// sm_90 against 58 (37% occupancy against 50%). Indices fit in int32_t, as for
// forward_plain_thread (the launch checks).
template <bool kInput, typename S, typename T>
MLK_HOST_DEVICE void plain_chunk_phase(const ThreadIndex& t, int32_t chunks, const S* grad,
                                       const S* input, const S* rois, Params<T> p,
                                       T* grad_input, T* shared) {
  const int32_t b = static_cast<int32_t>(t.block.x), k = b / chunks, chunk = b % chunks;
  const int32_t rank = static_cast<int32_t>(t.thread_rank());
  const int32_t threads = static_cast<int32_t>(t.block_dim.count());
  const RoiGeometry<T> g = roi_geometry(rois + 5 * k, p);
  Moments<T> mo = {{T(0), T(0), T(0), T(0)}};
  if (plain_walk_fits(g, p)) {
    const int32_t ow = static_cast<int32_t>(p.pooled_width);
    const int32_t bins = static_cast<int32_t>(p.pooled_height) * ow;
    const int32_t outputs = static_cast<int32_t>(p.channels) * bins;
    const int32_t e = chunk * threads + rank;
    if (e < outputs) {
      const int32_t bin = e % bins;
      const T gv = static_cast<T>(grad[k * outputs + e]) / g.count;
      const int32_t c = e / bins, ph = bin / ow, pw = bin % ow;
      add_output_moments<PlainWalk>(g, gv, input, p, c, ph, pw, mo);
      if constexpr (kInput) {
        add_bin_input_grad<PlainWalk>(g, p, ph, pw, gv, map_plane(grad_input, p, g.batch, c));
      }
    }
  }
  for (int q = 0; q < 4; ++q) shared[4 * rank + q] = mo.m[q];
}

// The last phase of a chunk: thread 0 stores the block's moments.
template <typename T>
MLK_HOST_DEVICE void plain_chunk_write_phase(const ThreadIndex& t, const T* shared, T* partial) {
  if (t.thread_rank() != 0) return;
  for (int q = 0; q < 4; ++q) partial[4 * t.block.x + q] = shared[q];
}

// Box gradient, a cooperative kernel with one block per RoI (block index x = RoI).
// Phase 1: each thread's moments into shared[4 * rank ...]. For a RoI whose plain chunks ran
// (partial non-null, `chunks` of them a RoI), a strided share of those chunks' moments; for the
// others (every RoI where partial is null), a strided share of the RoI's (channel, bin)
// outputs, walked by the general walk.
template <typename S, typename T>
MLK_HOST_DEVICE void box_grad_partial_phase(const ThreadIndex& t, const S* grad, const S* input,
                                            const S* rois, Params<T> p, const T* partial,
                                            int64_t chunks, T* shared) {
  const int64_t k = t.block.x, rank = t.thread_rank(), threads = t.block_dim.count();
  const int64_t bins = p.pooled_height * p.pooled_width;
  const RoiGeometry<T> g = roi_geometry(rois + 5 * k, p);
  Moments<T> mo = {{T(0), T(0), T(0), T(0)}};
  if (partial != nullptr && plain_walk_fits(g, p)) {
    for (int64_t j = rank; j < chunks; j += threads) {
      for (int q = 0; q < 4; ++q) mo.m[q] += partial[4 * (k * chunks + j) + q];
    }
  } else {
    for (int64_t e = rank; e < p.channels * bins; e += threads) {
      const int64_t c = e / bins, bin = e % bins, ph = bin / p.pooled_width;
      const int64_t pw = bin % p.pooled_width;
      const T gv = static_cast<T>(grad[k * p.channels * bins + e]) / g.count;
      add_output_moments<GeneralWalk>(g, gv, input, p, c, ph, pw, mo);
    }
  }
  for (int q = 0; q < 4; ++q) shared[4 * rank + q] = mo.m[q];
}

// Phase 2..: a tree sum over the block, one halving per phase (threads is a power of two).
template <typename T>
MLK_HOST_DEVICE void block_sum_phase(const ThreadIndex& t, int64_t stride, T* shared) {
  const int64_t rank = t.thread_rank();
  if (rank < stride) {
    for (int q = 0; q < 4; ++q) shared[4 * rank + q] += shared[4 * (rank + stride) + q];
  }
}

// Last phase: thread 0 turns the block's moments into the RoI's gradient row (type T).
template <typename S, typename T>
MLK_HOST_DEVICE void box_grad_write_phase(const ThreadIndex& t, const S* rois, Params<T> p,
                                          const T* shared, T* grad_rois) {
  if (t.thread_rank() != 0) return;
  const int64_t k = t.block.x;
  const Moments<T> mo = {{shared[0], shared[1], shared[2], shared[3]}};
  box_grad_from_moments(roi_geometry(rois + 5 * k, p), mo, grad_rois + 5 * k);
}

}  // namespace roi_align
}  // namespace mlk
