// The CPU's attention kernels: chunks of heads of one image, in parallel, each through ATen's
// batched matrix products (its BLAS) and vectorized element-wise ops on its own thread, so the
// scores exist only per chunk (at most kChunkBytes per thread, not [B, H, Lq, Lk]); the
// log-sum-exp of every query row is kept, and the backward recomputes the probabilities from it.
// Results are the same run to run at a given thread count (a broadcast bias's gradient adds up per
// thread, then over threads in order). The CUDA kernels (attention_kernels.h) compute the same
// values, one thread per row.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../common/cpu_runner.h"
#include "attention_kernels.h"

namespace mlk {
namespace attention {
namespace {

// Scores per chunk: within a core's L2 cache (the backward holds two such buffers), and large
// enough to amortize the overhead of a chunk's ~15 ATen calls.
constexpr int64_t kChunkBytes = int64_t(256) << 10;
constexpr double kInf = std::numeric_limits<double>::infinity();

// Inputs in the accumulation type (float32 for float16/bfloat16), and the chunking.
struct Chunked {
  at::Tensor q, k, v, bias;  // bias: 4-D, broadcast dims of size 1, or undefined
  at::Tensor causal_mask;    // [Lq, Lk] true where j > i, or undefined
  int64_t batch, heads, heads_per_chunk;
  double scale;

  Chunked(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
          const MaybeTensor& bias_in, double scale_in, bool is_causal)
      : batch(query.size(0)), heads(query.size(1)), scale(scale_in) {
    const auto acc = accumulation_type(query.scalar_type());
    // Detached: the chunks run on ATen's worker threads, whose grad mode is not the caller's.
    q = query.detach().to(acc);
    k = key.detach().to(acc);
    v = value.detach().to(acc);
    if (has_bias(bias_in)) bias = bias_in->detach().to(acc);
    const int64_t lq = query.size(2), lk = key.size(2);
    if (is_causal) {
      causal_mask = at::ones({lq, lk}, query.options().dtype(at::kBool)).triu(1);
    }
    const int64_t per_head = std::max<int64_t>(1, lq * lk * at::elementSize(acc));
    heads_per_chunk = std::clamp<int64_t>(kChunkBytes / per_head, 1, std::max<int64_t>(heads, 1));
  }

  // The slice [b, h0:h1] of a [B, H, ...] tensor, or of the bias along its non-broadcast dims.
  static at::Tensor slice(const at::Tensor& t, int64_t b, int64_t h0, int64_t h1) {
    const at::Tensor row = t.size(0) == 1 ? t.narrow(0, 0, 1) : t.narrow(0, b, 1);
    return t.size(1) == 1 ? row : row.narrow(1, h0, h1 - h0);
  }

  // (q k^T) * scale + bias, -inf where causal masks: [1, h, Lq, Lk]. In that order, as the
  // reference and the CUDA kernels, so scores near the dtype's limit overflow alike (a baddbmm
  // with alpha = scale and the bias as its initial value saves two passes but rounds, and
  // overflows, differently).
  at::Tensor scores(int64_t b, int64_t h0, int64_t h1) const {
    at::Tensor s =
        at::bmm(slice(q, b, h0, h1).select(0, 0), slice(k, b, h0, h1).select(0, 0).transpose(1, 2));
    s.mul_(scale);
    if (bias.defined()) s.add_(slice(bias, b, h0, h1).select(0, 0));
    if (causal_mask.defined()) s.masked_fill_(causal_mask, -kInf);
    return s.unsqueeze(0);
  }

  // The softmax of the scores over keys, normalized before the product with the values (so huge
  // values overflow no sooner than the result does); a fully masked row (all -inf) gives zeros,
  // a NaN score a NaN row. The backward recomputes exactly these probabilities (not exp(s - lse):
  // lse rounds away the row sum's digits when the scores are large). Optionally returns the row
  // maximum (0 for a fully masked row) and sum of exp(s - max) (0 there), [1, h, Lq, 1].
  at::Tensor probabilities(int64_t b, int64_t h0, int64_t h1, at::Tensor* max_out = nullptr,
                           at::Tensor* sum_out = nullptr) const {
    at::Tensor p = scores(b, h0, h1);
    at::Tensor m = p.amax(-1, /*keepdim=*/true);
    m.masked_fill_(m == -kInf, 0);
    p.sub_(m).exp_();
    at::Tensor l = p.sum(-1, /*keepdim=*/true);
    p.div_(l.masked_fill(l == 0, 1));
    if (max_out != nullptr) *max_out = m;
    if (sum_out != nullptr) *sum_out = l;
    return p;
  }

  int64_t chunks_per_image() const { return (heads + heads_per_chunk - 1) / heads_per_chunk; }

  // fn(b, h0, h1) for every chunk, the chunks spread over ATen's threads (each chunk's ATen ops
  // then run on its thread alone, on a chunk that fits the thread's cache). at::parallel_for
  // splits the range statically by thread number, so with a given thread count every chunk
  // always runs on the same thread, in the same order.
  template <typename Fn>
  void for_each_chunk(Fn fn) const {
    const int64_t per_image = chunks_per_image();
    at::parallel_for(0, batch * per_image, 1, [&](int64_t begin, int64_t end) {
      const at::NoGradGuard no_grad;  // worker threads do not inherit the caller's grad mode
      for (int64_t n = begin; n < end; ++n) {
        const int64_t b = n / per_image, h0 = (n % per_image) * heads_per_chunk;
        fn(b, h0, std::min(heads, h0 + heads_per_chunk));
      }
    });
  }
};

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
    return {out.zero_().to(query.scalar_type()), lse.fill_(-kInf)};
  }
  const Chunked c(query, key, value, bias, scale, is_causal);
  c.for_each_chunk([&](int64_t b, int64_t h0, int64_t h1) {
    at::Tensor m, l;
    const at::Tensor p = c.probabilities(b, h0, h1, &m, &l);
    Chunked::slice(out, b, h0, h1).copy_(at::matmul(p, Chunked::slice(c.v, b, h0, h1)));
    // l is 0 only in a fully masked row (an attended key's exp(s - max) is 1).
    const at::Tensor empty = l == 0;
    Chunked::slice(lse, b, h0, h1)
        .copy_(m.add_(l.masked_fill_(empty, 1).log_()).masked_fill_(empty, -kInf).squeeze(-1));
  });
  return {out.to(query.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_kernel(
    const CpuParallelRunner&, const at::Tensor& grad, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const MaybeTensor& bias, const at::Tensor& out,
    const at::Tensor& lse, double scale, bool is_causal, std::array<bool, 4> mask) {
  const char* op = kBackwardOp;
  check_backward_inputs(grad, query, key, value, bias, out, lse, scale);
  const auto acc_options = query.options().dtype(accumulation_type(query.scalar_type()));
  // Zeroed: dbias adds up chunk by chunk, and no chunk runs without keys.
  std::array<at::Tensor, 4> grads =
      allocate_gradients(query, key, value, bias, mask, /*zeroed=*/true);
  at::Tensor &dq = grads[0], &dk = grads[1], &dv = grads[2], &dbias = grads[3];
  if ((mask[0] || mask[1] || mask[2] || mask[3]) && key.size(2) > 0) {
    const Chunked c(query, key, value, bias, scale, is_causal);
    const auto acc = acc_options.dtype();
    const at::Tensor g = grad.detach().to(acc), o = out.detach().to(acc);
    // Dims along which the bias was broadcast: its gradient sums over them.
    std::vector<int64_t> bias_sum_dims;
    if (mask[3]) {
      for (int64_t d = 2; d < 4; ++d) {
        if (bias->size(d) == 1) bias_sum_dims.push_back(d);
      }
    }
    // Chunks that share a slice of a broadcast bias would race on its gradient: each thread then
    // adds into its own copy, and the copies are summed in thread order.
    const bool shared_bias = mask[3] && ((bias->size(0) == 1 && c.batch > 1) ||
                                         (bias->size(1) == 1 && c.chunks_per_image() > 1));
    const at::Tensor per_thread =
        shared_bias ? allocate_zeros(
                          op,
                          [&] {
                            std::vector<int64_t> sizes{at::get_num_threads()};
                            sizes.insert(sizes.end(), bias->sizes().begin(), bias->sizes().end());
                            return sizes;
                          }(),
                          acc_options)
                    : at::Tensor();
    c.for_each_chunk([&](int64_t b, int64_t h0, int64_t h1) {
      const at::Tensor g_c = Chunked::slice(g, b, h0, h1);
      at::Tensor p = c.probabilities(b, h0, h1);
      if (mask[2]) {
        Chunked::slice(dv, b, h0, h1).copy_(at::matmul(p.transpose(-2, -1), g_c));
      }
      if (!(mask[0] || mask[1] || mask[3])) return;
      const at::Tensor delta = (g_c * Chunked::slice(o, b, h0, h1)).sum(-1, /*keepdim=*/true);
      // dS = P * (dO V^T - delta), in place of P's buffer once dV has used P.
      at::Tensor ds = at::matmul(g_c, Chunked::slice(c.v, b, h0, h1).transpose(-2, -1));
      ds.sub_(delta).mul_(p);
      if (mask[0]) {
        Chunked::slice(dq, b, h0, h1).copy_(at::matmul(ds, Chunked::slice(c.k, b, h0, h1)));
      }
      if (mask[1]) {
        Chunked::slice(dk, b, h0, h1)
            .copy_(at::matmul(ds.transpose(-2, -1), Chunked::slice(c.q, b, h0, h1)));
      }
      if (mask[3]) {
        at::Tensor reduced = bias_sum_dims.empty() ? ds : ds.sum(bias_sum_dims, /*keepdim=*/true);
        if (bias->size(1) == 1) reduced = reduced.sum(1, /*keepdim=*/true);
        const at::Tensor target = shared_bias ? per_thread[at::get_thread_num()] : dbias;
        Chunked::slice(target, b, h0, h1).add_(reduced);
      }
    });
    if (shared_bias) at::sum_out(dbias, per_thread, 0);
    if (mask[0]) dq.mul_(scale);
    if (mask[1]) dk.mul_(scale);
  }
  const auto type = query.scalar_type();
  return {dq.to(type), dk.to(type), dv.to(type), dbias.to(type)};
}

}  // namespace attention
}  // namespace mlk

TORCH_LIBRARY_IMPL(mlkernels, CPU, m) {
  mlk::attention::register_attention<mlk::attention::Kernels<mlk::CpuParallelRunner>>(m);
}
