// The CPU's attention kernels, flash-style: the work is cut into tasks (a block of one head's
// query rows; in the backward, all of a head's rows when the heads keep every thread busy),
// spread over ATen's threads. A task computes its rows' scores against all keys into a buffer of
// its thread (at most kBlockBytes, so it stays in the core's cache), turns each row into
// probabilities in place in fused, vectorized passes, and multiplies them with the values; the
// products go through the register-blocked kernel of attention_cpu_rows.h, on copies of the
// head's keys and values laid out for it (transposed, rows padded to 16). Only the log-sum-exp of
// every query row is kept; the backward recomputes the probabilities block by block, so the
// extra memory is O(B*H*Lq) plus buffers of O(Lk*E) per thread, never O(B*H*Lq*Lk).
//
// Results are the same run to run at a given thread count: at::parallel_for splits the tasks
// statically by thread number, and sums that cross tasks (a broadcast bias's gradient, a key's
// gradient over split query rows) go through per-thread or per-part buffers added in order.
// The CUDA kernels (attention_kernels.h) compute the same values in their own order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <vector>

#include "../common/cpu_runner.h"
#include "attention_cpu_rows.h"
#include "attention_kernels.h"

namespace mlk {
namespace attention {
namespace {

// The scores of a block of query rows (and, in the backward, their gradients): within the L2
// cache of a core next to the head's keys and values.
constexpr int64_t kBlockBytes = int64_t(256) << 10;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Row lengths padded to whole 16-float vectors (the products' B and C operands).
int64_t padded(int64_t n) { return ceil_div(n, 16) * 16; }

// A [rows, cols] matrix of T (strides row_stride, col_stride) copied into dst with row stride
// dst_stride, or transposed (dst[c * dst_stride + r]) in blocks of 16 rows, so that neither the
// reads nor the writes jump a page per element; each dst row's padding (past cols, or past rows
// when transposed, up to dst_stride) is zeroed.
template <typename T>
void copy_rows(const T* src, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
               T* dst, int64_t dst_stride, bool transpose) {
  const int64_t dst_rows = transpose ? cols : rows, width = transpose ? rows : cols;
  for (int64_t r = 0; r < dst_rows; ++r) {
    std::fill(dst + r * dst_stride + width, dst + (r + 1) * dst_stride, T(0));
  }
  if (!transpose) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        dst[r * dst_stride + c] = src[r * row_stride + c * col_stride];
      }
    }
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (col_stride == 1) {
      rows::transpose(src, rows, cols, row_stride, dst, dst_stride);
      return;
    }
  }
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t r1 = std::min(rows, r0 + 16);
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t r = r0; r < r1; ++r) {
        dst[c * dst_stride + r] = src[r * row_stride + c * col_stride];
      }
    }
  }
}

// A thread's buffer: a std::vector whose memory comes from malloc, so that a size no memory holds
// is a null pointer, turned into std::bad_alloc here (operator new aborts instead under ASan).
template <typename T>
struct MallocAllocator {
  using value_type = T;
  MallocAllocator() = default;
  template <typename U>
  MallocAllocator(const MallocAllocator<U>&) {}
  T* allocate(size_t n) {
    void* p = n <= SIZE_MAX / sizeof(T) ? std::malloc(n * sizeof(T)) : nullptr;
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const MallocAllocator&) const { return true; }
  bool operator!=(const MallocAllocator&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, MallocAllocator<T>>;

// Resizes a thread's buffer to n elements (zero-filled when `zeroed`); sizes no memory holds (a
// stride-0 key 2^40 wide) raise an error naming the op, not a bare std::bad_alloc.
template <typename T>
void size_buffer(const char* op, Buffer<T>& buffer, int64_t n, bool zeroed = false) {
  try {
    if (zeroed) {
      buffer.assign(n, T(0));
    } else {
      buffer.resize(n);
    }
  } catch (const std::exception&) {
    TORCH_CHECK(false, op, ": a buffer of ", n,
                " elements for one head (its keys, values or query rows, padded) could not be "
                "allocated");
  }
}

// A head's matrix of a [B, H, L, X] tensor in T: its data pointer and strides.
template <typename T>
struct HeadView {
  const T* data;
  int64_t rows, cols, row_stride, col_stride;
};

template <typename T>
HeadView<T> head_view(const at::Tensor& t, int64_t b, int64_t h) {
  return {t.data_ptr<T>() + b * t.stride(0) + h * t.stride(1), t.size(2), t.size(3), t.stride(2),
          t.stride(3)};
}

// One attention problem in the accumulation type T: inputs [B, H, L, E] (views of the caller's
// tensors when already in T, any strides), the bias as a pointer with stride 0 along the
// dimensions it is broadcast over, and the query rows per block.
template <typename T>
struct Problem {
  at::Tensor q, k, v, bias;
  const T* bias_data = nullptr;
  int64_t bias_stride[4] = {0, 0, 0, 0};
  int64_t batch, heads, lq, lk, e, ev, lk_padded;
  T scale;
  bool causal;
  const char* op;  // the op whose errors these are
  int64_t block_rows = 1;

  Problem(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
          const MaybeTensor& bias_in, double scale_in, bool is_causal, const char* op_name,
          int64_t buffers)
      : batch(query.size(0)),
        heads(query.size(1)),
        lq(query.size(2)),
        lk(key.size(2)),
        e(query.size(3)),
        ev(value.size(3)),
        lk_padded(padded(key.size(2))),
        scale(static_cast<T>(scale_in)),
        causal(is_causal),
        op(op_name) {
    const auto acc = c10::CppTypeToScalarType<T>::value;
    q = query.detach().to(acc);
    k = key.detach().to(acc);
    v = value.detach().to(acc);
    if (has_bias(bias_in)) {
      bias = bias_in->detach().to(acc);
      bias_data = bias.data_ptr<T>();
      for (int64_t d = 0; d < 4; ++d) bias_stride[d] = bias.size(d) == 1 ? 0 : bias.stride(d);
    }
    if (lq == 0) return;
    // `buffers` blocks of scores per thread within kBlockBytes, in blocks of equal size (80 rows
    // of at most 64 are 40 + 40), and enough blocks to keep every thread busy (4 per thread even
    // out their lengths).
    const int64_t row_bytes = lk_padded * static_cast<int64_t>(sizeof(T)) * buffers;
    const int64_t max_rows = std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(1, row_bytes));
    int64_t blocks = ceil_div(lq, max_rows);
    const int64_t wanted = 4 * at::get_num_threads();
    if (batch * heads * blocks < wanted) {
      blocks =
          std::min(lq, std::max(blocks, ceil_div(wanted, std::max<int64_t>(1, batch * heads))));
    }
    block_rows = ceil_div(lq, blocks);
  }

  int64_t blocks_per_head() const { return lq == 0 ? 0 : ceil_div(lq, block_rows); }

  // A head's keys (or values), transposed into [X, Lk_padded], for the score-like products.
  void transposed(const at::Tensor& t, int64_t b, int64_t h, Buffer<T>& dst) const {
    const HeadView<T> m = head_view<T>(t, b, h);
    size_buffer(op, dst, m.cols * lk_padded);
    copy_rows(m.data, m.rows, m.cols, m.row_stride, m.col_stride, dst.data(), lk_padded, true);
  }
  // Rows [r0, r0 + rows) of a head's matrix as a product's B operand: the tensor itself when its
  // rows are whole vectors, else copied into `scratch` as [rows, padded(X)]. Returns the rows
  // and sets *ld to their stride.
  const T* rows_operand(const at::Tensor& t, int64_t b, int64_t h, int64_t r0, int64_t rows,
                        Buffer<T>& scratch, int64_t* ld) const {
    const HeadView<T> m = head_view<T>(t, b, h);
    if (m.col_stride == 1 && m.cols % 16 == 0) {
      *ld = m.row_stride;
      return m.data + r0 * m.row_stride;
    }
    *ld = padded(m.cols);
    size_buffer(op, scratch, rows * *ld);
    copy_rows(m.data + r0 * m.row_stride, rows, m.cols, m.row_stride, m.col_stride, scratch.data(),
              *ld, false);
    return scratch.data();
  }

  // The probabilities of query rows [i0, i0 + rows) of head (b, h) into s ([rows, Lk_padded]):
  // q k^T (k_t: the head's keys transposed), then per row rows::softmax_row. row_max and
  // row_sum, when given, receive the row statistics.
  void probabilities(int64_t b, int64_t h, int64_t i0, int64_t rows, const Buffer<T>& k_t, T* s,
                     T* row_max = nullptr, T* row_sum = nullptr) const {
    const HeadView<T> qh = head_view<T>(q, b, h);
    rows::gemm(rows, lk_padded, e, qh.data + i0 * qh.row_stride, qh.row_stride, qh.col_stride,
               k_t.data(), lk_padded, s, lk_padded, false, /*fused=*/false);
    const T* bias_head =
        bias_data != nullptr ? bias_data + b * bias_stride[0] + h * bias_stride[1] : nullptr;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      T m, l;
      rows::softmax_row(s + r * lk_padded, lk, causal ? std::min(lk, i + 1) : lk, scale,
                        bias_head != nullptr ? bias_head + i * bias_stride[2] : nullptr,
                        bias_stride[3], &m, &l);
      if (row_max != nullptr) row_max[r] = m;
      if (row_sum != nullptr) row_sum[r] = l;
    }
  }
};

template <typename T>
void forward(const Problem<T>& p, at::Tensor& out, at::Tensor& lse) {
  const int64_t per_head = p.blocks_per_head(), evp = padded(p.ev);
  at::parallel_for(0, p.batch * p.heads * per_head, 1, [&](int64_t begin, int64_t end) {
    Buffer<T> k_t, v_scratch, s, o, row_max, row_sum;
    size_buffer(p.op, s, p.block_rows * p.lk_padded);
    size_buffer(p.op, o, p.block_rows * evp);
    size_buffer(p.op, row_max, p.block_rows);
    size_buffer(p.op, row_sum, p.block_rows);
    int64_t loaded = -1, ldv = 0;  // the head whose keys and values are in k_t, v_rows
    const T* v_rows = nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / per_head, b = bh / p.heads, h = bh % p.heads;
      const int64_t i0 = task % per_head * p.block_rows;
      const int64_t rows = std::min(p.block_rows, p.lq - i0);
      if (loaded != bh) {
        p.transposed(p.k, b, h, k_t);
        v_rows = p.rows_operand(p.v, b, h, 0, p.lk, v_scratch, &ldv);
        loaded = bh;
      }
      p.probabilities(b, h, i0, rows, k_t, s.data(), row_max.data(), row_sum.data());
      // O = P V, straight into the output when its rows are whole vectors.
      T* out_rows = out.data_ptr<T>() + (bh * p.lq + i0) * p.ev;
      const bool direct = p.ev % 16 == 0;
      rows::gemm(rows, evp, p.lk, s.data(), p.lk_padded, 1, v_rows, ldv,
                 direct ? out_rows : o.data(), direct ? p.ev : evp, false);
      for (int64_t r = 0; r < rows && !direct; ++r) {
        std::copy(o.data() + r * evp, o.data() + r * evp + p.ev, out_rows + r * p.ev);
      }
      T* lse_rows = lse.data_ptr<T>() + bh * p.lq + i0;
      for (int64_t r = 0; r < rows; ++r) {
        // row_sum is 0 only in a fully masked row (an attended key's exp(s - max) is 1).
        lse_rows[r] = row_sum[r] == T(0) ? -std::numeric_limits<T>::infinity()
                                         : row_max[r] + std::log(row_sum[r]);
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
    forward(Problem<scalar_t>(query, key, value, bias, scale, is_causal, kOp, 1), out, lse);
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
  const int64_t e = p.e, ev = p.ev, ep = padded(e), evp = padded(ev), lkp = p.lk_padded;
  // A head's key and value gradients add up over all its query rows: a task takes a whole head
  // when the heads keep every thread busy; else each head's row blocks are split in `parts`,
  // whose key and value gradients go to buffers of their own, added in order at the end.
  const int64_t threads = at::get_num_threads(), blocks = p.blocks_per_head();
  const int64_t parts =
      head_count < 2 * threads ? std::min(blocks, ceil_div(2 * threads, head_count)) : 1;
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
  // Tasks that share a slice of a broadcast bias would race on its gradient: each thread then
  // adds into its own copy, and the copies are summed in thread order.
  const bool shared_bias =
      mask[3] && ((dbias.size(0) == 1 && p.batch > 1) || (dbias.size(1) == 1 && p.heads > 1) ||
                  (dbias.size(2) == 1 && split));
  const at::Tensor per_thread = copies(shared_bias, dbias, threads);
  const bool need_ds = mask[0] || mask[1] || mask[3];

  at::parallel_for(0, head_count * parts, 1, [&](int64_t begin, int64_t end) {
    Buffer<T> k_t, v_t, k_scratch, g_scratch, q_scratch, dk_acc, dv_acc;
    Buffer<T> s, ds, dq_rows;
    size_buffer(op, s, p.block_rows * lkp);
    size_buffer(op, ds, p.block_rows * lkp);
    size_buffer(op, dq_rows, p.block_rows * ep);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / parts, part = task % parts, b = bh / p.heads, h = bh % p.heads;
      const int64_t first = part * blocks_per_part * p.block_rows;
      const int64_t last = std::min(p.lq, first + blocks_per_part * p.block_rows);
      p.transposed(p.k, b, h, k_t);
      if (need_ds) p.transposed(p.v, b, h, v_t);
      int64_t ldk = 0, ldg = 0, ldq = 0;
      const T* k_rows = mask[0] ? p.rows_operand(p.k, b, h, 0, p.lk, k_scratch, &ldk) : nullptr;
      if (mask[1]) size_buffer(op, dk_acc, p.lk * ep, /*zeroed=*/true);
      if (mask[2]) size_buffer(op, dv_acc, p.lk * evp, /*zeroed=*/true);
      // Where this task's bias gradient goes, with stride 0 along broadcast dims.
      T* dbias_head = nullptr;
      int64_t db_row = 0, db_col = 0;
      if (mask[3]) {
        const at::Tensor target = shared_bias ? per_thread[at::get_thread_num()] : dbias;
        dbias_head = target.data_ptr<T>() + (target.size(0) == 1 ? 0 : b * target.stride(0)) +
                     (target.size(1) == 1 ? 0 : h * target.stride(1));
        db_row = target.size(2) == 1 ? 0 : target.stride(2);
        db_col = target.size(3) == 1 ? 0 : target.stride(3);
      }
      for (int64_t i0 = first; i0 < last; i0 += p.block_rows) {
        const int64_t rows = std::min(p.block_rows, last - i0);
        p.probabilities(b, h, i0, rows, k_t, s.data());
        const T* g_rows = p.rows_operand(g, b, h, i0, rows, g_scratch, &ldg);
        if (mask[2]) {  // dV += P^T dO
          rows::gemm(p.lk, evp, rows, s.data(), 1, lkp, g_rows, ldg, dv_acc.data(), evp, true);
        }
        if (!need_ds) continue;
        // dS = P * (dO V^T - delta), delta = dO . O per row (O as given: the backward's
        // contract is the gradient for that output).
        rows::gemm(rows, lkp, ev, g_rows, ldg, 1, v_t.data(), lkp, ds.data(), lkp, false);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          const T* g_row = g_rows + r * ldg;
          const T* o_row = o.data_ptr<T>() + (bh * p.lq + i) * ev;
          T delta = 0;
          for (int64_t c = 0; c < ev; ++c) delta += g_row[c] * o_row[c];
          T* ds_row = ds.data() + r * lkp;
          rows::softmax_grad(ds_row, s.data() + r * lkp, p.lk, delta);
          if (dbias_head != nullptr) {
            rows::accumulate(dbias_head + i * db_row, db_col, ds_row, p.lk);
          }
        }
        if (mask[0]) {  // dQ = dS K * scale
          rows::gemm(rows, ep, p.lk, ds.data(), lkp, 1, k_rows, ldk, dq_rows.data(), ep, false);
          T* dq_out = dq.data_ptr<T>() + (bh * p.lq + i0) * e;
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t c = 0; c < e; ++c) dq_out[r * e + c] = dq_rows[r * ep + c] * p.scale;
          }
        }
        if (mask[1]) {  // dK += dS^T Q
          const T* q_rows = p.rows_operand(p.q, b, h, i0, rows, q_scratch, &ldq);
          rows::gemm(p.lk, ep, rows, ds.data(), 1, lkp, q_rows, ldq, dk_acc.data(), ep, true);
        }
      }
      // The head's (or part's) key and value gradients, dK scaled.
      if (mask[1]) {
        T* dst = (split ? dk_parts[part] : dk).data_ptr<T>() + bh * p.lk * e;
        for (int64_t j = 0; j < p.lk; ++j) {
          for (int64_t c = 0; c < e; ++c) dst[j * e + c] = dk_acc[j * ep + c] * p.scale;
        }
      }
      if (mask[2]) {
        T* dst = (split ? dv_parts[part] : dv).data_ptr<T>() + bh * p.lk * ev;
        for (int64_t j = 0; j < p.lk; ++j) {
          std::copy(dv_acc.data() + j * evp, dv_acc.data() + j * evp + ev, dst + j * ev);
        }
      }
    }
  });
  if (split) {
    if (mask[1]) at::sum_out(dk, dk_parts, 0);
    if (mask[2]) at::sum_out(dv, dv_parts, 0);
  }
  if (shared_bias) at::sum_out(dbias, per_thread, 0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_kernel(
    const CpuParallelRunner&, const at::Tensor& grad, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const MaybeTensor& bias, const at::Tensor& out,
    const at::Tensor& lse, double scale, bool is_causal, std::array<bool, 4> mask) {
  check_backward_inputs(grad, query, key, value, bias, out, lse, scale);
  // Without keys or query rows there is no task and every gradient is zero; otherwise the tasks
  // write every entry of dQ, dK and dV, and the bias's gradient adds up (zeroed).
  const bool empty = query.size(0) * query.size(1) == 0 || query.size(2) == 0 || key.size(2) == 0;
  std::array<at::Tensor, 4> grads = allocate_gradients(query, key, value, bias, mask, empty);
  if (!empty && mask[3]) grads[3].zero_();
  if ((mask[0] || mask[1] || mask[2] || mask[3]) && !empty) {
    AT_DISPATCH_FLOATING_TYPES(
        accumulation_type(query.scalar_type()), "attention_backward_cpu", [&] {
          backward(Problem<scalar_t>(query, key, value, bias, scale, is_causal, kBackwardOp, 2),
                   grad, out, grads, mask);
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
