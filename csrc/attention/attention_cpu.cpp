// The CPU's attention kernels, flash-style: the work is cut into tiles (a few heads of one image,
// or a block of one head's query rows), spread over ATen's threads. A tile's scores against all
// keys come from one batched BLAS product into a buffer of its thread (at most kBlockBytes, so it
// stays in the core's cache); each row then becomes probabilities in place in two fused,
// vectorized passes (attention_cpu_rows.h), and a second batched product multiplies them with
// the values. Only the log-sum-exp of every query row is kept; the backward recomputes the
// probabilities tile by tile and holds at most two tiles per thread, so the extra memory is
// O(B*H*Lq), not O(B*H*Lq*Lk).
//
// Results are the same run to run at a given thread count: at::parallel_for splits the tiles
// statically by thread number, and sums that cross tiles (a broadcast bias's gradient, a key's
// gradient over split query rows) go through per-thread or per-part buffers added in order.
// The CUDA kernels (attention_kernels.h) compute the same values in their own order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/cpu_runner.h"
#include "attention_cpu_rows.h"
#include "attention_kernels.h"

namespace mlk {
namespace attention {
namespace {

// The scores of a tile, and in the backward their gradients: within the L2 cache of a core, and
// rows enough that each BLAS call amortizes its overhead.
constexpr int64_t kBlockBytes = int64_t(512) << 10;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One attention problem in the accumulation type T: inputs [B, H, L, E] (views of the caller's
// tensors when already in T; BLAS takes their strides), the bias as a pointer with stride 0 along
// the dimensions it is broadcast over, and the tiling: `heads_per_tile` heads of `block_rows`
// query rows each.
template <typename T>
struct Problem {
  at::Tensor q, k, v, bias;
  const T* bias_data = nullptr;
  int64_t bias_stride[4] = {0, 0, 0, 0};
  int64_t batch, heads, lq, lk;
  T scale;
  bool causal;
  int64_t block_rows = 1, heads_per_tile = 1;

  Problem(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
          const MaybeTensor& bias_in, double scale_in, bool is_causal)
      : batch(query.size(0)),
        heads(query.size(1)),
        lq(query.size(2)),
        lk(key.size(2)),
        scale(static_cast<T>(scale_in)),
        causal(is_causal) {
    const auto acc = c10::CppTypeToScalarType<T>::value;
    // Detached: the tiles run on ATen's worker threads, whose grad mode is not the caller's.
    q = query.detach().to(acc);
    k = key.detach().to(acc);
    v = value.detach().to(acc);
    if (has_bias(bias_in)) {
      bias = bias_in->detach().to(acc);
      bias_data = bias.data_ptr<T>();
      for (int64_t d = 0; d < 4; ++d) bias_stride[d] = bias.size(d) == 1 ? 0 : bias.stride(d);
    }
    if (lq == 0 || lk == 0 || batch * heads == 0) return;
    const int64_t row_bytes = lk * static_cast<int64_t>(sizeof(T));
    const int64_t max_rows = std::max<int64_t>(1, kBlockBytes / row_bytes);
    // Enough tiles to keep every thread busy (4 per thread evens out their lengths).
    const int64_t wanted_tiles = 4 * at::get_num_threads();
    int64_t row_blocks = ceil_div(lq, max_rows);
    if (row_blocks == 1) {
      const int64_t fit = std::max<int64_t>(1, kBlockBytes / (lq * row_bytes));
      const int64_t spread = std::max<int64_t>(1, batch * heads / wanted_tiles);
      heads_per_tile = ceil_div(heads, ceil_div(heads, std::min({fit, spread, heads})));
    }
    if (heads_per_tile == 1 && batch * heads * row_blocks < wanted_tiles) {
      row_blocks = std::min(lq, std::max(row_blocks, ceil_div(wanted_tiles, batch * heads)));
    }
    block_rows = ceil_div(lq, row_blocks);  // equal blocks: 80 rows of at most 64 are 40 + 40
  }

  int64_t blocks_per_head() const { return lq == 0 ? 0 : ceil_div(lq, block_rows); }
  int64_t tiles_per_image() const { return ceil_div(heads, heads_per_tile); }

  // Rows [i0, i0 + rows) of heads [h0, h0 + hc) of image b of a [B, H, L, X] tensor.
  static at::Tensor tile(const at::Tensor& t, int64_t b, int64_t h0, int64_t hc, int64_t i0,
                         int64_t rows) {
    return t.select(0, b).narrow(0, h0, hc).narrow(1, i0, rows);
  }
  static at::Tensor heads_of(const at::Tensor& t, int64_t b, int64_t h0, int64_t hc) {
    return t.select(0, b).narrow(0, h0, hc);
  }

  // The probabilities of a tile into s ([hc, rows, Lk], contiguous): q k^T by BLAS, then per row
  // rows::softmax_row. row_max and row_sum ([hc * rows]), when given, receive the row statistics.
  void probabilities(int64_t b, int64_t h0, int64_t i0, at::Tensor& s, T* row_max = nullptr,
                     T* row_sum = nullptr) const {
    const int64_t hc = s.size(0), rows = s.size(1);
    at::bmm_out(s, tile(q, b, h0, hc, i0, rows), heads_of(k, b, h0, hc).transpose(1, 2));
    T* data = s.data_ptr<T>();
    for (int64_t hh = 0; hh < hc; ++hh) {
      const T* bias_head = bias_data != nullptr
                               ? bias_data + b * bias_stride[0] + (h0 + hh) * bias_stride[1]
                               : nullptr;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r, n = hh * rows + r;
        T m, l;
        rows::softmax_row(data + n * lk, lk, causal ? std::min(lk, i + 1) : lk, scale,
                          bias_head != nullptr ? bias_head + i * bias_stride[2] : nullptr,
                          bias_stride[3], &m, &l);
        if (row_max != nullptr) row_max[n] = m;
        if (row_sum != nullptr) row_sum[n] = l;
      }
    }
  }
};

// A buffer of T for one thread's tiles.
template <typename T>
at::Tensor tile_buffer(const char* op, int64_t hc, int64_t rows, int64_t cols) {
  return allocate_output(op, {hc, rows, cols},
                         at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename T>
void forward(const Problem<T>& p, at::Tensor& out, at::Tensor& lse) {
  const int64_t per_head = p.blocks_per_head(), per_image = p.tiles_per_image() * per_head;
  at::parallel_for(0, p.batch * per_image, 1, [&](int64_t begin, int64_t end) {
    const at::NoGradGuard no_grad;  // worker threads do not inherit the caller's grad mode
    at::Tensor buffer = tile_buffer<T>(kOp, p.heads_per_tile, p.block_rows, p.lk);
    std::vector<T> row_max(p.heads_per_tile * p.block_rows), row_sum(row_max.size());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / per_image, h0 = (task % per_image) / per_head * p.heads_per_tile;
      const int64_t i0 = task % per_head * p.block_rows;
      const int64_t hc = std::min(p.heads_per_tile, p.heads - h0);
      const int64_t rows = std::min(p.block_rows, p.lq - i0);
      at::Tensor s = buffer.narrow(0, 0, hc).narrow(1, 0, rows);
      if (rows != p.block_rows) s = s.contiguous();  // the last, shorter block
      p.probabilities(b, h0, i0, s, row_max.data(), row_sum.data());
      at::Tensor out_tile = Problem<T>::tile(out, b, h0, hc, i0, rows);
      at::bmm_out(out_tile, s, Problem<T>::heads_of(p.v, b, h0, hc));
      for (int64_t hh = 0; hh < hc; ++hh) {
        T* lse_rows = lse.data_ptr<T>() + ((b * p.heads + h0 + hh) * p.lq + i0);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = hh * rows + r;
          // row_sum is 0 only in a fully masked row (an attended key's exp(s - max) is 1).
          lse_rows[r] = row_sum[n] == T(0) ? -std::numeric_limits<T>::infinity()
                                           : row_max[n] + std::log(row_sum[n]);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward_kernel(const CpuParallelRunner&, const at::Tensor& query,
                                                  const at::Tensor& key, const at::Tensor& value,
                                                  const MaybeTensor& bias, double scale,
                                                  bool is_causal) {
  check_inputs(kOp, query, key, value, bias, scale);
  const auto acc_options = query.options().dtype(accumulation_type(query.scalar_type()));
  auto out = allocate_output(kOp, {query.size(0), query.size(1), query.size(2), value.size(3)},
                             acc_options);
  auto lse = allocate_output(kOp, {query.size(0), query.size(1), query.size(2)}, acc_options);
  if (key.size(2) == 0) {  // no keys: every row fully masked
    return {out.zero_().to(query.scalar_type()),
            lse.fill_(-std::numeric_limits<double>::infinity())};
  }
  AT_DISPATCH_FLOATING_TYPES(acc_options.dtype().toScalarType(), "attention_cpu", [&] {
    forward(Problem<scalar_t>(query, key, value, bias, scale, is_causal), out, lse);
  });
  return {out.to(query.scalar_type()), lse};
}

namespace {

template <typename T>
void backward(const Problem<T>& p, const at::Tensor& grad, const at::Tensor& out,
              std::array<at::Tensor, 4>& grads, const std::array<bool, 4>& mask) {
  const char* op = kBackwardOp;
  at::Tensor &dq = grads[0], &dk = grads[1], &dv = grads[2], &dbias = grads[3];
  const int64_t head_count = p.batch * p.heads;
  if (head_count == 0 || p.lq == 0) return;
  const auto options = dq.options().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor g = grad.detach().to(options.dtype()).contiguous();
  const at::Tensor o = out.detach().to(options.dtype()).contiguous();
  const int64_t ev = p.v.size(3);
  // A head's key and value gradients add up over all its query rows: a tile takes whole heads
  // when the heads keep every thread busy; else each head's row blocks are split in `parts`,
  // whose key and value gradients go to buffers of their own, added in order at the end.
  const int64_t blocks = p.blocks_per_head();
  const int64_t parts = p.heads_per_tile == 1 && head_count < 2 * at::get_num_threads()
                            ? std::min(blocks, ceil_div(2 * at::get_num_threads(), head_count))
                            : 1;
  const int64_t blocks_per_part = ceil_div(blocks, parts);
  const bool split = parts > 1;
  // n zeroed copies of t, if asked.
  const auto copies = [&](bool asked, const at::Tensor& t, int64_t n) {
    if (!asked) return at::Tensor();
    std::vector<int64_t> sizes{n};
    sizes.insert(sizes.end(), t.sizes().begin(), t.sizes().end());
    return allocate_zeros(op, sizes, options);
  };
  const at::Tensor dk_parts = copies(mask[1] && split, dk, parts);
  const at::Tensor dv_parts = copies(mask[2] && split, dv, parts);
  // Tiles that share a slice of a broadcast bias would race on its gradient: each thread then
  // adds into its own copy, and the copies are summed in thread order.
  const bool shared_bias =
      mask[3] && ((dbias.size(0) == 1 && p.batch > 1) ||
                  (dbias.size(1) == 1 && p.tiles_per_image() > 1) || (dbias.size(2) == 1 && split));
  const at::Tensor per_thread = copies(shared_bias, dbias, at::get_num_threads());
  const bool need_ds = mask[0] || mask[1] || mask[3];
  const int64_t per_image = p.tiles_per_image() * parts;

  at::parallel_for(0, p.batch * per_image, 1, [&](int64_t begin, int64_t end) {
    const at::NoGradGuard no_grad;
    at::Tensor p_buffer = tile_buffer<T>(op, p.heads_per_tile, p.block_rows, p.lk);
    at::Tensor ds_buffer =
        need_ds ? tile_buffer<T>(op, p.heads_per_tile, p.block_rows, p.lk) : at::Tensor();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / per_image, part = task % parts;
      const int64_t h0 = (task % per_image) / parts * p.heads_per_tile;
      const int64_t hc = std::min(p.heads_per_tile, p.heads - h0);
      const int64_t first = part * blocks_per_part * p.block_rows;
      const int64_t last = std::min(p.lq, first + blocks_per_part * p.block_rows);
      const at::Tensor k3 = Problem<T>::heads_of(p.k, b, h0, hc);
      const at::Tensor v3 = Problem<T>::heads_of(p.v, b, h0, hc);
      at::Tensor dk3 =
          mask[1] ? Problem<T>::heads_of(split ? dk_parts[part] : dk, b, h0, hc) : at::Tensor();
      at::Tensor dv3 =
          mask[2] ? Problem<T>::heads_of(split ? dv_parts[part] : dv, b, h0, hc) : at::Tensor();
      // Where this tile's bias gradient goes, with stride 0 along broadcast dims.
      T* dbias_image = nullptr;
      int64_t db_head = 0, db_row = 0, db_col = 0;
      if (mask[3]) {
        const at::Tensor target = shared_bias ? per_thread[at::get_thread_num()] : dbias;
        dbias_image = target.data_ptr<T>() + (target.size(0) == 1 ? 0 : b * target.stride(0));
        db_head = target.size(1) == 1 ? 0 : target.stride(1);
        db_row = target.size(2) == 1 ? 0 : target.stride(2);
        db_col = target.size(3) == 1 ? 0 : target.stride(3);
      }
      for (int64_t i0 = first; i0 < last; i0 += p.block_rows) {
        const int64_t rows = std::min(p.block_rows, last - i0);
        const bool first_block = i0 == first;
        at::Tensor s = p_buffer.narrow(0, 0, hc).narrow(1, 0, rows);
        if (rows != p.block_rows) s = s.contiguous();
        p.probabilities(b, h0, i0, s);
        const at::Tensor g3 = Problem<T>::tile(g, b, h0, hc, i0, rows);
        if (mask[2]) {  // dV += P^T dO
          if (first_block) {
            at::bmm_out(dv3, s.transpose(1, 2), g3);
          } else {
            dv3.baddbmm_(s.transpose(1, 2), g3);
          }
        }
        if (!need_ds) continue;
        // dS = P * (dO V^T - delta), delta = dO . O per row (O as given: the backward's
        // contract is the gradient for that output).
        at::Tensor ds = ds_buffer.narrow(0, 0, hc).narrow(1, 0, rows);
        if (rows != p.block_rows) ds = ds.contiguous();
        at::bmm_out(ds, g3, v3.transpose(1, 2));
        const T* pp = s.data_ptr<T>();
        T* dsp = ds.data_ptr<T>();
        for (int64_t hh = 0; hh < hc; ++hh) {
          const int64_t bh = b * p.heads + h0 + hh;
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = i0 + r, n = (hh * rows + r) * p.lk;
            const T* g_row = g.data_ptr<T>() + (bh * p.lq + i) * ev;
            const T* o_row = o.data_ptr<T>() + (bh * p.lq + i) * ev;
            T delta = 0;
            for (int64_t e = 0; e < ev; ++e) delta += g_row[e] * o_row[e];
            rows::softmax_grad(dsp + n, pp + n, p.lk, delta);
            if (dbias_image != nullptr) {
              rows::accumulate(dbias_image + (h0 + hh) * db_head + i * db_row, db_col, dsp + n,
                               p.lk);
            }
          }
        }
        if (mask[0]) {
          at::Tensor dq3 = Problem<T>::tile(dq, b, h0, hc, i0, rows);
          at::bmm_out(dq3, ds, k3);
        }
        if (mask[1]) {  // dK += dS^T Q
          const at::Tensor q3 = Problem<T>::tile(p.q, b, h0, hc, i0, rows);
          if (first_block) {
            at::bmm_out(dk3, ds.transpose(1, 2), q3);
          } else {
            dk3.baddbmm_(ds.transpose(1, 2), q3);
          }
        }
      }
    }
  });
  if (split) {
    if (mask[1]) at::sum_out(dk, dk_parts, 0);
    if (mask[2]) at::sum_out(dv, dv_parts, 0);
  }
  if (shared_bias) at::sum_out(dbias, per_thread, 0);
  if (mask[0]) dq.mul_(p.scale);
  if (mask[1]) dk.mul_(p.scale);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_kernel(
    const CpuParallelRunner&, const at::Tensor& grad, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const MaybeTensor& bias, const at::Tensor& out,
    const at::Tensor& lse, double scale, bool is_causal, std::array<bool, 4> mask) {
  check_backward_inputs(grad, query, key, value, bias, out, lse, scale);
  // Zeroed: a head without keys or query rows has no task, and its gradients are zeros.
  std::array<at::Tensor, 4> grads =
      allocate_gradients(query, key, value, bias, mask, /*zeroed=*/true);
  if ((mask[0] || mask[1] || mask[2] || mask[3]) && key.size(2) > 0) {
    AT_DISPATCH_FLOATING_TYPES(
        accumulation_type(query.scalar_type()), "attention_backward_cpu", [&] {
          backward(Problem<scalar_t>(query, key, value, bias, scale, is_causal), grad, out, grads,
                   mask);
        });
  }
  const auto type = query.scalar_type();
  return {grads[0].to(type), grads[1].to(type), grads[2].to(type), grads[3].to(type)};
}

}  // namespace attention
}  // namespace mlk

TORCH_LIBRARY_IMPL(mlkernels, CPU, m) {
  mlk::attention::register_attention<mlk::attention::Kernels<mlk::CpuParallelRunner>>(m);
}
