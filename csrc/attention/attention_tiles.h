// The tiled CUDA kernels of attention: cooperative blocks (shared memory and barriers, as
// emulate::Block models them) over tiles of `br` query rows and `bc` keys, for heads whose tiles
// fit in shared memory (attention_kernels.h falls back to the one-thread-per-row kernels of
// attention_math.h otherwise). fp32 SIMT: every thread of a block strides over the tile's
// elements; no atomics, so results are the same run to run.
//
//  ForwardTiles  a block per query tile: key tiles streamed with an online softmax that keeps
//                the output a probability-weighted average (rescaled as the row maximum grows),
//                so no partial sum exceeds what the result holds; saves each row's lse, and for
//                the backward the row statistics (max, sum) from which probabilities are
//                recomputed.
//  KeyValueTiles a block per key tile: dK and dV, over the query tiles.
//  QueryTiles    a block per query tile: dQ, over the key tiles.
//  BiasTiles     a block per tile of the bias in its own shape: dBias summed over the batch,
//                heads, query rows and keys it was broadcast to (no [B, H, Lq, Lk] buffer).
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/grid.h"
#include "../common/macros.h"
#include "attention_math.h"

namespace mlk {
namespace attention {

constexpr int64_t kTileThreads = 128;
// CUDA's dynamic shared memory per block without an opt-in (grid.h; the runners refuse more).
constexpr int64_t kMaxSharedBytes = kMaxDynamicSharedBytes;

struct TileDims {
  int64_t br = 0, bc = 0;  // query rows and keys per tile; 0: no tiling fits
};

// Arrays carved one after another out of a block's shared memory.
template <typename T>
struct SharedCarver {
  T* next;
  MLK_HOST_DEVICE T* take(int64_t n) {
    T* p = next;
    next += n;
    return p;
  }
};

// The T elements each kernel's shared memory holds for a tiling (the carving order below).
MLK_HOST_DEVICE int64_t forward_shared(int64_t br, int64_t bc, int64_t e, int64_t ev) {
  return br * e + bc * e + bc * ev + br * bc + br * ev + 4 * br;
}
MLK_HOST_DEVICE int64_t key_value_shared(int64_t br, int64_t bc, int64_t e, int64_t ev) {
  return 2 * bc * e + 2 * bc * ev + br * e + br * ev + 2 * br * bc + 3 * br;
}
MLK_HOST_DEVICE int64_t query_shared(int64_t br, int64_t bc, int64_t e, int64_t ev) {
  return 2 * br * e + br * ev + bc * e + bc * ev + br * bc + 3 * br;
}
MLK_HOST_DEVICE int64_t bias_shared(int64_t br, int64_t bc, int64_t e, int64_t ev) {
  return br * e + br * ev + bc * e + bc * ev + 2 * br * bc + 3 * br;
}

// Tiles no larger than the sequences need (8, 16 or 32 rows and keys), shrunk until every
// kernel's shared memory fits; {0, 0} when even 8 x 8 does not (huge E).
inline TileDims choose_tiles(int64_t lq, int64_t lk, int64_t e, int64_t ev, int64_t elem_bytes) {
  const auto size_for = [](int64_t n) { return n <= 8 ? 8 : n <= 32 ? 16 : 32; };
  TileDims t{size_for(lq), size_for(lk)};
  while (t.br >= 8 && t.bc >= 8) {
    const int64_t most =
        std::max(std::max(forward_shared(t.br, t.bc, e, ev), key_value_shared(t.br, t.bc, e, ev)),
                 std::max(query_shared(t.br, t.bc, e, ev), bias_shared(t.br, t.bc, e, ev)));
    if (most * elem_bytes <= kMaxSharedBytes) return t;
    if (t.br >= t.bc) {
      t.br /= 2;
    } else {
      t.bc /= 2;
    }
  }
  return TileDims{};
}

MLK_HOST_DEVICE int64_t tile_count(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

// Which tile of which head a block works on: block `index` of a grid of heads x tiles, the tiles
// `size` long over a sequence of `length` (the last one maybe shorter).
struct TileOf {
  int64_t bh, b, h;      // the head, and its image and head number
  int64_t start, count;  // the tile's first row and its number of rows

  MLK_HOST_DEVICE TileOf(int64_t index, int64_t length, int64_t size, int64_t heads) {
    const int64_t tiles = tile_count(length, size);
    bh = index / tiles;
    b = bh / heads;
    h = bh % heads;
    start = index % tiles * size;
    count = length - start < size ? length - start : size;
  }
};

// dst[r * width + c] = src[r * width + c] for the first `valid` of `rows` rows, zeros after.
template <typename S, typename T>
MLK_HOST_DEVICE void load_rows(const ThreadIndex& t, T* dst, const S* src, int64_t rows,
                               int64_t valid, int64_t width) {
  for (int64_t n = t.thread_rank(); n < rows * width; n += t.block_dim.count()) {
    dst[n] = n / width < valid ? static_cast<T>(src[n]) : T(0);
  }
}

// Keys [j0, j0 + cols) of head bh into ks (and their values into vs, when vs is not null), bc
// rows each, zeros past `cols`.
template <typename S, typename T>
MLK_HOST_DEVICE void load_keys(const ThreadIndex& t, const Dims<T>& d, int64_t bc, const S* k,
                               const S* v, int64_t bh, int64_t j0, int64_t cols, T* ks, T* vs) {
  load_rows(t, ks, k + (bh * d.lk + j0) * d.e, bc, cols, d.e);
  if (vs != nullptr) load_rows(t, vs, v + (bh * d.lk + j0) * d.ev, bc, cols, d.ev);
}

// One row's online softmax over a tile of its scores s[0, n): the running maximum m and sum l
// (of exp(s - m)) take the tile in; s becomes the tile's probabilities under the new statistics;
// *alpha is the factor that rescales the row's output so far (an average weighted by the
// earlier probabilities) to the new sum. *flag: 1 once a score is NaN, 2 once one is +inf (the
// row's output is then NaN, its lse NaN or +inf, as the reference's softmax and logsumexp).
template <typename T>
MLK_HOST_DEVICE void online_softmax(T* s, int64_t n, T* m, T* l, T* alpha, T* flag) {
  T tile_max = neg_inf<T>();
  for (int64_t j = 0; j < n; ++j) {
    if (s[j] != s[j]) *flag = T(1);
    if (s[j] > tile_max) tile_max = s[j];
  }
  if (tile_max == -neg_inf<T>() && *flag == T(0)) *flag = T(2);
  const T m_new = tile_max > *m ? tile_max : *m;
  if (*flag != T(0) || m_new == neg_inf<T>()) {  // nothing to weigh (yet), or a lost row
    for (int64_t j = 0; j < n; ++j) s[j] = T(0);
    *alpha = T(1);
    return;
  }
  const T l_old = *m == neg_inf<T>() ? T(0) : *l * static_cast<T>(std::exp(*m - m_new));
  T sum = l_old;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = static_cast<T>(std::exp(s[j] - m_new));  // 0 for a masked (-inf) score
    sum += s[j];
  }
  for (int64_t j = 0; j < n; ++j) s[j] /= sum;
  *alpha = l_old / sum;
  *m = m_new;
  *l = sum;
}

template <typename S, typename T>
struct ForwardTiles {
  Dims<T> d;
  TileDims tile;
  const S *q, *k, *v, *bias;
  T* out;    // [B*H*Lq, Ev], or null: statistics only (for the backward)
  T* lse;    // [B*H*Lq] or null
  T* stats;  // [B*H*Lq, 2] (max, sum) or null

  template <typename Block>
  MLK_HOST_DEVICE void operator()(Block& block) const {
    const int64_t br = tile.br, bc = tile.bc;
    const TileOf at(block.index().x, d.lq, br, d.heads);
    const int64_t bh = at.bh, b = at.b, h = at.h, i0 = at.start, rows = at.count;
    SharedCarver<T> carve{block.template shared<T>()};
    T* qs = carve.take(br * d.e);
    T* ks = carve.take(bc * d.e);
    T* vs = carve.take(bc * d.ev);
    T* ss = carve.take(br * bc);
    T* os = carve.take(br * d.ev);
    T *m = carve.take(br), *l = carve.take(br), *alpha = carve.take(br), *flag = carve.take(br);
    const int64_t row0 = bh * d.lq + i0;
    block.phase([&](const ThreadIndex& t) {
      load_rows(t, qs, q + row0 * d.e, br, rows, d.e);
      for (int64_t n = t.thread_rank(); n < br * d.ev; n += t.block_dim.count()) os[n] = T(0);
      for (int64_t r = t.thread_rank(); r < br; r += t.block_dim.count()) {
        m[r] = neg_inf<T>();
        l[r] = alpha[r] = flag[r] = T(0);
      }
    });
    for (int64_t j0 = 0; j0 < d.lk; j0 += bc) {
      const int64_t cols = d.lk - j0 < bc ? d.lk - j0 : bc;
      block.phase([&](const ThreadIndex& t) {
        load_keys(t, d, bc, k, v, bh, j0, cols, ks, out != nullptr ? vs : nullptr);
      });
      block.phase([&](const ThreadIndex& t) {
        for (int64_t n = t.thread_rank(); n < rows * cols; n += t.block_dim.count()) {
          const int64_t i = n / cols, j = n % cols;
          ss[i * bc + j] = score(d, qs + i * d.e, ks + j * d.e, bias, b, h, i0 + i, j0 + j);
        }
      });
      block.phase([&](const ThreadIndex& t) {
        for (int64_t r = t.thread_rank(); r < rows; r += t.block_dim.count()) {
          online_softmax(ss + r * bc, cols, m + r, l + r, alpha + r, flag + r);
        }
      });
      if (out == nullptr) continue;
      block.phase([&](const ThreadIndex& t) {
        for (int64_t n = t.thread_rank(); n < rows * d.ev; n += t.block_dim.count()) {
          const int64_t i = n / d.ev, e = n % d.ev;
          T acc = alpha[i] * os[n];
          for (int64_t j = 0; j < cols; ++j) {
            const T p = ss[i * bc + j];
            if (p != T(0)) acc += p * vs[j * d.ev + e];  // a masked key's value is not read
          }
          os[n] = acc;
        }
      });
    }
    block.phase([&](const ThreadIndex& t) {
      const T nan = std::numeric_limits<T>::quiet_NaN();
      if (out != nullptr) {
        for (int64_t n = t.thread_rank(); n < rows * d.ev; n += t.block_dim.count()) {
          out[row0 * d.ev + n] = flag[n / d.ev] != T(0) ? nan : os[n];
        }
      }
      for (int64_t r = t.thread_rank(); r < rows; r += t.block_dim.count()) {
        const T row_max = flag[r] == T(1) ? nan : flag[r] == T(2) ? -neg_inf<T>() : m[r];
        if (lse != nullptr) {
          lse[row0 + r] = flag[r] != T(0) || l[r] == T(0) ? row_max  // NaN, +inf or -inf
                                                          : m[r] + static_cast<T>(std::log(l[r]));
        }
        if (stats != nullptr) {
          stats[2 * (row0 + r)] = flag[r] == T(2) ? nan : row_max;  // probabilities NaN there
          stats[2 * (row0 + r) + 1] = l[r];
        }
      }
    });
  }
};

// Shared parts of the backward blocks: a query tile's rows (q, dO), their statistics and
// delta = dO . O (delta_thread's), and the tile of score gradients dS = p * (dO . v_j - delta)
// against a key tile.
template <typename S, typename T>
struct QueryRows {
  T *qs, *gs, *m, *l, *delta;

  template <typename Carver>
  MLK_HOST_DEVICE static QueryRows carve(Carver& c, int64_t br, int64_t e, int64_t ev) {
    QueryRows r;
    r.qs = c.take(br * e);
    r.gs = c.take(br * ev);
    r.m = c.take(br);
    r.l = c.take(br);
    r.delta = c.take(br);
    return r;
  }

  // Rows [i0, i0 + rows) of head bh (br rows in the tile, zeros past `rows`).
  MLK_HOST_DEVICE void load(const ThreadIndex& t, const Dims<T>& d, int64_t br, const S* q,
                            const S* grad, const T* stats, const T* deltas, int64_t bh, int64_t i0,
                            int64_t rows) const {
    const int64_t row0 = bh * d.lq + i0;
    load_rows(t, qs, q + row0 * d.e, br, rows, d.e);
    load_rows(t, gs, grad + row0 * d.ev, br, rows, d.ev);
    for (int64_t r = t.thread_rank(); r < rows; r += t.block_dim.count()) {
      m[r] = stats[2 * (row0 + r)];
      l[r] = stats[2 * (row0 + r) + 1];
      delta[r] = deltas[row0 + r];
    }
  }

  // ds[i * bc + j] for i < rows, j < cols (and p[i * bc + j] when p is not null).
  template <typename B>
  MLK_HOST_DEVICE void score_grads(const ThreadIndex& t, const Dims<T>& d, int64_t bc, const T* ks,
                                   const T* vs, const B* bias, int64_t b, int64_t h, int64_t i0,
                                   int64_t rows, int64_t j0, int64_t cols, T* ds, T* p) const {
    for (int64_t n = t.thread_rank(); n < rows * cols; n += t.block_dim.count()) {
      const int64_t i = n / cols, j = n % cols;
      const T prob =
          probability(score(d, qs + i * d.e, ks + j * d.e, bias, b, h, i0 + i, j0 + j), m[i], l[i]);
      if (p != nullptr) p[i * bc + j] = prob;
      ds[i * bc + j] =
          prob == T(0) ? T(0) : prob * (dot<T, T>(gs + i * d.ev, vs + j * d.ev, d.ev) - delta[i]);
    }
  }
};

template <typename S, typename T>
struct KeyValueTiles {
  Dims<T> d;
  TileDims tile;
  const S *q, *k, *v, *bias, *grad;
  const T *stats, *delta;
  T* dk;  // [B*H*Lk, E] or null
  T* dv;  // [B*H*Lk, Ev] or null

  template <typename Block>
  MLK_HOST_DEVICE void operator()(Block& block) const {
    const int64_t br = tile.br, bc = tile.bc;
    const TileOf at(block.index().x, d.lk, bc, d.heads);
    const int64_t bh = at.bh, b = at.b, h = at.h, j0 = at.start, cols = at.count;
    SharedCarver<T> carve{block.template shared<T>()};
    T* ks = carve.take(bc * d.e);
    T* vs = carve.take(bc * d.ev);
    T* dks = carve.take(bc * d.e);
    T* dvs = carve.take(bc * d.ev);
    T* ps = carve.take(br * bc);
    T* ds = carve.take(br * bc);
    const QueryRows<S, T> rows_of = QueryRows<S, T>::carve(carve, br, d.e, d.ev);
    const int64_t key0 = bh * d.lk + j0;
    block.phase([&](const ThreadIndex& t) {
      load_keys(t, d, bc, k, v, bh, j0, cols, ks, vs);
      for (int64_t n = t.thread_rank(); n < bc * d.e; n += t.block_dim.count()) dks[n] = T(0);
      for (int64_t n = t.thread_rank(); n < bc * d.ev; n += t.block_dim.count()) dvs[n] = T(0);
    });
    // Causal: query rows before the tile's first key attend none of its keys.
    for (int64_t i0 = d.causal ? j0 / br * br : 0; i0 < d.lq; i0 += br) {
      const int64_t rows = d.lq - i0 < br ? d.lq - i0 : br;
      block.phase([&](const ThreadIndex& t) {
        rows_of.load(t, d, br, q, grad, stats, delta, bh, i0, rows);
      });
      block.phase([&](const ThreadIndex& t) {
        rows_of.score_grads(t, d, bc, ks, vs, bias, b, h, i0, rows, j0, cols, ds, ps);
      });
      block.phase([&](const ThreadIndex& t) {
        for (int64_t n = t.thread_rank(); n < cols * d.e; n += t.block_dim.count()) {
          const int64_t j = n / d.e, e = n % d.e;
          for (int64_t i = 0; i < rows; ++i) {
            const T g = ds[i * bc + j];
            if (g != T(0)) dks[n] += g * rows_of.qs[i * d.e + e];
          }
        }
        for (int64_t n = t.thread_rank(); n < cols * d.ev; n += t.block_dim.count()) {
          const int64_t j = n / d.ev, e = n % d.ev;
          for (int64_t i = 0; i < rows; ++i) {
            const T p = ps[i * bc + j];
            if (p != T(0)) dvs[n] += p * rows_of.gs[i * d.ev + e];
          }
        }
      });
    }
    block.phase([&](const ThreadIndex& t) {
      for (int64_t n = t.thread_rank(); n < cols * d.e && dk != nullptr; n += t.block_dim.count()) {
        dk[key0 * d.e + n] = dks[n] * d.scale;
      }
      for (int64_t n = t.thread_rank(); n < cols * d.ev && dv != nullptr;
           n += t.block_dim.count()) {
        dv[key0 * d.ev + n] = dvs[n];
      }
    });
  }
};

template <typename S, typename T>
struct QueryTiles {
  Dims<T> d;
  TileDims tile;
  const S *q, *k, *v, *bias, *grad;
  const T *stats, *delta;
  T* dq;  // [B*H*Lq, E]

  template <typename Block>
  MLK_HOST_DEVICE void operator()(Block& block) const {
    const int64_t br = tile.br, bc = tile.bc;
    const TileOf at(block.index().x, d.lq, br, d.heads);
    const int64_t bh = at.bh, b = at.b, h = at.h, i0 = at.start, rows = at.count;
    SharedCarver<T> carve{block.template shared<T>()};
    T* dqs = carve.take(br * d.e);
    T* ks = carve.take(bc * d.e);
    T* vs = carve.take(bc * d.ev);
    T* ds = carve.take(br * bc);
    const QueryRows<S, T> rows_of = QueryRows<S, T>::carve(carve, br, d.e, d.ev);
    block.phase([&](const ThreadIndex& t) {
      rows_of.load(t, d, br, q, grad, stats, delta, bh, i0, rows);
      for (int64_t n = t.thread_rank(); n < br * d.e; n += t.block_dim.count()) dqs[n] = T(0);
    });
    // Causal: keys after the tile's last query row are masked for all of its rows.
    const int64_t key_end = d.causal && i0 + rows < d.lk ? i0 + rows : d.lk;
    for (int64_t j0 = 0; j0 < key_end; j0 += bc) {
      const int64_t cols = d.lk - j0 < bc ? d.lk - j0 : bc;
      block.phase([&](const ThreadIndex& t) { load_keys(t, d, bc, k, v, bh, j0, cols, ks, vs); });
      block.phase([&](const ThreadIndex& t) {
        rows_of.score_grads(t, d, bc, ks, vs, bias, b, h, i0, rows, j0, cols, ds,
                            static_cast<T*>(nullptr));
      });
      block.phase([&](const ThreadIndex& t) {
        for (int64_t n = t.thread_rank(); n < rows * d.e; n += t.block_dim.count()) {
          const int64_t i = n / d.e, e = n % d.e;
          for (int64_t j = 0; j < cols; ++j) {
            const T g = ds[i * bc + j];
            if (g != T(0)) dqs[n] += g * ks[j * d.e + e];
          }
        }
      });
    }
    block.phase([&](const ThreadIndex& t) {
      const int64_t row0 = bh * d.lq + i0;
      for (int64_t n = t.thread_rank(); n < rows * d.e; n += t.block_dim.count()) {
        dq[row0 * d.e + n] = dqs[n] * d.scale;
      }
    });
  }
};

template <typename S, typename T>
struct BiasTiles {
  Dims<T> d;
  TileDims tile;
  BiasShape shape;  // the bias's sizes: each 1 (broadcast) or the scores'
  const S *q, *k, *v, *bias, *grad;
  const T *stats, *delta;
  T* dbias;  // the bias's shape, contiguous

  template <typename Block>
  MLK_HOST_DEVICE void operator()(Block& block) const {
    const int64_t br = tile.br, bc = tile.bc;
    const int64_t* size = shape.size;
    // A block owns rows [t0, t0 + trows) and columns [u0, u0 + tcols) of one (bb, bh) slice of
    // the bias; along a broadcast dimension the slice is one row or column that sums them all.
    const int64_t row_tiles = tile_count(size[2], br), col_tiles = tile_count(size[3], bc);
    int64_t n = block.index().x;
    const int64_t u0 = n % col_tiles * bc;
    n /= col_tiles;
    const int64_t t0 = n % row_tiles * br;
    n /= row_tiles;
    const int64_t h_own = n % size[1], b_own = n / size[1];
    const int64_t trows = size[2] - t0 < br ? size[2] - t0 : br;
    const int64_t tcols = size[3] - u0 < bc ? size[3] - u0 : bc;
    const bool all_rows = size[2] == 1, all_cols = size[3] == 1;
    SharedCarver<T> carve{block.template shared<T>()};
    T* ks = carve.take(bc * d.e);
    T* vs = carve.take(bc * d.ev);
    T* ds = carve.take(br * bc);
    T* acc = carve.take(br * bc);
    const QueryRows<S, T> rows_of = QueryRows<S, T>::carve(carve, br, d.e, d.ev);
    block.phase([&](const ThreadIndex& t) {
      for (int64_t i = t.thread_rank(); i < br * bc; i += t.block_dim.count()) acc[i] = T(0);
    });
    for (int64_t b = size[0] == 1 ? 0 : b_own; b < (size[0] == 1 ? d.batch : b_own + 1); ++b) {
      for (int64_t h = size[1] == 1 ? 0 : h_own; h < (size[1] == 1 ? d.heads : h_own + 1); ++h) {
        const int64_t bh = b * d.heads + h;
        for (int64_t i0 = all_rows ? 0 : t0; i0 < (all_rows ? d.lq : t0 + 1); i0 += br) {
          const int64_t rows = all_rows ? (d.lq - i0 < br ? d.lq - i0 : br) : trows;
          for (int64_t j0 = all_cols ? 0 : u0; j0 < (all_cols ? d.lk : u0 + 1); j0 += bc) {
            const int64_t cols = all_cols ? (d.lk - j0 < bc ? d.lk - j0 : bc) : tcols;
            block.phase([&](const ThreadIndex& t) {
              rows_of.load(t, d, br, q, grad, stats, delta, bh, i0, rows);
              load_keys(t, d, bc, k, v, bh, j0, cols, ks, vs);
            });
            block.phase([&](const ThreadIndex& t) {
              rows_of.score_grads(t, d, bc, ks, vs, bias, b, h, i0, rows, j0, cols, ds,
                                  static_cast<T*>(nullptr));
            });
            // Each thread adds up the dS entries of the bias entries it owns.
            block.phase([&](const ThreadIndex& t) {
              for (int64_t m = t.thread_rank(); m < trows * tcols; m += t.block_dim.count()) {
                const int64_t ti = m / tcols, tj = m % tcols;
                T sum = acc[ti * bc + tj];
                for (int64_t i = all_rows ? 0 : ti; i < (all_rows ? rows : ti + 1); ++i) {
                  for (int64_t j = all_cols ? 0 : tj; j < (all_cols ? cols : tj + 1); ++j) {
                    sum += ds[i * bc + j];
                  }
                }
                acc[ti * bc + tj] = sum;
              }
            });
          }
        }
      }
    }
    block.phase([&](const ThreadIndex& t) {
      const int64_t slice = (b_own * size[1] + h_own) * size[2] * size[3];
      for (int64_t m = t.thread_rank(); m < trows * tcols; m += t.block_dim.count()) {
        const int64_t ti = m / tcols, tj = m % tcols;
        dbias[slice + (t0 + ti) * size[3] + u0 + tj] = acc[ti * bc + tj];
      }
    });
  }
};

}  // namespace attention
}  // namespace mlk
