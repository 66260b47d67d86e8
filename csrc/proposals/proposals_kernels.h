// The CUDA kernels of nms, batched_nms and propose, written once over a Runner: CudaRunner
// (proposals_cuda.cu) launches them on a GPU, EmulatorRunner (proposals_emulated.cpp) runs the
// same code on the CPU grid emulator. Sorting, gathering and the sigmoid are ATen calls on the
// device.
#pragma once

#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>
#include <vector>

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

// Mask kernel block (see proposals_math.h): one tile of one group's mask; the column boxes to
// shared memory, then one mask word per row.
template <typename T>
struct NmsMaskBlock {
  NmsSegments segments;
  const T* boxes;
  T threshold;
  uint64_t* mask;

  MLK_EXEC_CHECK_DISABLE
  template <typename Block>
  MLK_HOST_DEVICE void operator()(Block& block) const {
    const NmsTile tile = nms_find_tile(segments, block.index().x);
    if (tile.row_block > tile.col_block) return;  // the whole block alike: no barrier is skipped
    T* col_boxes = block.template shared<T>();
    const NmsMaskBlock& k = *this;
    block.phase([&](const ThreadIndex& t) { nms_mask_load(t, tile, k.boxes, col_boxes); });
    block.phase([&](const ThreadIndex& t) {
      nms_mask_row(t, tile, k.boxes, k.threshold, col_boxes, k.mask);
    });
  }
};

// Reduce kernel block: walks one group's candidates, two phases per mask word (see
// proposals_math.h); shared memory: 64 diagonal words, then the group's removed words.
struct NmsReduceBlock {
  NmsSegments segments;
  int64_t max_keep;
  const uint64_t* mask;
  const bool* valid;
  int64_t* kept;
  int64_t* counts;
  bool* keep_flags;
  const int64_t* flag_index;

  MLK_EXEC_CHECK_DISABLE
  template <typename Block>
  MLK_HOST_DEVICE void operator()(Block& block) const {
    const NmsReduceBlock& k = *this;
    const NmsGroup group = nms_group(segments, mask, block.index().x);
    uint64_t* diagonal = block.template shared<uint64_t>();
    uint64_t* removed = diagonal + kMaskBits;
    auto state = block.template per_thread<NmsReduceState>();
    block.phase([&](const ThreadIndex& t) {
      nms_reduce_init(t, group, k.valid, removed, state[t]);
    });
    for (int64_t w = 0; w < group.words; ++w) {
      block.phase([&](const ThreadIndex& t) { nms_reduce_load_diagonal(t, group, w, diagonal); });
      block.phase([&](const ThreadIndex& t) {
        nms_reduce_word(t, group, w, k.max_keep, diagonal, removed, state[t], k.kept,
                        k.keep_flags, k.flag_index);
      });
    }
    block.phase([&](const ThreadIndex& t) {
      nms_reduce_finish(t, group, k.max_keep, state[t], k.kept, k.counts);
    });
  }
};

// The reduce keeps a group's removed words next to the 64 diagonal words in the shared memory a
// block gets without opting in (grid.h's launch limits).
constexpr int64_t kNmsMaxGroupWords = kMaxDynamicSharedBytes / 8 - kMaskBits;

// A run of consecutive groups whose masks are built and reduced together, in one mask launch and
// one reduce launch: its first group, mask block and mask word in the whole list's numbering, and
// how many of each it has.
struct NmsChunk {
  int64_t first_group = 0, groups = 0, first_tile = 0, tiles = 0, first_word = 0, words = 0;
};

// Where each group's candidates, mask tiles and mask rows lie (NmsSegments), as device tensors,
// and on the host the chunks the groups run in and what the launches need.
struct NmsLayout {
  int64_t groups = 0;
  int64_t largest = 0;      // the largest group's candidates
  int64_t mask_buffer = 0;  // mask words: the largest chunk's, the one buffer all chunks reuse
  std::vector<NmsChunk> chunks;
  at::Tensor starts, tile_offsets, mask_offsets;  // int64 [>= groups + 1]

  NmsSegments segments(const NmsChunk& chunk) const {
    return {chunk.first_group,
            chunk.groups,
            starts.data_ptr<int64_t>(),
            tile_offsets.data_ptr<int64_t>(),
            mask_offsets.data_ptr<int64_t>(),
            chunk.first_tile,
            chunk.first_word};
  }
};

// `per_group` names a group in the messages ("boxes per group", "candidates per image").
inline void check_nms_layout(const char* op, const char* per_group, const NmsLayout& layout) {
  TORCH_CHECK(mask_words(layout.largest) <= kNmsMaxGroupWords, op, ": the CUDA NMS takes at most ",
              kNmsMaxGroupWords * kMaskBits, " ", per_group,
              " (its removed set lives in 48 KB of shared memory), got ", layout.largest);
  for (const NmsChunk& chunk : layout.chunks) {
    TORCH_CHECK(chunk.tiles <= kMaxGridDimX && chunk.groups <= kMaxGridDimX, op,
                ": the CUDA NMS's grids would need ", std::max(chunk.tiles, chunk.groups),
                " blocks, more than a grid holds (", kMaxGridDimX, ")");
  }
}

// `groups` lists of n candidates each (nms: one; propose: one per image), known on the host. All
// groups run in one chunk: nms has one group, and propose's images in parallel are what makes it
// fast; its masks are bounded by pre_nms_top_n per image.
inline NmsLayout uniform_nms_layout(const char* op, const char* per_group, int64_t groups,
                                    int64_t n, const at::TensorOptions& long_options) {
  NmsLayout layout;
  layout.groups = groups;
  layout.largest = n;
  layout.mask_buffer = groups * nms_group_mask_size(n);
  layout.chunks = {{0, groups, 0, groups * nms_group_tiles(n), 0, layout.mask_buffer}};
  check_nms_layout(op, per_group, layout);
  const at::Tensor group = at::arange(groups + 1, long_options);
  layout.starts = group * n;
  layout.tile_offsets = group * nms_group_tiles(n);
  layout.mask_offsets = group * nms_group_mask_size(n);
  return layout;
}

// The mask words a chunk may hold, for groups of at most `largest` of `total` candidates: one
// full square mask of the largest group (largest x mask_words(largest) words, what torchvision's
// nms allocates for it), so that batched_nms's peak stays within torchvision's, which runs the
// groups one after another. Always at least the largest group's own mask (it must fit alone),
// and at least a word per candidate, no more than each of the layout's per-candidate int64
// arrays: many small groups then share a few chunks instead of a pair of launches each.
inline int64_t nms_chunk_budget(int64_t largest, int64_t total) {
  return std::max({largest * mask_words(largest), nms_group_mask_size(largest), total});
}

// Cuts the groups (their sizes in list order) into consecutive chunks, each as many groups as fit
// `budget` mask words together (at least one group).
inline std::vector<NmsChunk> plan_nms_chunks(const std::vector<int64_t>& group_sizes,
                                             int64_t budget) {
  std::vector<NmsChunk> chunks;
  NmsChunk chunk;
  for (const int64_t n : group_sizes) {
    const int64_t words = nms_group_mask_size(n);
    if (chunk.groups > 0 && chunk.words + words > budget) {
      chunks.push_back(chunk);
      chunk = {chunk.first_group + chunk.groups, 0, chunk.first_tile + chunk.tiles, 0,
               chunk.first_word + chunk.words, 0};
    }
    chunk.groups += 1;
    chunk.tiles += nms_group_tiles(n);
    chunk.words += words;
  }
  if (chunk.groups > 0) chunks.push_back(chunk);
  return chunks;
}

// The groups of a list sorted by group (`sorted_groups`, int64 [n], n > 0): found on the device;
// the groups' first positions come to the host in one copy (n + 1 int64, as big as the list's
// group ids), the one host synchronisation this adds, and the host cuts the groups into chunks
// under nms_chunk_budget. Every device array has n + 1 entries (there are at most n groups);
// those past the groups' are never read.
template <typename Runner>
NmsLayout grouped_nms_layout(const Runner& run, const char* op, const at::Tensor& sorted_groups) {
  const int64_t n = sorted_groups.size(0);
  const auto long_options = sorted_groups.options().dtype(at::kLong);
  auto is_start = at::ones({n}, sorted_groups.options().dtype(at::kBool));
  is_start.narrow(0, 1, n - 1).copy_(sorted_groups.narrow(0, 1, n - 1) !=
                                     sorted_groups.narrow(0, 0, n - 1));
  const at::Tensor group_of = is_start.cumsum(0) - 1;  // each position's group
  // starts[g] = the first position of group g; n for every g past the last group.
  const at::Tensor starts = at::searchsorted(group_of, at::arange(n + 1, long_options));
  auto tiles = at::zeros({n + 1}, long_options);  // [0] stays 0: the cumsum gives offsets
  auto mask_sizes = at::zeros({n + 1}, long_options);
  {
    const int64_t* s = starts.data_ptr<int64_t>();
    int64_t* tp = tiles.data_ptr<int64_t>() + 1;
    int64_t* mp = mask_sizes.data_ptr<int64_t>() + 1;
    run.threads(launch_config_1d(n), [=] MLK_LAMBDA(const ThreadIndex& t) {
      nms_group_sizes_thread(t, n, s, tp, mp);
    });
  }
  NmsLayout layout;
  layout.starts = starts;
  layout.tile_offsets = tiles.cumsum(0);
  layout.mask_offsets = mask_sizes.cumsum(0);
  const at::Tensor host_starts = starts.cpu();
  const int64_t* first = host_starts.data_ptr<int64_t>();
  std::vector<int64_t> group_sizes;
  for (int64_t g = 0; first[g] < n; ++g) group_sizes.push_back(first[g + 1] - first[g]);
  layout.groups = static_cast<int64_t>(group_sizes.size());
  layout.largest = *std::max_element(group_sizes.begin(), group_sizes.end());
  layout.chunks = plan_nms_chunks(group_sizes, nms_chunk_budget(layout.largest, n));
  for (const NmsChunk& chunk : layout.chunks) {
    layout.mask_buffer = std::max(layout.mask_buffer, chunk.words);
  }
  check_nms_layout(op, "boxes per group", layout);
  return layout;
}

// Bitmask NMS over the groups of `layout`: boxes [L, 4] (L candidates, each group's in processing
// order), valid [L] bool (undefined: all valid). Keeps at most max_keep candidates per group and
// writes, where the tensor is defined: kept [groups, max_keep] int64, the kept positions within
// each group (-1 past the count); counts [groups] int64; keep_flags [L] bool (to be zeros on
// entry), true at flag_index[p] for each kept position p (flag_index [L] int64; undefined: at p).
// Everything stays on the device. The chunks of `layout` run one after another, each a mask
// launch and a reduce launch over its groups in parallel.
template <typename Runner>
void bitmask_nms(const Runner& run, const at::Tensor& boxes, const NmsLayout& layout,
                 const at::Tensor& valid, double iou_threshold, int64_t max_keep,
                 const at::Tensor& kept, const at::Tensor& counts, const at::Tensor& keep_flags,
                 const at::Tensor& flag_index) {
  if (layout.groups == 0) return;
  // 64-bit words kept in int64 storage (ATen has no uint64 tensors to allocate with). One buffer
  // for every chunk: the launches of one stream run in order, so a chunk's mask kernel starts
  // after the previous chunk's reduce has read its masks.
  auto mask = at::empty({layout.mask_buffer}, boxes.options().dtype(at::kLong));
  uint64_t* mask_ptr = reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>());
  // One thread per removed word of the largest group (up to 512), at least a warp.
  const int64_t max_words = mask_words(layout.largest);
  LaunchConfig reduce_config;
  reduce_config.block.x =
      std::min<int64_t>(512, std::max<int64_t>(32, (max_words + 31) / 32 * 32));
  reduce_config.shared_bytes = (kMaskBits + max_words) * static_cast<int64_t>(sizeof(uint64_t));
  for (const NmsChunk& chunk : layout.chunks) {
    const NmsSegments segments = layout.segments(chunk);
    AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "bitmask_nms", [&] {
      LaunchConfig config;
      config.grid.x = chunk.tiles;
      config.block.x = kMaskBits;
      config.shared_bytes = kMaskBits * static_cast<int64_t>(4 * sizeof(scalar_t));
      run.blocks(config,
                 NmsMaskBlock<scalar_t>{segments, boxes.data_ptr<scalar_t>(),
                                        threshold_below<scalar_t>(iou_threshold), mask_ptr});
    });
    reduce_config.grid.x = chunk.groups;
    run.blocks(reduce_config,
               NmsReduceBlock{segments, max_keep, mask_ptr,
                              valid.defined() ? valid.data_ptr<bool>() : nullptr,
                              kept.defined() ? kept.data_ptr<int64_t>() : nullptr,
                              counts.defined() ? counts.data_ptr<int64_t>() : nullptr,
                              keep_flags.defined() ? keep_flags.data_ptr<bool>() : nullptr,
                              flag_index.defined() ? flag_index.data_ptr<int64_t>() : nullptr});
  }
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

// nms (idxs == nullptr) and batched_nms: a bitmask NMS per group (nms: all boxes one group),
// the groups in parallel; no coordinate offsets. The kept boxes come back in score order, as
// torchvision returns them.
template <typename Runner>
at::Tensor nms_family_kernel(const Runner& run, const char* op, const at::Tensor& boxes,
                             const at::Tensor& scores, const at::Tensor* idxs,
                             double iou_threshold) {
  auto in = prepare_nms(op, boxes, scores, idxs, iou_threshold);
  const auto long_options = in.boxes.options().dtype(at::kLong);
  if (in.n == 0) return at::empty({0}, long_options);
  const at::Tensor order = sorted_order(in.scores, 0);
  // The candidate list: score order, regrouped by idxs with a stable sort, so that each group
  // keeps score order (ties to the lower index). by_group[p] is the score rank at position p,
  // where the reduce sets the flag of a kept candidate.
  at::Tensor by_group, listed = order;
  NmsLayout layout;
  if (idxs != nullptr) {
    const auto sorted = in.groups.index_select(0, order).sort(/*stable=*/true, 0, false);
    by_group = std::get<1>(sorted);
    listed = order.index_select(0, by_group);
    layout = grouped_nms_layout(run, op, std::get<0>(sorted));
  } else {
    layout = uniform_nms_layout(op, "boxes", 1, in.n, long_options);
  }
  const at::Tensor listed_boxes = in.boxes.index_select(0, listed).contiguous();
  at::Tensor keep = at::zeros({in.n}, in.boxes.options().dtype(at::kBool));
  bitmask_nms(run, listed_boxes, layout, at::Tensor(), iou_threshold, in.n, at::Tensor(),
              at::Tensor(), keep, by_group);
  return order.masked_select(keep);  // the output size is data-dependent: a host sync
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
  // One group per image. No image can keep more than its k candidates: the kept list needs no
  // more columns.
  const int64_t max_keep = std::min(post_nms_top_n, k);
  const auto long_options = in.deltas.options().dtype(at::kLong);
  auto kept = at::empty({images, max_keep}, long_options);
  auto kept_counts = at::empty({images}, long_options);
  bitmask_nms(run, cand_boxes.view({images * k, 4}),
              uniform_nms_layout("propose", "candidates per image", images, k, long_options), valid.view({images * k}),
              iou_threshold, max_keep, kept, kept_counts, at::Tensor(), at::Tensor());
  write_propose_outputs(run, in, args, cand_boxes, scores, order, kept, kept_counts, out);
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
