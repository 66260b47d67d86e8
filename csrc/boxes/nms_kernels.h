// The CUDA kernels of nms, batched_nms and propose, written once over a Runner: CudaRunner
// (boxes_cuda.cu) launches them on a GPU, EmulatorRunner (boxes_emulated.cpp) runs the same code
// on the CPU grid emulator. Sorting, gathering and the sigmoid are ATen calls on the device.
#pragma once

#include <utility>

#include "nms.h"

// The block functors below are __host__ __device__ templates over the block type; each
// instantiation calls only the functions of its own side (DeviceBlock on the device, the
// emulator's Block on the host), which nvcc's cross-space check cannot see through.
#if defined(__CUDACC__)
#define MLK_EXEC_CHECK_DISABLE _Pragma("nv_exec_check_disable")
#else
#define MLK_EXEC_CHECK_DISABLE
#endif

namespace mlk {
namespace boxes {

// Mask kernel block (see nms_math.h): column boxes to shared memory, then one mask word per row.
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
    block.phase([&](const ThreadIndex& t) {
      nms_reduce_finish(t, count, k.max_keep, k.kept, k.counts);
    });
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

template <typename Runner>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> propose_kernel(
    const Runner& run, const at::Tensor& anchors, const at::Tensor& deltas,
    const at::Tensor& objectness, const at::Tensor& image_sizes, int64_t pre_nms_top_n,
    int64_t post_nms_top_n, double iou_threshold, double min_size, double score_threshold,
    at::ArrayRef<double> weights, double clamp, bool append_whole_image) {
  const ProposeArgs args{pre_nms_top_n, post_nms_top_n, iou_threshold,
                         min_size,      score_threshold, append_whole_image};
  auto in = prepare_propose(anchors, deltas, objectness, image_sizes, args, weights, clamp);
  auto out = empty_propose_outputs(in);
  const int64_t images = in.images, k = in.k, rows = in.rows, num_anchors = in.num_anchors;
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
    const auto min_sz = static_cast<scalar_t>(min_size);
    const auto score_thr = static_cast<scalar_t>(score_threshold);
    run.threads(launch_config_1d(images * k), [=] MLK_LAMBDA(const ThreadIndex& t) {
      propose_decode_thread(t, images, k, num_anchors, a, d, o, s, sizes, wt, clip, min_sz,
                            score_thr, b, v);
    });
  });
  const std::pair<at::Tensor, at::Tensor> kept =
      bitmask_nms(run, "propose", cand_boxes, at::Tensor(), valid, iou_threshold, post_nms_top_n);
  AT_DISPATCH_FLOATING_TYPES(in.deltas.scalar_type(), "propose_output", [&] {
    const scalar_t* b = cand_boxes.data_ptr<scalar_t>();
    const scalar_t* s = scores.data_ptr<scalar_t>();
    const int64_t* o = order.data_ptr<int64_t>();
    const int64_t* kp = kept.first.data_ptr<int64_t>();
    const int64_t* kc = kept.second.data_ptr<int64_t>();
    const scalar_t* sizes = in.sizes.data_ptr<scalar_t>();
    scalar_t* ob = out.boxes.data_ptr<scalar_t>();
    scalar_t* os = out.scores.data_ptr<scalar_t>();
    int64_t* oc = out.counts.data_ptr<int64_t>();
    int64_t* oa = out.kept_anchors.data_ptr<int64_t>();
    const bool append = append_whole_image;
    const int64_t max_keep = post_nms_top_n;
    run.threads(launch_config_1d(images * rows), [=] MLK_LAMBDA(const ThreadIndex& t) {
      propose_output_thread(t, images, k, max_keep, rows, append, b, s, o, kp, kc, sizes, ob, os,
                            oc, oa);
    });
  });
  if (rows == 0) out.counts.zero_();  // no output rows: the output kernel set no count
  return {out.boxes, out.scores, out.counts, out.kept_anchors};
}

template <typename Runner>
std::tuple<at::Tensor, at::Tensor> propose_backward_kernel(
    const Runner& run, const at::Tensor& grad_boxes, const at::Tensor& anchors,
    const at::Tensor& deltas, const at::Tensor& kept_anchors, const at::Tensor& image_sizes,
    at::ArrayRef<double> weights, double clamp) {
  check_propose_backward(grad_boxes, anchors, deltas, kept_anchors, image_sizes);
  const auto g = grad_boxes.contiguous();
  const auto d = deltas.contiguous();
  const auto a = anchors.contiguous();
  const auto kept = kept_anchors.contiguous();
  const auto sizes = image_sizes.to(deltas.scalar_type()).contiguous();
  const int64_t images = d.size(0), num_anchors = d.size(1), rows = kept.size(1);
  auto grad_deltas = at::zeros_like(d);
  auto grad_anchors = at::zeros_like(d);  // per image, summed below
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "propose_backward", [&] {
    const auto wt = to_weights<scalar_t>(weights);
    const auto clip = static_cast<scalar_t>(clamp);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* dp = d.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* sp = sizes.data_ptr<scalar_t>();
    const int64_t* kp = kept.data_ptr<int64_t>();
    scalar_t* gd = grad_deltas.data_ptr<scalar_t>();
    scalar_t* ga = grad_anchors.data_ptr<scalar_t>();
    run.threads(launch_config_1d(images * rows), [=] MLK_LAMBDA(const ThreadIndex& t) {
      propose_backward_thread(t, images, rows, num_anchors, gp, ap, dp, kp, sp, wt, clip, gd, ga);
    });
  });
  return {grad_deltas, grad_anchors.sum(0)};
}

}  // namespace boxes
}  // namespace mlk
