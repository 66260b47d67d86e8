// CPU kernels of nms, batched_nms and propose.
//
// torchvision's CPU NMS walks every later box for every kept box, suppressed or not, one scalar
// IoU at a time. Here the candidates sit in structure-of-arrays order of priority, and each kept
// box (1) computes its IoU with all remaining candidates in one branch-free loop the compiler
// vectorizes (AVX2 where the CPU has it), then (2) once enough of them are removed, compacts the
// survivors, so suppressed boxes stop costing anything; the work stops as soon as `max_keep`
// boxes are kept (propose's post_nms_top_n). batched_nms runs its groups in parallel (no
// coordinate offsets), propose its images.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "../common/cpu_runner.h"
#include "proposals_kernels.h"

namespace mlk {
namespace proposals {

// The hot loop of the CPU NMS: marks removed[j] for the candidates j in [begin, end) whose IoU with
// `box` exceeds the threshold, over structure-of-arrays candidates; returns how many it newly
// removed. Branch-free so that it vectorizes (NaN IoU compares false: never suppresses).
template <typename T>
inline int64_t suppression_pass_impl(const T* box, T area_box, const T* __restrict x1,
                                     const T* __restrict y1, const T* __restrict x2,
                                     const T* __restrict y2, const T* __restrict area,
                                     int64_t begin, int64_t end, T threshold,
                                     uint8_t* __restrict removed) {
  const T bx1 = box[0], by1 = box[1], bx2 = box[2], by2 = box[3];
  int64_t newly = 0;
  for (int64_t j = begin; j < end; ++j) {
    const uint8_t s =
        box_iou(bx1, by1, bx2, by2, area_box, x1[j], y1[j], x2[j], y2[j], area[j]) > threshold;
    newly += s & (removed[j] ^ 1);
    removed[j] |= s;
  }
  return newly;
}

// Compiled for AVX2 and for baseline x86-64, picked at load time (GCC function multiversioning):
// twice the vector width where the CPU has it. AVX2 carries no FMA, so the compiler cannot fuse
// IoU's multiply-adds: the results stay torchvision's to the bit.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MLK_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MLK_SIMD_CLONES
#endif

MLK_SIMD_CLONES int64_t suppression_pass(const float* box, float area_box, const float* x1,
                                         const float* y1, const float* x2, const float* y2,
                                         const float* area, int64_t begin, int64_t end,
                                         float threshold, uint8_t* removed) {
  return suppression_pass_impl(box, area_box, x1, y1, x2, y2, area, begin, end, threshold, removed);
}
MLK_SIMD_CLONES int64_t suppression_pass(const double* box, double area_box, const double* x1,
                                         const double* y1, const double* x2, const double* y2,
                                         const double* area, int64_t begin, int64_t end,
                                         double threshold, uint8_t* removed) {
  return suppression_pass_impl(box, area_box, x1, y1, x2, y2, area, begin, end, threshold, removed);
}

namespace {

// A sort key whose ascending order is the processing order of scores: descending, NaN first (as
// torch.sort(descending=True) places NaN), -0.0 equal to 0.0. Ties are left to the index that is
// paired with the key. Integer keys make the selection of propose's top-k several times faster
// than a comparator that tests for NaN.
inline uint64_t descending_key(float v) {
  if (v != v) return 0;
  v = v == 0.0f ? 0.0f : v;
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return uint64_t(~ascending) + 1;  // 1 .. 2^32: after NaN
}
inline uint64_t descending_key(double v) {
  if (v != v) return 0;
  v = v == 0.0 ? 0.0 : v;
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint64_t ascending = (bits & (uint64_t(1) << 63)) ? ~bits : (bits | (uint64_t(1) << 63));
  // ~ascending is never all ones here (that would be the bits of a NaN), so + 1 cannot wrap.
  return ~ascending + 1;
}

// Greedy NMS over candidates pushed in processing order.
template <typename T>
class GreedyNms {
 public:
  void clear() { x1_.clear(), y1_.clear(), x2_.clear(), y2_.clear(), area_.clear(), id_.clear(); }
  void push(const T* box, int64_t id) {
    x1_.push_back(box[0]), y1_.push_back(box[1]), x2_.push_back(box[2]), y2_.push_back(box[3]);
    area_.push_back(box_area(box));
    id_.push_back(id);
  }
  int64_t size() const { return static_cast<int64_t>(id_.size()); }

  // Keeps candidates greedily until none remain or max_keep are kept; writes the kept ids, in
  // order, to `kept` and returns their count. Consumes the candidates.
  int64_t run(T threshold, int64_t max_keep, int64_t* kept) {
    int64_t end = size(), count = 0, pending = 0;
    removed_.assign(static_cast<size_t>(end), 0);
    T *x1 = x1_.data(), *y1 = y1_.data(), *x2 = x2_.data(), *y2 = y2_.data();
    T* area = area_.data();
    int64_t* id = id_.data();
    uint8_t* removed = removed_.data();
    for (int64_t head = 0; count < max_keep; ++head) {
      while (head < end && removed[head]) ++head;
      if (head >= end) break;
      kept[count++] = id[head];
      const T box[4] = {x1[head], y1[head], x2[head], y2[head]};
      pending += suppression_pass(box, area[head], x1, y1, x2, y2, area, head + 1, end, threshold,
                                  removed);
      // Once a quarter of what remains is removed, squeeze it out so that later passes stop
      // paying for it (compacting after every kept box would cost more than the passes save).
      if (pending * 4 > end - head) {
        int64_t w = head + 1;
        for (int64_t j = head + 1; j < end; ++j) {  // branch-free: always copy, advance if kept
          x1[w] = x1[j], y1[w] = y1[j], x2[w] = x2[j], y2[w] = y2[j];
          area[w] = area[j], id[w] = id[j], removed[w] = removed[j];
          w += removed[j] ^ 1;
        }
        end = w;
        pending = 0;
      }
    }
    clear();
    return count;
  }

 private:
  std::vector<T> x1_, y1_, x2_, y2_, area_;
  std::vector<int64_t> id_;
  std::vector<uint8_t> removed_;
};

// Greedy NMS of all boxes as one list (nms).
at::Tensor greedy_nms(const NmsInputs& in, double iou_threshold) {
  const at::Tensor order = sorted_order(in.scores, 0).contiguous();
  std::vector<int64_t> kept(static_cast<size_t>(in.n));
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES(in.boxes.scalar_type(), "nms", [&] {
    const scalar_t* b = in.boxes.data_ptr<scalar_t>();
    const int64_t* o = order.data_ptr<int64_t>();
    GreedyNms<scalar_t> nms;
    for (int64_t p = 0; p < in.n; ++p) nms.push(b + 4 * o[p], o[p]);
    count = nms.run(threshold_below<scalar_t>(iou_threshold), in.n, kept.data());
  });
  return at::tensor(at::ArrayRef<int64_t>(kept.data(), count), at::kLong);
}

// Greedy NMS per group of in.groups, the groups in parallel (batched_nms).
at::Tensor greedy_batched_nms(const NmsInputs& in, double iou_threshold) {
  const at::Tensor order = sorted_order(in.scores, 0).contiguous();
  const int64_t* o = order.data_ptr<int64_t>();
  const int64_t* g = in.groups.data_ptr<int64_t>();
  // Processing order grouped by idxs, score order kept inside each group.
  std::vector<int64_t> grouped(o, o + in.n);
  std::stable_sort(grouped.begin(), grouped.end(),
                   [g](int64_t a, int64_t b) { return g[a] < g[b]; });
  std::vector<int64_t> starts;
  for (int64_t p = 0; p < in.n; ++p) {
    if (p == 0 || g[grouped[p]] != g[grouped[p - 1]]) starts.push_back(p);
  }
  const int64_t groups = static_cast<int64_t>(starts.size());
  starts.push_back(in.n);
  std::vector<uint8_t> keep(static_cast<size_t>(in.n), 0);
  AT_DISPATCH_FLOATING_TYPES(in.boxes.scalar_type(), "batched_nms", [&] {
    const scalar_t* b = in.boxes.data_ptr<scalar_t>();
    const scalar_t threshold = threshold_below<scalar_t>(iou_threshold);
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      GreedyNms<scalar_t> nms;
      std::vector<int64_t> kept;
      for (int64_t grp = begin; grp < end; ++grp) {
        for (int64_t p = starts[grp]; p < starts[grp + 1]; ++p) {
          nms.push(b + 4 * grouped[p], grouped[p]);
        }
        kept.resize(static_cast<size_t>(nms.size()));
        const int64_t count = nms.run(threshold, nms.size(), kept.data());
        for (int64_t c = 0; c < count; ++c) keep[kept[c]] = 1;  // distinct boxes per group
      }
    });
  });
  // Kept boxes of all groups in score order, as torchvision returns them.
  std::vector<int64_t> out;
  for (int64_t p = 0; p < in.n; ++p) {
    if (keep[o[p]]) out.push_back(o[p]);
  }
  return at::tensor(out, at::kLong);
}

}  // namespace

// The CPU's kernels (declared in proposals_kernels.h, where they replace the runner kernels).
at::Tensor nms_family_kernel(const CpuParallelRunner&, const char* op, const at::Tensor& boxes,
                             const at::Tensor& scores, const at::Tensor* idxs,
                             double iou_threshold) {
  auto in = prepare_nms(op, boxes, scores, idxs, iou_threshold);
  if (in.n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  return idxs == nullptr ? greedy_nms(in, iou_threshold) : greedy_batched_nms(in, iou_threshold);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> propose_kernel(
    const CpuParallelRunner&, const at::Tensor& anchors, const at::Tensor& deltas,
    const at::Tensor& objectness, const at::Tensor& image_sizes, const ProposeArgs& args,
    at::ArrayRef<double> weights, double clamp) {
  const int64_t post_nms_top_n = args.post_nms_top_n;
  auto in = prepare_propose(anchors, deltas, objectness, image_sizes, args, weights, clamp);
  check_image_sizes_eagerly("propose", image_sizes, anchors.scalar_type());
  auto out = empty_propose_outputs(in);
  const int64_t images = in.images, num_anchors = in.num_anchors, k = in.k;
  const int64_t max_keep = std::min(post_nms_top_n, k);
  const auto long_options = in.objectness.options().dtype(at::kLong);
  auto order = at::empty({images, k}, long_options);
  auto top_logits = at::empty({images, k}, in.objectness.options());
  auto cand_boxes = at::empty({images, k, 4}, in.deltas.options());
  auto kept = at::empty({images, max_keep}, long_options);
  auto kept_counts = at::empty({images}, long_options);
  at::Tensor scores;
  AT_DISPATCH_FLOATING_TYPES(in.deltas.scalar_type(), "propose", [&] {
    // 1. Per image, the k best anchors in processing order: a partial selection over (key, index)
    //    pairs, a strict total order, equals a stable descending sort at a fraction of its cost.
    const scalar_t* logits = in.objectness.data_ptr<scalar_t>();
    int64_t* ord = order.data_ptr<int64_t>();
    scalar_t* top = top_logits.data_ptr<scalar_t>();
    at::parallel_for(0, images, 1, [&](int64_t begin, int64_t end) {
      std::vector<std::pair<uint64_t, int64_t>> keyed(static_cast<size_t>(num_anchors));
      for (int64_t image = begin; image < end; ++image) {
        const scalar_t* l = logits + image * num_anchors;
        for (int64_t a = 0; a < num_anchors; ++a) keyed[a] = {descending_key(l[a]), a};
        std::nth_element(keyed.begin(), keyed.begin() + k, keyed.end());
        std::sort(keyed.begin(), keyed.begin() + k);
        for (int64_t r = 0; r < k; ++r) {
          ord[image * k + r] = keyed[r].second;
          top[image * k + r] = l[keyed[r].second];
        }
      }
    });
    // 2. Scores with ATen's sigmoid over the same [N, k] layout as torchvision's RPN, so the
    //    values (and the score-threshold decisions) are the same to the bit.
    scores = at::sigmoid(top_logits);
    const scalar_t* sc = scores.data_ptr<scalar_t>();
    const scalar_t* a_ptr = in.anchors.data_ptr<scalar_t>();
    const scalar_t* d_ptr = in.deltas.data_ptr<scalar_t>();
    const scalar_t* sizes = in.sizes.data_ptr<scalar_t>();
    const auto wt = to_weights<scalar_t>(weights);
    const auto clip = static_cast<scalar_t>(clamp);
    const auto min_sz = static_cast<scalar_t>(args.min_size);
    const auto score_thr = static_cast<scalar_t>(args.score_threshold);
    const scalar_t threshold = threshold_below<scalar_t>(args.iou_threshold);
    scalar_t* cand = cand_boxes.data_ptr<scalar_t>();
    int64_t* kept_p = kept.data_ptr<int64_t>();
    int64_t* counts_p = kept_counts.data_ptr<int64_t>();
    // 3. Per image: decode, clip and filter the candidates, NMS until post_nms_top_n are kept.
    at::parallel_for(0, images, 1, [&](int64_t begin, int64_t end) {
      GreedyNms<scalar_t> nms;
      for (int64_t image = begin; image < end; ++image) {
        const scalar_t height = sizes[2 * image], width = sizes[2 * image + 1];
        for (int64_t r = 0; r < k; ++r) {
          const int64_t a = ord[image * k + r];
          scalar_t raw[4];
          scalar_t* box = cand + 4 * (image * k + r);
          decode_proposal(d_ptr + 4 * (image * num_anchors + a), a_ptr + 4 * a, wt, clip, height,
                          width, raw, box);
          if (proposal_valid(box, sc[image * k + r], min_sz, score_thr)) nms.push(box, r);
        }
        counts_p[image] = nms.run(threshold, max_keep, kept_p + image * max_keep);
      }
    });
  });
  // 4. The output rows, with the CUDA kernel's own code.
  write_propose_outputs(CpuParallelRunner(), in, args, cand_boxes, scores, order, kept, kept_counts,
                        out);
  return {out.boxes, out.scores, out.counts, out.kept_anchors};
}

}  // namespace proposals
}  // namespace mlk

TORCH_LIBRARY_IMPL(mlkernels, CPU, m) {
  mlk::proposals::register_proposals<mlk::proposals::Kernels<mlk::CpuParallelRunner>>(m);
}
