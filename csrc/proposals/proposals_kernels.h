// The CUDA kernels of nms, batched_nms and propose, written once over a Runner: CudaRunner
// (proposals_cuda.cu) launches them on a GPU, EmulatorRunner (proposals_emulated.cpp) runs the
// same code on the CPU grid emulator. Sorting, gathering and the sigmoid are ATen calls on the
// device.
#pragma once

#include <torch/library.h>

#include <array>
#include <type_traits>
#include <utility>

#include "proposals.h"

// The block functors below are __host__ __device__ templates over the block type; each
// instantiation calls only the functions of its own side (DeviceBlock on the device, the
// emulator's Block on the host), which nvcc's cross-space check cannot see through.
#if defined(__CUDACC__)
#define MLK_EXEC_CHECK_DISABLE _Pragma("nv_exec_check_disable")
#else
#define MLK_EXEC_CHECK_DISABLE
#endif

namespace mlk {

struct CpuParallelRunner;  // csrc/common/cpu_runner.h

namespace proposals {

// Mask kernel block (see proposals_math.h): column boxes to shared memory, then one mask word per
// row.
template <typename T>
struct NmsMaskBlock {
  int64_t n;
  const T* boxes;
  const int64_t* groups;
  T threshold;
  uint64_t* mask;

  MLK_EXEC_CHECK_DISABLE
  template <typename Block>
  MLK_HOST_DEVICE void operator()(Block& block) const {
    T* col_boxes = block.template shared<T>();
    int64_t* col_groups = reinterpret_cast<int64_t*>(col_boxes + 4 * kMaskBits);
    const NmsMaskBlock& k = *this;
    block.phase([&](const ThreadIndex& t) {
      nms_mask_load(t, k.n, k.boxes, k.groups, col_boxes, col_groups);
    });
    block.phase([&](const ThreadIndex& t) {
      nms_mask_row(t, k.n, k.boxes, k.groups, k.threshold, col_boxes, col_groups, k.mask);
    });
  }
};

// Reduce kernel block: walks one image's candidates in order; a phase per kept candidate.
struct NmsReduceBlock {
  int64_t n, max_keep;
  const uint64_t* mask;
  const bool* valid;
  uint64_t* removed;
  int64_t* kept;
  int64_t* counts;

  MLK_EXEC_CHECK_DISABLE
  template <typename Block>
  MLK_HOST_DEVICE void operator()(Block& block) const {
    const NmsReduceBlock& k = *this;
    block.phase([&](const ThreadIndex& t) { nms_reduce_init(t, k.n, k.valid, k.removed); });
    const uint64_t* removed_of_image = removed + block.index().x * mask_words(n);
    int64_t count = 0;
    for (int64_t i = 0; i < n && count < max_keep; ++i) {
      if (nms_is_removed(removed_of_image, i)) continue;  // the same in every thread
      block.phase([&](const ThreadIndex& t) {
        nms_reduce_keep(t, k.n, i, count, k.max_keep, k.mask, k.removed, k.kept);
      });
      ++count;
    }
    block.phase(
        [&](const ThreadIndex& t) { nms_reduce_finish(t, count, k.max_keep, k.kept, k.counts); });
  }
};

// Bitmask NMS over `images` lists of n candidates each: boxes [images, n, 4] in processing order,
// groups [images, n] int64 (undefined: one group) and valid [images, n] bool (undefined: all
// valid). Returns the kept positions [images, max_keep] (-1 past the count) and the counts
// [images], both left on the device.
template <typename Runner>
std::pair<at::Tensor, at::Tensor> bitmask_nms(const Runner& run, const char* op,
                                              const at::Tensor& boxes, const at::Tensor& groups,
                                              const at::Tensor& valid, double iou_threshold,
                                              int64_t max_keep) {
  const int64_t images = boxes.size(0), n = boxes.size(1), words = mask_words(n);
  // The mask grid is (words, words, images), and CUDA caps a grid's y and z at 65535.
  constexpr int64_t kMaxGridYZ = 65535;
  TORCH_CHECK(words <= kMaxGridYZ, op, ": the CUDA NMS takes at most ", kMaxGridYZ * kMaskBits,
              " boxes per list, got ", n);
  TORCH_CHECK(images <= kMaxGridYZ, op, ": the CUDA NMS takes at most ", kMaxGridYZ,
              " images, got ", images);
  const auto long_opts = boxes.options().dtype(at::kLong);
  auto kept = at::empty({images, max_keep}, long_opts);
  auto counts = at::empty({images}, long_opts);
  if (images == 0) return {kept, counts};
  // 64-bit words kept in int64 storage (ATen has no uint64 tensors to allocate with).
  auto mask = at::empty({images, n, words}, long_opts);
  auto removed = at::empty({images, words}, long_opts);
  uint64_t* mask_ptr = reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>());
  const int64_t* group_ptr = groups.defined() ? groups.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "bitmask_nms", [&] {
    LaunchConfig config;
    config.grid = Dim3{words, words, images};
    config.block.x = kMaskBits;
    config.shared_bytes = kMaskBits * static_cast<int64_t>(4 * sizeof(scalar_t) + sizeof(int64_t));
    run.blocks(config, NmsMaskBlock<scalar_t>{n, boxes.data_ptr<scalar_t>(), group_ptr,
                                              threshold_below<scalar_t>(iou_threshold), mask_ptr});
  });
  LaunchConfig config;
  config.grid.x = images;
  // One thread per mask word (up to 256), at least a warp.
  config.block.x = std::min<int64_t>(256, std::max<int64_t>(32, (words + 31) / 32 * 32));
  run.blocks(config, NmsReduceBlock{n, max_keep, mask_ptr,
                                    valid.defined() ? valid.data_ptr<bool>() : nullptr,
                                    reinterpret_cast<uint64_t*>(removed.data_ptr<int64_t>()),
                                    kept.data_ptr<int64_t>(), counts.data_ptr<int64_t>()});
  return {kept, counts};
}

// The CPU's own NMS and propose (proposals_cpu.cpp: greedy NMS over structure-of-arrays
// candidates, stopping at post_nms_top_n): for CpuParallelRunner, overload resolution picks them
// over the runner templates below. propose's backward has no CPU-specific code.
at::Tensor nms_family_kernel(const CpuParallelRunner& run, const char* op, const at::Tensor& boxes,
                             const at::Tensor& scores, const at::Tensor* idxs,
                             double iou_threshold);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> propose_kernel(
    const CpuParallelRunner& run, const at::Tensor& anchors, const at::Tensor& deltas,
    const at::Tensor& objectness, const at::Tensor& image_sizes, const ProposeArgs& args,
    at::ArrayRef<double> weights, double clamp);

// nms (idxs == nullptr) and batched_nms: one bitmask NMS over all boxes in score order, where
// boxes of different groups never suppress each other (no coordinate offsets).
template <typename Runner>
at::Tensor nms_family_kernel(const Runner& run, const char* op, const at::Tensor& boxes,
                             const at::Tensor& scores, const at::Tensor* idxs,
                             double iou_threshold) {
  auto in = prepare_nms(op, boxes, scores, idxs, iou_threshold);
  if (in.n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const at::Tensor order = sorted_order(in.scores, 0);
  const at::Tensor sorted = in.boxes.index_select(0, order).unsqueeze(0).contiguous();
  const at::Tensor groups =
      idxs != nullptr ? in.groups.index_select(0, order).unsqueeze(0).contiguous() : at::Tensor();
  const std::pair<at::Tensor, at::Tensor> kept =
      bitmask_nms(run, op, sorted, groups, at::Tensor(), iou_threshold, in.n);
  const int64_t count = kept.second.item<int64_t>();  // the output size is data-dependent
  return order.index_select(0, kept.first[0].narrow(0, 0, count));
}

// propose's last step, shared by its CPU and CUDA kernels: the output rows of every image from
// its candidates (boxes [N, k, 4], scores and anchor order [N, k]) and what NMS kept (positions
// [N, max_keep] among the candidates, counts [N]): the kept candidates, the whole-image box when
// asked, then zero rows.
template <typename Runner>
void write_propose_outputs(const Runner& run, const ProposeInputs& in, const ProposeArgs& args,
                           const at::Tensor& cand_boxes, const at::Tensor& scores,
                           const at::Tensor& order, const at::Tensor& kept,
                           const at::Tensor& kept_counts, ProposeOutputs& out) {
  const int64_t images = in.images, k = in.k, rows = in.rows, max_keep = kept.size(1);
  if (rows == 0) {
    out.counts.zero_();  // no output rows: the output kernel would set no count
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(in.deltas.scalar_type(), "propose_output", [&] {
    const scalar_t* b = cand_boxes.data_ptr<scalar_t>();
    const scalar_t* s = scores.data_ptr<scalar_t>();
    const int64_t* o = order.data_ptr<int64_t>();
    const int64_t* kp = kept.data_ptr<int64_t>();
    const int64_t* kc = kept_counts.data_ptr<int64_t>();
    const scalar_t* sizes = in.sizes.data_ptr<scalar_t>();
    scalar_t* ob = out.boxes.data_ptr<scalar_t>();
    scalar_t* os = out.scores.data_ptr<scalar_t>();
    int64_t* oc = out.counts.data_ptr<int64_t>();
    int64_t* oa = out.kept_anchors.data_ptr<int64_t>();
    const bool append = args.append_whole_image;
    run.threads(launch_config_1d(images * rows), [=] MLK_LAMBDA(const ThreadIndex& t) {
      propose_output_thread(t, images, k, max_keep, rows, append, b, s, o, kp, kc, sizes, ob, os,
                            oc, oa);
    });
  });
}

// The image sizes' check where they live (see image_sizes_check_thread): no host sync. The CPU
// kernel checks them with check_image_sizes_eagerly instead.
template <typename Runner>
void check_image_sizes_on_device(const Runner& run, const at::Tensor& image_sizes,
                                 at::ScalarType boxes_type) {
  const int64_t images = image_sizes.size(0);
  if (images == 0) return;
  const auto given = contiguous_input("propose", "image_sizes", image_sizes.to(at::kDouble));
  const double* given_ptr = given.data_ptr<double>();
  const double largest = largest_image_size(boxes_type);
  run.threads(launch_config_1d(images), [=] MLK_LAMBDA(const ThreadIndex& t) {
    image_sizes_check_thread(t, images, given_ptr, largest);
  });
}

template <typename Runner>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> propose_kernel(
    const Runner& run, const at::Tensor& anchors, const at::Tensor& deltas,
    const at::Tensor& objectness, const at::Tensor& image_sizes, const ProposeArgs& args,
    at::ArrayRef<double> weights, double clamp) {
  const int64_t post_nms_top_n = args.post_nms_top_n;
  const double iou_threshold = args.iou_threshold;
  auto in = prepare_propose(anchors, deltas, objectness, image_sizes, args, weights, clamp);
  check_image_sizes_on_device(run, image_sizes, anchors.scalar_type());
  auto out = empty_propose_outputs(in);
  const int64_t images = in.images, k = in.k, num_anchors = in.num_anchors;
  const at::Tensor order = sorted_order(in.objectness, 1).narrow(1, 0, k).contiguous();
  // The same [N, k] layout as the CPU kernel and torchvision's RPN, so sigmoid agrees bitwise.
  const at::Tensor scores = at::sigmoid(in.objectness.gather(1, order)).contiguous();
  auto cand_boxes = at::empty({images, k, 4}, in.deltas.options());
  auto valid = at::empty({images, k}, in.deltas.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(in.deltas.scalar_type(), "propose_decode", [&] {
    const scalar_t* a = in.anchors.data_ptr<scalar_t>();
    const scalar_t* d = in.deltas.data_ptr<scalar_t>();
    const int64_t* o = order.data_ptr<int64_t>();
    const scalar_t* s = scores.data_ptr<scalar_t>();
    const scalar_t* sizes = in.sizes.data_ptr<scalar_t>();
    scalar_t* b = cand_boxes.data_ptr<scalar_t>();
    bool* v = valid.data_ptr<bool>();
    const auto wt = to_weights<scalar_t>(weights);
    const auto clip = static_cast<scalar_t>(clamp);
    const auto min_sz = static_cast<scalar_t>(args.min_size);
    const auto score_thr = static_cast<scalar_t>(args.score_threshold);
    run.threads(launch_config_1d(images * k), [=] MLK_LAMBDA(const ThreadIndex& t) {
      propose_decode_thread(t, images, k, num_anchors, a, d, o, s, sizes, wt, clip, min_sz,
                            score_thr, b, v);
    });
  });
  // No image can keep more than its k candidates: the kept list needs no more columns.
  const std::pair<at::Tensor, at::Tensor> kept = bitmask_nms(
      run, "propose", cand_boxes, at::Tensor(), valid, iou_threshold, std::min(post_nms_top_n, k));
  write_propose_outputs(run, in, args, cand_boxes, scores, order, kept.first, kept.second, out);
  return {out.boxes, out.scores, out.counts, out.kept_anchors};
}

// The gradients of propose's boxes to deltas and anchors, each only where `mask` (deltas,
// anchors) asks for it (else an empty Tensor[0]). Rows are computed independently, then summed
// with index_add in row order (deterministic on the CPU; on CUDA rows from propose never share a
// target, so its atomics never collide).
template <typename Runner>
std::tuple<at::Tensor, at::Tensor> propose_backward_kernel(
    const Runner& run, const at::Tensor& grad_boxes, const at::Tensor& anchors,
    const at::Tensor& deltas, const at::Tensor& kept_anchors, const at::Tensor& image_sizes,
    at::ArrayRef<double> weights, double clamp, std::array<bool, 2> mask) {
  // The CPU runs this kernel too (CpuParallelRunner), and checks kept_anchors' values first.
  check_propose_backward(grad_boxes, anchors, deltas, kept_anchors, image_sizes,
                         /*values_on_host=*/std::is_same_v<Runner, CpuParallelRunner>);
  check_weights("propose_backward", weights);
  check_clamp("propose_backward", clamp);
  const char* op = "propose_backward";
  const auto g = contiguous_input(op, "grad_boxes", grad_boxes);
  const auto d = contiguous_input(op, "deltas", deltas);
  const auto a = contiguous_input(op, "anchors", anchors);
  const auto kept = contiguous_input(op, "kept_anchors", kept_anchors);
  const auto sizes = image_sizes.to(deltas.scalar_type()).contiguous();
  const int64_t images = d.size(0), num_anchors = d.size(1), rows = kept.size(1);
  const auto options = d.options();
  at::Tensor grad_deltas =
      mask[0] ? allocate_zeros(op, d.sizes(), options) : at::empty({0}, options);
  at::Tensor grad_anchors =
      mask[1] ? allocate_zeros(op, a.sizes(), options) : at::empty({0}, options);
  if (images * rows == 0 || num_anchors == 0 || !(mask[0] || mask[1])) {
    return {grad_deltas, grad_anchors};
  }
  auto row_grad_deltas = mask[0] ? at::empty({images * rows, 4}, options) : at::Tensor();
  auto row_grad_anchors = mask[1] ? at::empty({images * rows, 4}, options) : at::Tensor();
  auto target = at::empty({images * rows}, options.dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "propose_backward", [&] {
    const auto wt = to_weights<scalar_t>(weights);
    const auto clip = static_cast<scalar_t>(clamp);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* dp = d.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* sp = sizes.data_ptr<scalar_t>();
    const int64_t* kp = kept.data_ptr<int64_t>();
    scalar_t* rgd = mask[0] ? row_grad_deltas.data_ptr<scalar_t>() : nullptr;
    scalar_t* rga = mask[1] ? row_grad_anchors.data_ptr<scalar_t>() : nullptr;
    int64_t* tp = target.data_ptr<int64_t>();
    run.threads(launch_config_1d(images * rows), [=] MLK_LAMBDA(const ThreadIndex& t) {
      propose_backward_thread(t, images, rows, num_anchors, gp, ap, dp, kp, sp, wt, clip, rgd, rga,
                              tp);
    });
  });
  if (mask[0]) grad_deltas.view({images * num_anchors, 4}).index_add_(0, target, row_grad_deltas);
  if (mask[1]) {
    // Per (image, anchor) first, as the deltas, then over images in image order.
    grad_anchors = allocate_zeros(op, {images * num_anchors, 4}, options)
                       .index_add_(0, target, row_grad_anchors)
                       .view({images, num_anchors, 4})
                       .sum(0);
  }
  return {grad_deltas, grad_anchors};
}

// Every op of the family over one Runner, with the dispatcher's signatures: registered with
// CudaRunner (proposals_cuda.cu), EmulatorRunner (proposals_emulated.cpp) and CpuParallelRunner
// (proposals_cpu.cpp, whose own overloads above replace nms, batched_nms and propose).
template <typename Runner>
struct Kernels {
  static at::Tensor nms(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
    return nms_family_kernel(Runner::on(boxes), "nms", boxes, scores, nullptr, iou_threshold);
  }
  static at::Tensor batched_nms(const at::Tensor& boxes, const at::Tensor& scores,
                                const at::Tensor& idxs, double iou_threshold) {
    return nms_family_kernel(Runner::on(boxes), "batched_nms", boxes, scores, &idxs, iou_threshold);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> propose(
      const at::Tensor& anchors, const at::Tensor& deltas, const at::Tensor& objectness,
      const at::Tensor& image_sizes, int64_t pre_nms_top_n, int64_t post_nms_top_n,
      double iou_threshold, double min_size, double score_threshold, at::ArrayRef<double> weights,
      double clamp, bool append_whole_image) {
    const ProposeArgs args{pre_nms_top_n, post_nms_top_n,  iou_threshold,
                           min_size,      score_threshold, append_whole_image};
    return propose_kernel(Runner::on(deltas), anchors, deltas, objectness, image_sizes, args,
                          weights, clamp);
  }
  static std::tuple<at::Tensor, at::Tensor> propose_backward(
      const at::Tensor& grad_boxes, const at::Tensor& anchors, const at::Tensor& deltas,
      const at::Tensor& kept_anchors, const at::Tensor& image_sizes, at::ArrayRef<double> weights,
      double clamp, std::array<bool, 2> output_mask) {
    return propose_backward_kernel(Runner::on(deltas), grad_boxes, anchors, deltas, kept_anchors,
                                   image_sizes, weights, clamp, output_mask);
  }
};

// The family's registration, written once: op names and the kernels behind them.
template <typename K>
void register_proposals(torch::Library& m) {
  m.impl("nms", &K::nms);
  m.impl("batched_nms", &K::batched_nms);
  m.impl("propose", &K::propose);
  m.impl("propose_backward", &K::propose_backward);
}

}  // namespace proposals
}  // namespace mlk
