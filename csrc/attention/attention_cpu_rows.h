// The vector code of the CPU attention kernel (attention_cpu.cpp): row operations (the float
// versions compiled for AVX-512, AVX2 and the baseline, the loader picking the best the CPU has
// through target_clones; they work on 16-float vectors of the compiler's vector extension
// whatever the instruction set, so every clone adds in the same order; float64 runs plain loops)
// and the matrix products (below). Results are the same run to run on one machine.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// The vectors never cross a call (every helper is inlined): the ABI note on them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#define MLK_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
// exp's polynomial with fused products where the instruction set has them.
#define MLK_CPU_CLONES_FUSED                                            \
  __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default"), \
                 optimize("fp-contract=fast")))
#else
#define MLK_CPU_CLONES
#define MLK_CPU_CLONES_FUSED
#endif

namespace mlk {
namespace attention {
namespace rows {

constexpr int kLanes = 16;
typedef float Floats __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline __attribute__((always_inline)) Floats load(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline __attribute__((always_inline)) void store(float* p, Floats v) {
  std::memcpy(p, &v, sizeof(v));
}
inline __attribute__((always_inline)) Floats splat(float x) {
  Floats v;
  for (int i = 0; i < kLanes; ++i) v[i] = x;
  return v;
}
// Lanes of a where mask is set (all bits), else of b.
inline __attribute__((always_inline)) Floats select(Ints mask, Floats a, Floats b) {
  Ints ai, bi;
  std::memcpy(&ai, &a, sizeof(a));
  std::memcpy(&bi, &b, sizeof(b));
  const Ints r = (ai & mask) | (bi & ~mask);
  Floats out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
}

// exp(x) for x <= 0 (the scores minus their row maximum), -inf included (gives 0): Cephes'
// single-precision exp (range reduction by ln 2 in two parts, a degree-5 polynomial; within 2
// ulp of the exact value), down into float's subnormal range as std::exp: a probability of 1e-40
// times a key of 1e30 is not negligible in a gradient.
inline __attribute__((always_inline)) Floats exp_nonpositive(Floats x) {
  const Ints underflow = x < splat(-104.0f);  // exp < 2^-150: rounds to 0
  x = select(underflow, splat(-104.0f), x);   // keeps the arithmetic finite; those lanes become 0
  const Floats big = splat(12582912.0f);      // 1.5 * 2^23: adding it rounds to an integer
  const Floats n = (x * splat(1.44269504088896341f) + big) - big;
  const Floats r = (x - n * splat(0.693359375f)) - n * splat(-2.12194440e-4f);
  Floats p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  const Floats e = p * (r * r) + r + splat(1.0f);
  // 2^n as 2^half * 2^(n - half), each a normal float for n >= -150, so that the one rounding is
  // the last product's (into the subnormals when n < -126).
  const Ints whole = __builtin_convertvector(n, Ints), half = whole >> 1;
  const Ints bits_a = (half + 127) << 23, bits_b = (whole - half + 127) << 23;
  Floats scale_a, scale_b;
  std::memcpy(&scale_a, &bits_a, sizeof(scale_a));
  std::memcpy(&scale_b, &bits_b, sizeof(scale_b));
  return select(underflow, splat(0.0f), (e * scale_a) * scale_b);
}

// row[j] = row[j] * scale (+ bias[j * bias_stride]) for j < n, in that order (as the reference);
// returns the largest value (-inf if none) and sets *nan when a value is NaN.
template <typename T>
inline __attribute__((always_inline)) T scale_bias_max_impl(T* row, int64_t n, T scale,
                                                            const T* bias, int64_t bias_stride,
                                                            bool* nan) {
  T m = -std::numeric_limits<T>::infinity();
  bool any_nan = false;
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (bias == nullptr || bias_stride == 1) {
      Floats vm = splat(m);
      Ints vnan = {};
      for (; j + kLanes <= n; j += kLanes) {
        Floats s = load(row + j) * splat(scale);
        if (bias != nullptr) s = s + load(bias + j);
        store(row + j, s);
        vm = select(s > vm, s, vm);
        vnan = vnan | (s != s);
      }
      for (int i = 0; i < kLanes; ++i) {
        m = std::max(m, vm[i]);
        any_nan = any_nan || vnan[i] != 0;
      }
    }
  }
  for (; j < n; ++j) {
    T s = row[j] * scale;
    if (bias != nullptr) s += bias[j * bias_stride];
    row[j] = s;
    m = std::max(m, s);
    any_nan = any_nan || s != s;
  }
  *nan = any_nan;
  return m;
}

// row[j] = exp(row[j] - shift) for j < n; returns their sum. row[j] - shift <= 0 (shift is the
// row's maximum) or -inf.
template <typename T>
inline __attribute__((always_inline)) T exp_sum_impl(T* row, int64_t n, T shift) {
  T sum = 0;
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    Floats acc = splat(0.0f);
    for (; j + kLanes <= n; j += kLanes) {
      const Floats e = exp_nonpositive(load(row + j) - splat(shift));
      store(row + j, e);
      acc = acc + e;
    }
    if (j < n) {  // the tail, as one vector padded with -inf (whose exp is 0)
      float tail[kLanes];
      std::fill(tail, tail + kLanes, -std::numeric_limits<float>::infinity());
      std::copy(row + j, row + n, tail);
      const Floats e = exp_nonpositive(load(tail) - splat(shift));
      store(tail, e);
      std::copy(tail, tail + (n - j), row + j);
      acc = acc + e;
    }
    for (int i = 0; i < kLanes; ++i) sum += acc[i];
  } else {
    for (; j < n; ++j) {
      row[j] = std::exp(row[j] - shift);
      sum += row[j];
    }
  }
  return sum;
}

// row[j] *= factor (the reciprocal of the row sum: within an ulp of dividing, at a tenth of the
// cost).
template <typename T>
inline __attribute__((always_inline)) void multiply_impl(T* row, int64_t n, T factor) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kLanes <= n; j += kLanes) store(row + j, load(row + j) * splat(factor));
  }
  for (; j < n; ++j) row[j] *= factor;
}

// The softmax's backward in place: ds[j] = p[j] * (ds[j] - delta), ds holding dO . v_j on entry
// and delta = dO . O.
template <typename T>
inline __attribute__((always_inline)) void softmax_grad_impl(T* ds, const T* p, int64_t n,
                                                             T delta) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kLanes <= n; j += kLanes) {
      store(ds + j, load(p + j) * (load(ds + j) - splat(delta)));
    }
  }
  for (; j < n; ++j) ds[j] = p[j] * (ds[j] - delta);
}

// dst[j * stride] += src[j] (stride 0: dst[0] += the sum of src, added in order).
template <typename T>
inline __attribute__((always_inline)) void accumulate_impl(T* dst, int64_t stride, const T* src,
                                                           int64_t n) {
  if (stride == 0) {
    T sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += src[j];
    dst[0] += sum;
    return;
  }
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) {
      for (; j + kLanes <= n; j += kLanes) store(dst + j, load(dst + j) + load(src + j));
    }
  }
  for (; j < n; ++j) dst[j * stride] += src[j];
}

// The entry points: float cloned per instruction set, double plain.
MLK_CPU_CLONES inline float scale_bias_max(float* row, int64_t n, float scale, const float* bias,
                                           int64_t bias_stride, bool* nan) {
  return scale_bias_max_impl(row, n, scale, bias, bias_stride, nan);
}
inline double scale_bias_max(double* row, int64_t n, double scale, const double* bias,
                             int64_t bias_stride, bool* nan) {
  return scale_bias_max_impl(row, n, scale, bias, bias_stride, nan);
}
MLK_CPU_CLONES_FUSED inline float exp_sum(float* row, int64_t n, float shift) {
  return exp_sum_impl(row, n, shift);
}
inline double exp_sum(double* row, int64_t n, double shift) { return exp_sum_impl(row, n, shift); }
template <typename T>
inline __attribute__((always_inline)) void divide_impl(T* row, int64_t n, T d) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kLanes <= n; j += kLanes) store(row + j, load(row + j) / splat(d));
  }
  for (; j < n; ++j) row[j] /= d;
}
MLK_CPU_CLONES inline void divide(float* row, int64_t n, float d) { divide_impl(row, n, d); }
inline void divide(double* row, int64_t n, double d) { divide_impl(row, n, d); }
MLK_CPU_CLONES inline void multiply(float* row, int64_t n, float factor) {
  multiply_impl(row, n, factor);
}
inline void multiply(double* row, int64_t n, double factor) { multiply_impl(row, n, factor); }
MLK_CPU_CLONES inline void softmax_grad(float* ds, const float* p, int64_t n, float delta) {
  softmax_grad_impl(ds, p, n, delta);
}
inline void softmax_grad(double* ds, const double* p, int64_t n, double delta) {
  softmax_grad_impl(ds, p, n, delta);
}
MLK_CPU_CLONES inline void accumulate(float* dst, int64_t stride, const float* src, int64_t n) {
  accumulate_impl(dst, stride, src, n);
}
inline void accumulate(double* dst, int64_t stride, const double* src, int64_t n) {
  accumulate_impl(dst, stride, src, n);
}

// ---- matrix products ----
//
// C[M, N] = A[M, K] B[K, N] (or C += A B) for the attention kernel's small products (K or N is a
// head dimension): a register-blocked kernel that streams rows of B as vectors and broadcasts
// entries of A, so neither operand is packed (BLAS packs both on every call, as much work as the
// product itself at these sizes). A is read through strides, so A^T costs nothing; B and C are
// row-major with N a multiple of 16 (the callers pad). Each C entry adds its K products in order.
// Compiled for AVX-512 and AVX2 with FMA (picked at run time) and for the baseline.

// Vectors of `Bytes` bytes of T: 64 for AVX-512, 32 for AVX2, 16 for the baseline (SSE2), so
// that a block's accumulators fit the registers of each.
template <typename T, int Bytes>
struct Lanes {
  static constexpr int kCount = Bytes / sizeof(T);
  typedef T Vec __attribute__((vector_size(Bytes)));
};

// C[MR rows, NV vectors] (+)= A[MR, K] B[K, NV vectors].
template <typename T, int Bytes, int MR, int NV>
inline __attribute__((always_inline)) void gemm_block(int64_t k, const T* a, int64_t a_row,
                                                      int64_t a_col, const T* b, int64_t ldb, T* c,
                                                      int64_t ldc, bool accumulate) {
  using Vec = typename Lanes<T, Bytes>::Vec;
  constexpr int kW = Lanes<T, Bytes>::kCount;
  Vec acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      if (accumulate) {
        std::memcpy(&acc[r][v], c + r * ldc + v * kW, sizeof(Vec));
      } else {
        acc[r][v] = Vec{};
      }
    }
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], b + kk * ldb + v * kW, sizeof(Vec));
    for (int r = 0; r < MR; ++r) {
      // A broadcast: x - (+0) is x for every x, so the subtraction folds away.
      const Vec av = a[r * a_row + kk * a_col] - Vec{};
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) std::memcpy(c + r * ldc + v * kW, &acc[r][v], sizeof(Vec));
  }
}

// The rows of one column strip: blocks of MR rows, the rest in blocks of 4, 2 and 1.
template <typename T, int Bytes, int MR, int NV>
inline __attribute__((always_inline)) void gemm_strip(int64_t m, int64_t k, const T* a,
                                                      int64_t a_row, int64_t a_col, const T* b,
                                                      int64_t ldb, T* c, int64_t ldc,
                                                      bool accumulate) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) {
    gemm_block<T, Bytes, MR, NV>(k, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc,
                                 accumulate);
  }
  if (MR > 4 && i + 4 <= m) {
    gemm_block<T, Bytes, 4, NV>(k, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc,
                                accumulate);
    i += 4;
  }
  if (MR > 2 && i + 2 <= m) {
    gemm_block<T, Bytes, 2, NV>(k, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc,
                                accumulate);
    i += 2;
  }
  for (; i < m; ++i) {
    gemm_block<T, Bytes, 1, NV>(k, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc,
                                accumulate);
  }
}

// The whole product: strips of NV vectors, then of single vectors (N is a multiple of 16, so of
// every vector's lane count).
template <typename T, int Bytes, int MR, int NV>
inline __attribute__((always_inline)) void gemm_blocks(int64_t m, int64_t n, int64_t k, const T* a,
                                                       int64_t a_row, int64_t a_col, const T* b,
                                                       int64_t ldb, T* c, int64_t ldc,
                                                       bool accumulate) {
  constexpr int kW = Lanes<T, Bytes>::kCount;
  int64_t j = 0;
  for (; j + NV * kW <= n; j += NV * kW) {
    gemm_strip<T, Bytes, MR, NV>(m, k, a, a_row, a_col, b + j, ldb, c + j, ldc, accumulate);
  }
  for (; j < n; j += kW) {
    gemm_strip<T, Bytes, MR, 1>(m, k, a, a_row, a_col, b + j, ldb, c + j, ldc, accumulate);
  }
}

using GemmFloat = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*,
                           int64_t, float*, int64_t, bool);

#define MLK_GEMM_VARIANT(name, isa, fusion, bytes, mr, nv)                                   \
  __attribute__((target(isa), optimize(fusion))) inline void name(                           \
      int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col,         \
      const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {                 \
    gemm_blocks<float, bytes, mr, nv>(m, n, k, a, a_row, a_col, b, ldb, c, ldc, accumulate); \
  }
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// 6 x 64 floats in 24 of AVX-512's 32 registers; 6 x 16 in 12 of AVX2's 16 (and 2 x 16 in 8 of
// SSE2's 16 for the baseline). "Fused": products
// and sums in one rounding (FMA); "exact": rounded as the reference's (q k^T) rounds, so that
// scores near float's limit overflow where the reference's do.
MLK_GEMM_VARIANT(gemm_avx512_fused, "avx512f", "fp-contract=fast", 64, 6, 4)
MLK_GEMM_VARIANT(gemm_avx512_exact, "avx512f", "fp-contract=off", 64, 6, 4)
MLK_GEMM_VARIANT(gemm_avx2_fused, "avx2,fma", "fp-contract=fast", 32, 6, 2)
MLK_GEMM_VARIANT(gemm_avx2_exact, "avx2", "fp-contract=off", 32, 6, 2)
#endif
inline void gemm_baseline(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row,
                          int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc,
                          bool accumulate) {
  gemm_blocks<float, 16, 2, 4>(m, n, k, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}
#undef MLK_GEMM_VARIANT

// The best variant this CPU runs: [0] exact, [1] fused. MLKERNELS_CPU_CAPABILITY=avx2 or
// =default caps the choice (as ATEN_CPU_CAPABILITY does ATen's), so that the tests run every
// variant on one machine.
struct GemmChoice {
  GemmFloat variant[2];
  GemmChoice() : variant{gemm_baseline, gemm_baseline} {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    const char* cap = std::getenv("MLKERNELS_CPU_CAPABILITY");
    const std::string capability = cap != nullptr ? cap : "";
    __builtin_cpu_init();
    if (capability != "avx2" && capability != "default" && __builtin_cpu_supports("avx512f")) {
      variant[0] = gemm_avx512_exact;
      variant[1] = gemm_avx512_fused;
    } else if (capability != "default" && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma")) {
      variant[0] = gemm_avx2_exact;
      variant[1] = gemm_avx2_fused;
    }
#endif
  }
};

// fused: the products may be fused with the sums (FMA) where the CPU has it; not for the scores.
inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col,
                 const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate,
                 bool fused = true) {
  static const GemmChoice choice;
  choice.variant[fused ? 1 : 0](m, n, k, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}
inline void gemm(int64_t m, int64_t n, int64_t k, const double* a, int64_t a_row, int64_t a_col,
                 const double* b, int64_t ldb, double* c, int64_t ldc, bool accumulate,
                 bool /*fused*/ = true) {
  gemm_blocks<double, 16, 2, 4>(m, n, k, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}

// ---- transposition ----

// dst[c * ld + r] = src[r * row_stride + c] for r < rows, c < cols (the source's columns
// contiguous): the copies of a head's keys and values that the score products read.
inline void transpose_scalar(const float* src, int64_t rows, int64_t cols, int64_t row_stride,
                             float* dst, int64_t ld) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {  // 16 source rows stay in L1 across the columns
    const int64_t r1 = std::min(rows, r0 + 16);
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t r = r0; r < r1; ++r) dst[c * ld + r] = src[r * row_stride + c];
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
typedef float Floats8 __attribute__((vector_size(32)));
typedef int32_t Ints8 __attribute__((vector_size(32)));
// The same vector at any float's address (whole-vector loads and stores: a memcpy into an array
// of vectors became two 16-byte stores and a 32-byte reload, a store-forwarding stall each).
typedef float UnalignedFloats8 __attribute__((vector_size(32), aligned(4), may_alias));

// 8 x 8 blocks in registers (the unpack / shuffle / permute sequence of _MM_TRANSPOSE8), the
// leftover rows and columns by the scalar loop.
__attribute__((target("avx2"))) inline void transpose_avx2(const float* src, int64_t rows,
                                                           int64_t cols, int64_t row_stride,
                                                           float* dst, int64_t ld) {
  const int64_t full_rows = rows / 8 * 8, full_cols = cols / 8 * 8;
  for (int64_t r0 = 0; r0 < full_rows; r0 += 8) {
    for (int64_t c0 = 0; c0 < full_cols; c0 += 8) {
      Floats8 v[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) {
        v[i] = *reinterpret_cast<const UnalignedFloats8*>(src + (r0 + i) * row_stride + c0);
      }
      for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shuffle(v[i], v[i + 1], Ints8{0, 8, 1, 9, 4, 12, 5, 13});
        t[i + 1] = __builtin_shuffle(v[i], v[i + 1], Ints8{2, 10, 3, 11, 6, 14, 7, 15});
      }
      for (int i = 0; i < 8; i += 4) {
        u[i] = __builtin_shuffle(t[i], t[i + 2], Ints8{0, 1, 8, 9, 4, 5, 12, 13});
        u[i + 1] = __builtin_shuffle(t[i], t[i + 2], Ints8{2, 3, 10, 11, 6, 7, 14, 15});
        u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], Ints8{0, 1, 8, 9, 4, 5, 12, 13});
        u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], Ints8{2, 3, 10, 11, 6, 7, 14, 15});
      }
      for (int j = 0; j < 4; ++j) {  // column j from u[j] (rows 0-3) and u[j + 4] (rows 4-7)
        const Floats8 low = __builtin_shuffle(u[j], u[j + 4], Ints8{0, 1, 2, 3, 8, 9, 10, 11});
        const Floats8 high = __builtin_shuffle(u[j], u[j + 4], Ints8{4, 5, 6, 7, 12, 13, 14, 15});
        *reinterpret_cast<UnalignedFloats8*>(dst + (c0 + j) * ld + r0) = low;
        *reinterpret_cast<UnalignedFloats8*>(dst + (c0 + j + 4) * ld + r0) = high;
      }
    }
  }
  // The columns past the last full block of 8, then the rows past it.
  for (int64_t r = 0; r < full_rows; ++r) {
    for (int64_t c = full_cols; c < cols; ++c) dst[c * ld + r] = src[r * row_stride + c];
  }
  for (int64_t r = full_rows; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = src[r * row_stride + c];
  }
}
#endif

inline void transpose(const float* src, int64_t rows, int64_t cols, int64_t row_stride, float* dst,
                      int64_t ld) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool avx2 = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") != 0);
  if (avx2) {
    transpose_avx2(src, rows, cols, row_stride, dst, ld);
    return;
  }
#endif
  transpose_scalar(src, rows, cols, row_stride, dst, ld);
}

// Softmax of one row of n scores in place, the first `end` attended (the rest causally masked):
// scaled and biased (bias_row may be null), minus the row maximum, exp, normalized by the sum. A
// fully masked row gives zeros; a NaN score, or +inf (inf - inf), a NaN row, as the reference's
// softmax. Returns the row maximum (0 for a fully masked row, +inf or NaN for those rows) through
// *max_out and the sum (0 in a fully masked row) through *sum_out: their lse is max + log(sum).
template <typename T>
inline void softmax_row(T* row, int64_t n, int64_t end, T scale, const T* bias_row,
                        int64_t bias_stride, T* max_out, T* sum_out) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  bool nan = false;
  const T m = scale_bias_max(row, end, scale, bias_row, bias_stride, &nan);
  if (nan || m == inf) {
    std::fill(row, row + n, std::numeric_limits<T>::quiet_NaN());
    // log(sum exp) is still +inf when a score is +inf and none NaN.
    *max_out = nan ? std::numeric_limits<T>::quiet_NaN() : inf;
    *sum_out = T(1);
    return;
  }
  const T shift = m == -inf ? T(0) : m;
  const T sum = exp_sum(row, end, shift);
  std::fill(row + end, row + n, T(0));
  if (sum != T(0)) divide(row, end, sum);
  *max_out = shift;
  *sum_out = sum;
}

}  // namespace rows
}  // namespace attention
}  // namespace mlk
