// The CPU kernel of beam_search_step: batch rows in parallel; per row, one pass over the K x C
// candidates that keeps the K best keys (beam_search_math.h) in a bounded min-heap. The heap lives
// in the row's `parents` output (K int64 slots), so a step allocates nothing beyond its outputs.
// Candidates are visited in index order, so a candidate that ties the heap's worst score loses
// the tie: the filter is one float comparison against that score, done 16 labels at a time in a
// loop the compiler vectorizes; only the rare labels that pass it are tested against the pool.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>

#include "../common/cpu_runner.h"
#include "beam_search_kernels.h"

namespace mlk {
namespace beam_search {
namespace {

constexpr int64_t kChunk = 16;
// Candidates per parallel task: below this a row is too little work to spread.
constexpr int64_t kGrain = 32768;

// A min-heap of at most `capacity` keys: the worst kept candidate at the root.
class KeyHeap {
 public:
  KeyHeap(uint64_t* keys, int64_t capacity) : keys_(keys), capacity_(capacity) {}

  int64_t size() const { return size_; }
  // The score a candidate must beat to enter: the worst kept one's once the heap is full.
  float bound() const { return size_ == capacity_ ? key_score(keys_[0]) : -INFINITY; }
  bool admits(uint64_t key) const { return size_ < capacity_ || key > keys_[0]; }

  void push(uint64_t key) {
    if (size_ < capacity_) {
      int64_t i = size_++;
      while (i > 0 && keys_[(i - 1) / 2] > key) {
        keys_[i] = keys_[(i - 1) / 2];
        i = (i - 1) / 2;
      }
      keys_[i] = key;
      return;
    }
    int64_t i = 0;
    for (;;) {
      int64_t child = 2 * i + 1;
      if (child >= size_) break;
      if (child + 1 < size_ && keys_[child + 1] < keys_[child]) ++child;
      if (keys_[child] >= key) break;
      keys_[i] = keys_[child];
      i = child;
    }
    keys_[i] = key;
  }

  // The kept keys, best first, in keys[0, size).
  void sort_descending() { std::sort(keys_, keys_ + size_, std::greater<uint64_t>()); }

 private:
  uint64_t* keys_;
  int64_t capacity_;
  int64_t size_ = 0;
};

// Whether any of the n labels from `log_probs` could enter: a score above `bound` and at or above
// the threshold (NaN and -inf fail). Written for the vectorizer: no early exit. Not inlined: GCC
// vectorizes it on its own but not once inlined into step_row's loop (the scalar form took a
// quarter longer per step).
template <typename T, int64_t N>
__attribute__((noinline)) bool chunk_hits(const T* log_probs, float score, float bound,
                                          float log_threshold) {
  int hit = 0;
  for (int64_t i = 0; i < N; ++i) {
    const float v = score + to_float(log_probs[i]);
    hit |= static_cast<int>(v > bound) & static_cast<int>(v >= log_threshold);
  }
  return hit != 0;
}

template <typename T>
void step_row(const StepArgs<T>& a, int64_t b) {
  const int64_t labels = a.labels, count = a.beams * (labels + 1);
  KeyHeap heap(reinterpret_cast<uint64_t*>(a.out_parents + b * a.beams), a.beams);
  for (int64_t k = 0; k < a.beams; ++k) {
    int64_t length = 0;
    const BeamKind kind = classify_beam(a, b, k, &length);
    if (kind == kEmpty) continue;
    const int64_t beam = b * a.beams + k;
    const float score = a.scores[beam];
    if (kind == kCarried) {
      const uint64_t key = candidate_key(score, k * (labels + 1), count);
      if (heap.admits(key)) heap.push(key);
      continue;
    }
    const T* log_probs = a.log_probs + beam * labels;
    const uint64_t* pool = a.pools + beam * a.words;
    float bound = heap.bound();
    for (int64_t c0 = 0; c0 < labels; c0 += kChunk) {
      const int64_t n = std::min(kChunk, labels - c0);
      const bool hit = n == kChunk
                           ? chunk_hits<T, kChunk>(log_probs + c0, score, bound, a.log_threshold)
                           : true;  // the tail: tested label by label below
      if (!hit) continue;
      for (int64_t c = c0; c < c0 + n; ++c) {
        const float v = score + to_float(log_probs[c]);
        if (!(v > bound) || !score_valid(v, a.log_threshold) || label_used(pool, c)) continue;
        heap.push(candidate_key(v, k * (labels + 1) + c + 1, count));
        bound = heap.bound();
      }
    }
  }
  heap.sort_descending();
  const uint64_t* keys = reinterpret_cast<const uint64_t*>(a.out_parents + b * a.beams);
  for (int64_t j = 0; j < a.beams; ++j) {
    if (j >= heap.size()) {
      write_slot(a, b, j, false, 0, 0);
      continue;
    }
    const uint64_t key = keys[j];  // read before write_slot puts the parent in its place
    const int64_t parent = b * a.beams + key_index(key, count) / (labels + 1);
    write_slot(a, b, j, true, key, pool_length(a.pools + parent * a.words, a.words, labels));
  }
}

}  // namespace

void step_kernel(const CpuParallelRunner&, const StepInputs& in, const StepOutputs& out) {
  const int64_t per_row = std::max<int64_t>(1, in.beams * (in.labels + 1));
  const int64_t grain = std::max<int64_t>(1, kGrain / per_row);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.log_probs.scalar_type(), kOp, [&] {
    const StepArgs<scalar_t> a = step_args<scalar_t>(in, out);
    at::parallel_for(0, in.batch, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) step_row(a, b);
    });
  });
}

}  // namespace beam_search
}  // namespace mlk

TORCH_LIBRARY_IMPL(mlkernels, CPU, m) {
  mlk::beam_search::register_beam_search<mlk::beam_search::Kernels<mlk::CpuParallelRunner>>(m);
}
