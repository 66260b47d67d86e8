// The attention CUDA kernels, written once over a Runner: CudaRunner (attention_cuda.cu) runs them
// on a GPU, EmulatorRunner (attention_emulated.cpp) on the CPU grid emulator in the tests. Tiled
// cooperative blocks (attention_tiles.h) where a head's tiles fit in shared memory, else one
// thread per output row (attention_math.h); both deterministic, no atomics. The CPU has its own
// kernels (attention_cpu.cpp), declared below.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "attention.h"
#include "attention_tiles.h"

namespace mlk {

struct CpuParallelRunner;  // csrc/common/cpu_runner.h

namespace attention {

using MaybeTensor = std::optional<at::Tensor>;

inline bool has_bias(const MaybeTensor& bias) { return bias.has_value() && bias->defined(); }

// Sizes, scale and the (contiguous) bias's broadcast strides.
template <typename T>
Dims<T> make_dims(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& bias, double scale, bool is_causal) {
  Dims<T> d{q.size(0), q.size(1),    q.size(2),      k.size(2), q.size(3),
            v.size(3), {0, 0, 0, 0}, bias.defined(), is_causal, static_cast<T>(scale)};
  for (int64_t i = 0; bias.defined() && i < 4; ++i) {
    d.bias_stride[i] = bias.size(i) == 1 ? 0 : bias.stride(i);
  }
  return d;
}

// A launch of `blocks` cooperative tile blocks holding `shared` elements of `elem_bytes` each.
inline LaunchConfig tile_config(int64_t blocks, int64_t shared, int64_t elem_bytes) {
  LaunchConfig config;
  config.grid.x = blocks;
  config.block.x = kTileThreads;
  config.shared_bytes = shared * elem_bytes;
  return config;
}

// The CPU's own kernels (attention_cpu.cpp: chunks of heads through ATen's batched matrix
// products): for CpuParallelRunner, overload resolution picks them over the runner templates.
std::tuple<at::Tensor, at::Tensor> forward_kernel(const CpuParallelRunner& run,
                                                  const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value, const MaybeTensor& bias,
                                                  double scale, bool is_causal);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_kernel(
    const CpuParallelRunner& run, const at::Tensor& grad, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const MaybeTensor& bias, const at::Tensor& out,
    const at::Tensor& lse, double scale, bool is_causal, std::array<bool, 4> mask);

template <typename Runner>
std::tuple<at::Tensor, at::Tensor> forward_kernel(const Runner& run, const at::Tensor& query,
                                                  const at::Tensor& key, const at::Tensor& value,
                                                  const MaybeTensor& bias, double scale,
                                                  bool is_causal) {
  check_inputs(kOp, query, key, value, bias, scale);
  const auto acc_options = query.options().dtype(accumulation_type(query.scalar_type()));
  const int64_t rows = query.size(0) * query.size(1) * query.size(2);
  auto out = allocate_output(kOp, {query.size(0), query.size(1), query.size(2), value.size(3)},
                             acc_options);
  auto lse = allocate_output(kOp, {query.size(0), query.size(1), query.size(2)}, acc_options);
  if (rows > 0) {
    const auto q = contiguous_input(kOp, "query", query);
    const auto k = contiguous_input(kOp, "key", key);
    const auto v = contiguous_input(kOp, "value", value);
    const auto b = has_bias(bias) ? contiguous_input(kOp, "bias", *bias) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention", [&] {
      using T = at::opmath_type<scalar_t>;
      const Dims<T> d = make_dims<T>(q, k, v, b, scale, is_causal);
      const scalar_t* qp = q.data_ptr<scalar_t>();
      const scalar_t* kp = k.data_ptr<scalar_t>();
      const scalar_t* vp = v.data_ptr<scalar_t>();
      const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
      T* out_p = out.data_ptr<T>();
      T* lse_p = lse.data_ptr<T>();
      const TileDims tiles = choose_tiles(d.lq, d.lk, d.e, d.ev, sizeof(T));
      if (tiles.br > 0) {
        run.blocks(tile_config(d.batch * d.heads * tile_count(d.lq, tiles.br),
                               forward_shared(tiles.br, tiles.bc, d.e, d.ev), sizeof(T)),
                   ForwardTiles<scalar_t, T>{d, tiles, qp, kp, vp, bp, out_p, lse_p, nullptr});
      } else {
        run.threads(launch_config_1d(rows), [=] MLK_LAMBDA(const ThreadIndex& t) {
          forward_thread(t, d, qp, kp, vp, bp, out_p, lse_p);
        });
      }
    });
  }
  return {out.to(query.scalar_type()), lse};
}

template <typename Runner>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_kernel(
    const Runner& run, const at::Tensor& grad, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const MaybeTensor& bias, const at::Tensor& out, const at::Tensor& lse,
    double scale, bool is_causal, std::array<bool, 4> mask) {
  const char* op = kBackwardOp;
  check_backward_inputs(grad, query, key, value, bias, out, lse, scale);
  const auto acc_options = query.options().dtype(accumulation_type(query.scalar_type()));
  // Not zeroed: every thread writes each element it owns.
  std::array<at::Tensor, 4> grads =
      allocate_gradients(query, key, value, bias, mask, /*zeroed=*/false);
  at::Tensor &dq = grads[0], &dk = grads[1], &dv = grads[2], &dbias = grads[3];
  const int64_t rows = query.size(0) * query.size(1) * query.size(2);
  const int64_t key_rows = key.size(0) * key.size(1) * key.size(2);
  if (mask[0] || mask[1] || mask[2] || mask[3]) {
    const auto q = contiguous_input(op, "query", query);
    const auto k = contiguous_input(op, "key", key);
    const auto v = contiguous_input(op, "value", value);
    const auto g = contiguous_input(op, "grad", grad);
    const auto o = contiguous_input(op, "out", out);
    const auto b = has_bias(bias) ? contiguous_input(op, "bias", *bias) : at::Tensor();
    // The probabilities are recomputed as the forward's (row maximum and sum per row), not from
    // lse, which rounds the sum's digits away when the scores are large.
    auto delta = allocate_output(op, {rows}, acc_options);
    auto stats = allocate_output(op, {rows, 2}, acc_options);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, q.scalar_type(), "attention_backward", [&] {
          using T = at::opmath_type<scalar_t>;
          const Dims<T> d = make_dims<T>(q, k, v, b, scale, is_causal);
          const scalar_t* qp = q.data_ptr<scalar_t>();
          const scalar_t* kp = k.data_ptr<scalar_t>();
          const scalar_t* vp = v.data_ptr<scalar_t>();
          const scalar_t* gp = g.data_ptr<scalar_t>();
          const scalar_t* op_ = o.data_ptr<scalar_t>();
          const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
          T* delta_p = delta.data_ptr<T>();
          T* lp = stats.data_ptr<T>();
          const BiasShape shape{{b.defined() ? b.size(0) : 1, b.defined() ? b.size(1) : 1,
                                 b.defined() ? b.size(2) : 1, b.defined() ? b.size(3) : 1}};
          run.threads(launch_config_1d(rows), [=] MLK_LAMBDA(const ThreadIndex& t) {
            delta_thread(t, d, gp, op_, delta_p);
          });
          const TileDims tiles = choose_tiles(d.lq, d.lk, d.e, d.ev, sizeof(T));
          if (tiles.br > 0) {
            const int64_t heads = d.batch * d.heads, elem = sizeof(T);
            run.blocks(tile_config(heads * tile_count(d.lq, tiles.br),
                                   forward_shared(tiles.br, tiles.bc, d.e, d.ev), elem),
                       ForwardTiles<scalar_t, T>{d, tiles, qp, kp, vp, bp, nullptr, nullptr, lp});
            if (mask[1] || mask[2]) {
              run.blocks(tile_config(heads * tile_count(d.lk, tiles.bc),
                                     key_value_shared(tiles.br, tiles.bc, d.e, d.ev), elem),
                         KeyValueTiles<scalar_t, T>{d, tiles, qp, kp, vp, bp, gp, lp, delta_p,
                                                    mask[1] ? dk.data_ptr<T>() : nullptr,
                                                    mask[2] ? dv.data_ptr<T>() : nullptr});
            }
            if (mask[0]) {
              run.blocks(tile_config(heads * tile_count(d.lq, tiles.br),
                                     query_shared(tiles.br, tiles.bc, d.e, d.ev), elem),
                         QueryTiles<scalar_t, T>{d, tiles, qp, kp, vp, bp, gp, lp, delta_p,
                                                 dq.data_ptr<T>()});
            }
            if (mask[3]) {
              run.blocks(tile_config(b.size(0) * b.size(1) * tile_count(b.size(2), tiles.br) *
                                         tile_count(b.size(3), tiles.bc),
                                     bias_shared(tiles.br, tiles.bc, d.e, d.ev), elem),
                         BiasTiles<scalar_t, T>{d, tiles, shape, qp, kp, vp, bp, gp, lp, delta_p,
                                                dbias.data_ptr<T>()});
            }
            return;
          }
          run.threads(launch_config_1d(rows),
                      [=] MLK_LAMBDA(const ThreadIndex& t) { row_thread(t, d, qp, kp, bp, lp); });
          if (mask[0]) {
            T* dq_p = dq.data_ptr<T>();
            run.threads(launch_config_1d(rows), [=] MLK_LAMBDA(const ThreadIndex& t) {
              grad_query_thread(t, d, qp, kp, vp, bp, gp, lp, delta_p, dq_p);
            });
          }
          if (mask[1] || mask[2]) {
            T* dk_p = mask[1] ? dk.data_ptr<T>() : nullptr;
            T* dv_p = mask[2] ? dv.data_ptr<T>() : nullptr;
            run.threads(launch_config_1d(key_rows), [=] MLK_LAMBDA(const ThreadIndex& t) {
              grad_key_value_thread(t, d, qp, kp, vp, bp, gp, lp, delta_p, dk_p, dv_p);
            });
          }
          if (mask[3]) {
            T* db_p = dbias.data_ptr<T>();
            run.threads(launch_config_1d(b.numel()), [=] MLK_LAMBDA(const ThreadIndex& t) {
              grad_bias_thread(t, d, shape, qp, kp, vp, bp, gp, lp, delta_p, db_p);
            });
          }
        });
  }
  const auto type = query.scalar_type();
  return {dq.to(type), dk.to(type), dv.to(type), dbias.to(type)};
}

// Every op of the family with the dispatcher's signatures, over one Runner.
template <typename Runner>
struct Kernels {
  static std::tuple<at::Tensor, at::Tensor> scaled_dot_product_attention(
      const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
      const MaybeTensor& bias, double scale, bool is_causal) {
    return forward_kernel(Runner::on(query), query, key, value, bias, scale, is_causal);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  scaled_dot_product_attention_backward(const at::Tensor& grad, const at::Tensor& query,
                                        const at::Tensor& key, const at::Tensor& value,
                                        const MaybeTensor& bias, const at::Tensor& out,
                                        const at::Tensor& lse, double scale, bool is_causal,
                                        std::array<bool, 4> output_mask) {
    return backward_kernel(Runner::on(query), grad, query, key, value, bias, out, lse, scale,
                           is_causal, output_mask);
  }
};

// The family's registration, written once.
template <typename K>
void register_attention(torch::Library& m) {
  m.impl("scaled_dot_product_attention", &K::scaled_dot_product_attention);
  m.impl("scaled_dot_product_attention_backward", &K::scaled_dot_product_attention_backward);
}

}  // namespace attention
}  // namespace mlk
