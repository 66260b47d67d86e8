// Host+device math of the attention kernels (attention_kernels.h): one thread per output row,
// so every output element is computed by one thread in a fixed order (deterministic, no atomics,
// no [B, H, Lq, Lk] buffer). T is the accumulation type (float32 for float16/bfloat16 inputs),
// S the storage type.
//
//  forward:  per query row, pass 1 finds the row's largest score and the sum of exp(s - max)
//            (online), pass 2 adds the normalized probabilities times the values; the row's
//            log-sum-exp is kept for the backward.
//  backward: probabilities recomputed as the forward's, p = exp(s - max) / sum (row statistics
//            recomputed per row first: exp(s - lse) loses digits when the scores are large):
//            dq per query row (over keys), dk and dv per key row (over queries), the bias
//            gradient per element of the bias as given (over the rows and heads it was broadcast
//            to), each from dS = p * (dO.v - D), D = dO.O per query row.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../common/grid.h"
#include "../common/macros.h"

namespace mlk {
namespace attention {

// Sizes and the bias's strides (0 along a dimension it is broadcast over).
template <typename T>
struct Dims {
  int64_t batch, heads, lq, lk, e, ev;
  int64_t bias_stride[4];  // batch, head, query, key
  bool has_bias, causal;
  T scale;
};

template <typename T>
MLK_HOST_DEVICE T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// The scaled, biased score of query i against key j of head (b, h); -inf where causal masks it.
// The rows come from the inputs (S) or from a tile of them in shared memory (T).
template <typename R, typename S, typename T>
MLK_HOST_DEVICE T score(const Dims<T>& d, const R* q_row, const R* k_row, const S* bias, int64_t b,
                        int64_t h, int64_t i, int64_t j) {
  if (d.causal && j > i) return neg_inf<T>();
  T dot = 0;
  for (int64_t e = 0; e < d.e; ++e) dot += static_cast<T>(q_row[e]) * static_cast<T>(k_row[e]);
  T s = dot * d.scale;
  if (d.has_bias) {
    s += static_cast<T>(bias[b * d.bias_stride[0] + h * d.bias_stride[1] + i * d.bias_stride[2] +
                             j * d.bias_stride[3]]);
  }
  return s;
}

template <typename S, typename T>
MLK_HOST_DEVICE T dot(const S* a, const S* b, int64_t n) {
  T sum = 0;
  for (int64_t e = 0; e < n; ++e) sum += static_cast<T>(a[e]) * static_cast<T>(b[e]);
  return sum;
}

// A query row's maximum score m and l = sum_j exp(s_j - m) (online: rescaled as m grows); m is
// -inf for a fully masked row (l = 0 there) and NaN when a score is NaN.
template <typename S, typename T>
MLK_HOST_DEVICE void row_stats(const Dims<T>& d, const S* q_row, const S* keys, const S* bias,
                               int64_t b, int64_t h, int64_t i, T* m_out, T* l_out) {
  T m = neg_inf<T>(), l = 0;
  bool nan = false;
  for (int64_t j = 0; j < d.lk; ++j) {
    const T s = score(d, q_row, keys + j * d.e, bias, b, h, i, j);
    if (s != s) nan = true;
    if (!(s > neg_inf<T>())) continue;  // masked (or NaN, flagged)
    if (s > m) {
      l = l * static_cast<T>(std::exp(m - s)) + T(1);
      m = s;
    } else {
      l += static_cast<T>(std::exp(s - m));
    }
  }
  *m_out = nan ? std::numeric_limits<T>::quiet_NaN() : m;
  *l_out = l;
}

// A probability from its score and its row's statistics: exp(s - m) / l, as the forward
// normalizes it (0 in a fully masked row, NaN in a NaN row).
template <typename T>
MLK_HOST_DEVICE T probability(T s, T m, T l) {
  return m == neg_inf<T>() ? T(0) : static_cast<T>(std::exp(s - m)) / l;
}

// out: [B*H*Lq, Ev] in T; lse: [B*H*Lq] in T. A row whose scores are all -inf (fully masked)
// gets zeros and lse -inf; a row with a NaN score gets NaN, as the softmax of that row would.
template <typename S, typename T>
MLK_HOST_DEVICE void forward_thread(const ThreadIndex& t, const Dims<T>& d, const S* q, const S* k,
                                    const S* v, const S* bias, T* out, T* lse) {
  const int64_t rows = d.batch * d.heads * d.lq;
  for (int64_t r = t.global_x(); r < rows; r += t.grid_stride_x()) {
    const int64_t i = r % d.lq, bh = r / d.lq, h = bh % d.heads, b = bh / d.heads;
    const S* q_row = q + r * d.e;
    const S* keys = k + bh * d.lk * d.e;
    const S* values = v + bh * d.lk * d.ev;
    T* o = out + r * d.ev;
    for (int64_t e = 0; e < d.ev; ++e) o[e] = 0;
    // Pass 1: the row's maximum and sum of exp(s - max).
    T m, l;
    row_stats(d, q_row, keys, bias, b, h, i, &m, &l);
    const bool nan = m != m;
    if (nan) {
      const T q_nan = std::numeric_limits<T>::quiet_NaN();
      for (int64_t e = 0; e < d.ev; ++e) o[e] = q_nan;
      lse[r] = q_nan;
      continue;
    }
    if (m == neg_inf<T>()) {  // fully masked (or no keys)
      lse[r] = m;
      continue;
    }
    // Pass 2: the normalized probabilities times the values (normalized first, so huge values
    // overflow no sooner than the result does).
    for (int64_t j = 0; j < d.lk; ++j) {
      const T p = probability(score(d, q_row, keys + j * d.e, bias, b, h, i, j), m, l);
      if (p == T(0)) continue;
      const S* v_row = values + j * d.ev;
      for (int64_t e = 0; e < d.ev; ++e) o[e] += p * static_cast<T>(v_row[e]);
    }
    lse[r] = m + static_cast<T>(std::log(l));
  }
}

// Per query row, for the backward: delta[r] = dO[r] . O[r] (both kernel shapes read it).
template <typename S, typename T>
MLK_HOST_DEVICE void delta_thread(const ThreadIndex& t, const Dims<T>& d, const S* grad,
                                  const S* out, T* delta) {
  const int64_t rows = d.batch * d.heads * d.lq;
  for (int64_t r = t.global_x(); r < rows; r += t.grid_stride_x()) {
    delta[r] = dot<S, T>(grad + r * d.ev, out + r * d.ev, d.ev);
  }
}

// Per query row, for the backward: the row's statistics (row_stats) in stats[2r], stats[2r + 1],
// from which the probabilities are recomputed exactly as the forward's.
template <typename S, typename T>
MLK_HOST_DEVICE void row_thread(const ThreadIndex& t, const Dims<T>& d, const S* q, const S* k,
                                const S* bias, T* stats) {
  const int64_t rows = d.batch * d.heads * d.lq;
  for (int64_t r = t.global_x(); r < rows; r += t.grid_stride_x()) {
    const int64_t i = r % d.lq, bh = r / d.lq, h = bh % d.heads, b = bh / d.heads;
    row_stats(d, q + r * d.e, k + bh * d.lk * d.e, bias, b, h, i, stats + 2 * r, stats + 2 * r + 1);
  }
}

// dS of query i and key j of head (b, h): p * (dO_i . v_j - delta_i); p returned through `p_out`.
template <typename S, typename T>
MLK_HOST_DEVICE T score_grad(const Dims<T>& d, const S* q_row, const S* k_row, const S* v_row,
                             const S* g_row, const S* bias, const T* stats_i, T delta_i, int64_t b,
                             int64_t h, int64_t i, int64_t j, T* p_out) {
  const T p = probability(score(d, q_row, k_row, bias, b, h, i, j), stats_i[0], stats_i[1]);
  *p_out = p;
  if (p == T(0)) return T(0);
  return p * (dot<S, T>(g_row, v_row, d.ev) - delta_i);
}

// dq: [B*H*Lq, E] in T, one query row per loop step.
template <typename S, typename T>
MLK_HOST_DEVICE void grad_query_thread(const ThreadIndex& t, const Dims<T>& d, const S* q,
                                       const S* k, const S* v, const S* bias, const S* grad,
                                       const T* stats, const T* delta, T* dq) {
  const int64_t rows = d.batch * d.heads * d.lq;
  for (int64_t r = t.global_x(); r < rows; r += t.grid_stride_x()) {
    const int64_t i = r % d.lq, bh = r / d.lq, h = bh % d.heads, b = bh / d.heads;
    T* out = dq + r * d.e;
    for (int64_t e = 0; e < d.e; ++e) out[e] = 0;
    for (int64_t j = 0; j < d.lk; ++j) {
      const S* k_row = k + (bh * d.lk + j) * d.e;
      T p;
      const T ds = score_grad(d, q + r * d.e, k_row, v + (bh * d.lk + j) * d.ev, grad + r * d.ev,
                              bias, stats + 2 * r, delta[r], b, h, i, j, &p);
      if (ds == T(0)) continue;
      for (int64_t e = 0; e < d.e; ++e) out[e] += ds * static_cast<T>(k_row[e]);
    }
    for (int64_t e = 0; e < d.e; ++e) out[e] *= d.scale;
  }
}

// dk: [B*H*Lk, E], dv: [B*H*Lk, Ev] in T (either may be null: not asked for), one key row per
// loop step.
template <typename S, typename T>
MLK_HOST_DEVICE void grad_key_value_thread(const ThreadIndex& t, const Dims<T>& d, const S* q,
                                           const S* k, const S* v, const S* bias, const S* grad,
                                           const T* stats, const T* delta, T* dk, T* dv) {
  const int64_t rows = d.batch * d.heads * d.lk;
  for (int64_t r = t.global_x(); r < rows; r += t.grid_stride_x()) {
    const int64_t j = r % d.lk, bh = r / d.lk, h = bh % d.heads, b = bh / d.heads;
    T* gk = dk != nullptr ? dk + r * d.e : nullptr;
    T* gv = dv != nullptr ? dv + r * d.ev : nullptr;
    if (gk != nullptr) {
      for (int64_t e = 0; e < d.e; ++e) gk[e] = 0;
    }
    if (gv != nullptr) {
      for (int64_t e = 0; e < d.ev; ++e) gv[e] = 0;
    }
    const S* k_row = k + r * d.e;
    const S* v_row = v + r * d.ev;
    for (int64_t i = d.causal ? j : 0; i < d.lq; ++i) {
      const int64_t qr = bh * d.lq + i;
      const S* g_row = grad + qr * d.ev;
      T p;
      const T ds = score_grad(d, q + qr * d.e, k_row, v_row, g_row, bias, stats + 2 * qr, delta[qr],
                              b, h, i, j, &p);
      if (gv != nullptr && p != T(0)) {
        for (int64_t e = 0; e < d.ev; ++e) gv[e] += p * static_cast<T>(g_row[e]);
      }
      if (gk != nullptr && ds != T(0)) {
        const S* q_row = q + qr * d.e;
        for (int64_t e = 0; e < d.e; ++e) gk[e] += ds * static_cast<T>(q_row[e]);
      }
    }
    if (gk != nullptr) {
      for (int64_t e = 0; e < d.e; ++e) gk[e] *= d.scale;
    }
  }
}

// The bias gradient in the bias's own shape [bb, bh, bq, bk] (each 1 or the full size): each
// element sums dS over the batch, head, query and key positions it was broadcast to, in order.
struct BiasShape {
  int64_t size[4];
};

template <typename S, typename T>
MLK_HOST_DEVICE void grad_bias_thread(const ThreadIndex& t, const Dims<T>& d,
                                      const BiasShape& bias_shape, const S* q, const S* k,
                                      const S* v, const S* bias, const S* grad, const T* stats,
                                      const T* delta, T* dbias) {
  const int64_t* shape = bias_shape.size;
  const int64_t count = shape[0] * shape[1] * shape[2] * shape[3];
  for (int64_t n = t.global_x(); n < count; n += t.grid_stride_x()) {
    const int64_t j0 = n % shape[3], i0 = (n / shape[3]) % shape[2];
    const int64_t h0 = (n / (shape[3] * shape[2])) % shape[1];
    const int64_t b0 = n / (shape[3] * shape[2] * shape[1]);
    // A broadcast dimension (size 1 where the scores have more) runs over all of them.
    const int64_t b_end = shape[0] == 1 ? d.batch : b0 + 1,
                  h_end = shape[1] == 1 ? d.heads : h0 + 1;
    const int64_t i_end = shape[2] == 1 ? d.lq : i0 + 1, j_end = shape[3] == 1 ? d.lk : j0 + 1;
    T sum = 0;
    for (int64_t b = shape[0] == 1 ? 0 : b0; b < b_end; ++b) {
      for (int64_t h = shape[1] == 1 ? 0 : h0; h < h_end; ++h) {
        const int64_t bh = b * d.heads + h;
        for (int64_t i = shape[2] == 1 ? 0 : i0; i < i_end; ++i) {
          const int64_t qr = bh * d.lq + i;
          for (int64_t j = shape[3] == 1 ? 0 : j0; j < j_end; ++j) {
            T p;
            sum +=
                score_grad(d, q + qr * d.e, k + (bh * d.lk + j) * d.e, v + (bh * d.lk + j) * d.ev,
                           grad + qr * d.ev, bias, stats + 2 * qr, delta[qr], b, h, i, j, &p);
          }
        }
      }
    }
    dbias[n] = sum;
  }
}

}  // namespace attention
}  // namespace mlk
