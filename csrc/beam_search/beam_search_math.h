// Beam search step math shared by the CPU kernel, the CUDA kernel and the grid emulator.
//
// One batch row holds K beams over C labels. Its candidates are numbered
//   index = beam * (C + 1) + slot,   slot 0: the beam itself, carried (label -1),
//                                    slot c + 1: the beam extended by label c,
// so that index order is the tie order of the contract (beam, then label, ascending). A
// candidate's key packs its score (order-preserving bits, high 32) and its index (inverted, low
// 32) into one uint64: the larger key is the better candidate under the strict total order
// "score descending, then beam, then label ascending", and keys are unique. Both kernels select
// the K largest keys of a row; they differ only in how (a bounded heap on the CPU, a radix select
// in shared memory on CUDA), so their results are equal to the bit.
//
// A beam is empty (score -inf or NaN, whatever `finished` says: the padding of a step), finished
// (carried unchanged), or live. A live beam of length < limit (limit = min(max_length, C); the
// length is the popcount of its pool) has a candidate per label c outside its pool whose score
// s + log_probs[c] is > -inf (NaN log-probs count as -inf) and >= log_threshold; a live beam
// without one is carried, and becomes finished. An extended beam whose new length reaches the
// limit is finished at once (it could not be extended again).
#pragma once

#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common/grid.h"
#include "../common/macros.h"

namespace mlk {
namespace beam_search {

constexpr int64_t kWordBits = 64;

// The number of 64-bit pool words for C labels: ceil(C / 64).
MLK_HOST_DEVICE int64_t pool_words(int64_t labels) { return (labels + kWordBits - 1) / kWordBits; }

MLK_HOST_DEVICE int popcount64(uint64_t word) {
#if MLK_ON_DEVICE
  return __popcll(word);
#else
  return __builtin_popcountll(word);
#endif
}

MLK_HOST_DEVICE bool label_used(const uint64_t* pool, int64_t label) {
  return ((pool[label / kWordBits] >> (label % kWordBits)) & 1u) != 0;
}

// The number of labels in a pool: its bits below C (bits past C, if a caller set any, are not
// labels and do not count).
MLK_HOST_DEVICE int64_t pool_length(const uint64_t* pool, int64_t words, int64_t labels) {
  int64_t length = 0;
  for (int64_t w = 0; w < words; ++w) {
    uint64_t word = pool[w];
    const int64_t bits_here = labels - w * kWordBits;
    if (bits_here < kWordBits) word &= (uint64_t(1) << bits_here) - 1;
    length += popcount64(word);
  }
  return length;
}

// A log-probability as the float32 the scores are computed in (float16/bfloat16 exactly, float64
// rounded to nearest).
template <typename T>
MLK_HOST_DEVICE float to_float(T value) {
  return static_cast<float>(value);
}

// A candidate score that may enter the selection: a path of non-zero probability (NaN fails both
// comparisons) at or above the threshold.
MLK_HOST_DEVICE bool score_valid(float score, float log_threshold) {
  return score > -INFINITY && score >= log_threshold;
}

// A beam's score that makes it a beam at all (-inf and NaN: an empty slot).
MLK_HOST_DEVICE bool beam_present(float score) { return score > -INFINITY; }

MLK_HOST_DEVICE uint32_t float_bits(float value) {
#if MLK_ON_DEVICE
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

// The key of a candidate (see above); `count` is the row's number of candidates K * (C + 1),
// at most 2**32. -0.0 and +0.0 get one key, as they compare equal.
MLK_HOST_DEVICE uint64_t candidate_key(float score, int64_t index, int64_t count) {
  if (score == 0.0f) score = 0.0f;
  const uint32_t bits = float_bits(score);
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(ordered) << 32) | static_cast<uint64_t>(count - 1 - index);
}

// The score a key was made from (-0.0 comes back as +0.0).
MLK_HOST_DEVICE float key_score(uint64_t key) {
  const uint32_t ordered = static_cast<uint32_t>(key >> 32);
  const uint32_t bits = (ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered;
#if MLK_ON_DEVICE
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

MLK_HOST_DEVICE int64_t key_index(uint64_t key, int64_t count) {
  return count - 1 - static_cast<int64_t>(key & 0xffffffffu);
}

// What a beam contributes to its row's candidates.
enum BeamKind : int32_t { kEmpty = 0, kCarried = 1, kExpands = 2 };

// The row's inputs and outputs (contiguous): log_probs [K, C], scores/finished [K],
// pools [K, W]; outputs scores/parents/labels/finished [K] and pools [K, W].
template <typename T>
struct StepArgs {
  int64_t beams, labels, words, limit;  // limit = min(max_length, C)
  float log_threshold;
  const T* log_probs;
  const float* scores;
  const uint64_t* pools;
  const bool* finished;
  float* out_scores;
  int64_t* out_parents;
  int64_t* out_labels;
  uint64_t* out_pools;
  bool* out_finished;
};

// Whether a live beam of `length` labels has at least one valid candidate.
template <typename T>
MLK_HOST_DEVICE bool has_candidate(const StepArgs<T>& a, const T* log_probs, float score,
                                   const uint64_t* pool, int64_t length) {
  if (length >= a.limit) return false;
  for (int64_t c = 0; c < a.labels; ++c) {
    if (score_valid(score + to_float(log_probs[c]), a.log_threshold) && !label_used(pool, c)) {
      return true;
    }
  }
  return false;
}

// Beam k of batch row b: its kind and (through `length`) the size of its pool.
template <typename T>
MLK_HOST_DEVICE BeamKind classify_beam(const StepArgs<T>& a, int64_t b, int64_t k,
                                       int64_t* length) {
  const int64_t beam = b * a.beams + k;
  const uint64_t* pool = a.pools + beam * a.words;
  *length = pool_length(pool, a.words, a.labels);
  const float score = a.scores[beam];
  if (!beam_present(score)) return kEmpty;
  if (a.finished[beam]) return kCarried;
  return has_candidate(a, a.log_probs + beam * a.labels, score, pool, *length) ? kExpands
                                                                               : kCarried;
}

// Writes output slot `rank` of row b from the candidate with key `key` (a selected candidate), or
// the padding (score -inf, parent and label -1, empty pool, finished) when `key_present` is false.
// `length` is the parent's pool size.
template <typename T>
MLK_HOST_DEVICE void write_slot(const StepArgs<T>& a, int64_t b, int64_t rank, bool key_present,
                                uint64_t key, int64_t length) {
  const int64_t out = b * a.beams + rank;
  uint64_t* out_pool = a.out_pools + out * a.words;
  if (!key_present) {
    a.out_scores[out] = -INFINITY;
    a.out_parents[out] = -1;
    a.out_labels[out] = -1;
    a.out_finished[out] = true;
    for (int64_t w = 0; w < a.words; ++w) out_pool[w] = 0;
    return;
  }
  const int64_t index = key_index(key, a.beams * (a.labels + 1));
  const int64_t k = index / (a.labels + 1), label = index % (a.labels + 1) - 1;
  const int64_t parent = b * a.beams + k;
  const float score = a.scores[parent];
  const uint64_t* pool = a.pools + parent * a.words;
  for (int64_t w = 0; w < a.words; ++w) out_pool[w] = pool[w];
  a.out_parents[out] = k;
  a.out_labels[out] = label;
  if (label < 0) {
    a.out_scores[out] = score;
    a.out_finished[out] = true;
    return;
  }
  // The same float addition as when the candidate was selected: the same bits.
  a.out_scores[out] = score + to_float(a.log_probs[parent * a.labels + label]);
  out_pool[label / kWordBits] |= uint64_t(1) << (label % kWordBits);
  a.out_finished[out] = length + 1 >= a.limit;
}

// The row of the step's inputs (b * K + k) that output beam `out` (b * K + rank) came from, given
// its parent k: the driver reorders the state tensors along these rows. An empty slot (parent -1)
// takes its batch row's first beam, whose state it never reads.
MLK_HOST_DEVICE int64_t source_row(int64_t out, int64_t parent, int64_t beams) {
  return out - out % beams + (parent > 0 ? parent : 0);
}

// ---- the CUDA kernel: one block per batch row, a radix select of the K largest keys ----
//
// Shared memory: the kinds and pool sizes of the K beams, one count per thread, the selection
// state, and the selected keys (at most K). The select decides the K-th largest key one bit at a
// time from the top: a phase counts (per thread, then a tree sum) the valid keys under the prefix
// decided so far whose next bit is 1; it stops as soon as every key under the prefix is selected
// (typically after about log2(K * (C + 1)) bits, at most 64).

struct SelectState {
  uint64_t prefix;    // the decided high bits of the threshold key, lower bits 0
  uint64_t mask;      // which bits are decided
  int64_t remaining;  // keys still to select under the prefix
  int64_t matching;   // valid keys under the prefix
  int64_t total;      // the tree sum's result
  int64_t selected;   // number of selected keys (min(K, valid keys))
};

struct SharedLayout {
  int32_t* kinds;      // [K]
  int64_t* lengths;    // [K]
  int64_t* counts;     // [threads]
  SelectState* state;  // [1]
  uint64_t* keys;      // [K] the selected keys, unordered
};

MLK_HOST_DEVICE int64_t align8(int64_t bytes) { return (bytes + 7) / 8 * 8; }

MLK_HOST_DEVICE int64_t shared_bytes(int64_t beams, int64_t threads) {
  return align8(beams * 4) + beams * 8 + threads * 8 + align8(sizeof(SelectState)) + beams * 8;
}

template <typename Byte>
MLK_HOST_DEVICE SharedLayout shared_layout(Byte* base, int64_t beams, int64_t threads) {
  unsigned char* p = reinterpret_cast<unsigned char*>(base);
  SharedLayout s;
  s.kinds = reinterpret_cast<int32_t*>(p);
  p += align8(beams * 4);
  s.lengths = reinterpret_cast<int64_t*>(p);
  p += beams * 8;
  s.counts = reinterpret_cast<int64_t*>(p);
  p += threads * 8;
  s.state = reinterpret_cast<SelectState*>(p);
  p += align8(sizeof(SelectState));
  s.keys = reinterpret_cast<uint64_t*>(p);
  return s;
}

// Candidate `index` of row b: whether it is valid, and its key.
template <typename T>
MLK_HOST_DEVICE bool candidate(const StepArgs<T>& a, const SharedLayout& s, int64_t b,
                               int64_t index, uint64_t* key) {
  const int64_t k = index / (a.labels + 1), label = index % (a.labels + 1) - 1;
  const int32_t kind = s.kinds[k];
  if (kind == kEmpty || (kind == kCarried) != (label < 0)) return false;
  const int64_t beam = b * a.beams + k;
  float score = a.scores[beam];
  if (label >= 0) {
    if (label_used(a.pools + beam * a.words, label)) return false;
    score = score + to_float(a.log_probs[beam * a.labels + label]);
    if (!score_valid(score, a.log_threshold)) return false;
  }
  *key = candidate_key(score, index, a.beams * (a.labels + 1));
  return true;
}

// Phase 1: the kinds and pool sizes of the row's beams; thread 0 resets the selection.
template <typename T>
MLK_HOST_DEVICE void classify_phase(const ThreadIndex& t, const StepArgs<T>& a,
                                    const SharedLayout& s) {
  const int64_t b = t.block.x;
  for (int64_t k = t.thread_rank(); k < a.beams; k += t.block_dim.count()) {
    int64_t length = 0;
    s.kinds[k] = classify_beam(a, b, k, &length);
    s.lengths[k] = length;
  }
  if (t.thread_rank() == 0) {
    s.state->prefix = 0;
    s.state->mask = 0;
    s.state->selected = 0;
  }
}

// Counting phase: the thread's valid keys k with (k & mask) == prefix, and with `bit` set unless
// bit is 64 (count every key under the prefix).
template <typename T>
MLK_HOST_DEVICE void count_phase(const ThreadIndex& t, const StepArgs<T>& a, const SharedLayout& s,
                                 int bit) {
  const int64_t b = t.block.x, count = a.beams * (a.labels + 1);
  const uint64_t prefix = s.state->prefix, mask = s.state->mask;
  const uint64_t want = bit < 64 ? uint64_t(1) << bit : 0;
  int64_t n = 0;
  for (int64_t i = t.thread_rank(); i < count; i += t.block_dim.count()) {
    uint64_t key;
    if (candidate(a, s, b, i, &key) && (key & mask) == prefix && (key & want) == want) ++n;
  }
  s.counts[t.thread_rank()] = n;
}

// Tree-sum phase over counts (threads a power of two): stride threads add their partner's count;
// at stride 1 thread 0 stores the total.
MLK_HOST_DEVICE void sum_phase(const ThreadIndex& t, const SharedLayout& s, int64_t stride) {
  const int64_t r = t.thread_rank();
  if (r >= stride) return;
  const int64_t sum = s.counts[r] + s.counts[r + stride];
  if (stride == 1) {
    s.state->total = sum;
  } else {
    s.counts[r] = sum;
  }
}

// After the first count (bit 64: every valid key): how many are selected. Thread 0.
MLK_HOST_DEVICE void start_select_phase(const ThreadIndex& t, const SharedLayout& s,
                                        int64_t beams) {
  if (t.thread_rank() != 0) return;
  SelectState& st = *s.state;
  st.matching = st.total;
  st.selected = st.total < beams ? st.total : beams;
  st.remaining = st.selected;
}

// After counting bit `bit`: decide it (thread 0). Returns nothing; done() reads the state.
MLK_HOST_DEVICE void decide_bit_phase(const ThreadIndex& t, const SharedLayout& s, int bit) {
  if (t.thread_rank() != 0) return;
  SelectState& st = *s.state;
  const uint64_t value = uint64_t(1) << bit;
  if (st.total >= st.remaining) {
    st.prefix |= value;
    st.matching = st.total;
  } else {
    st.remaining -= st.total;
    st.matching -= st.total;
  }
  st.mask |= value;
}

// Whether the selection is decided: every key under the prefix is selected.
MLK_HOST_DEVICE bool select_done(const SharedLayout& s) {
  return s.state->matching == s.state->remaining;
}

// Compaction, phase 1: each thread counts its selected keys (key >= prefix).
template <typename T>
MLK_HOST_DEVICE void count_selected_phase(const ThreadIndex& t, const StepArgs<T>& a,
                                          const SharedLayout& s) {
  const int64_t b = t.block.x, count = a.beams * (a.labels + 1);
  const uint64_t prefix = s.state->prefix;
  int64_t n = 0;
  for (int64_t i = t.thread_rank(); i < count; i += t.block_dim.count()) {
    uint64_t key;
    if (candidate(a, s, b, i, &key) && key >= prefix) ++n;
  }
  s.counts[t.thread_rank()] = n;
}

// Compaction, phase 2: thread 0 turns the counts into exclusive offsets.
MLK_HOST_DEVICE void offsets_phase(const ThreadIndex& t, const SharedLayout& s) {
  if (t.thread_rank() != 0) return;
  int64_t offset = 0;
  for (int64_t r = 0; r < t.block_dim.count(); ++r) {
    const int64_t n = s.counts[r];
    s.counts[r] = offset;
    offset += n;
  }
}

// Compaction, phase 3: each thread writes its selected keys from its offset on.
template <typename T>
MLK_HOST_DEVICE void compact_phase(const ThreadIndex& t, const StepArgs<T>& a,
                                   const SharedLayout& s) {
  const int64_t b = t.block.x, count = a.beams * (a.labels + 1);
  const uint64_t prefix = s.state->prefix;
  int64_t at = s.counts[t.thread_rank()];
  for (int64_t i = t.thread_rank(); i < count; i += t.block_dim.count()) {
    uint64_t key;
    if (candidate(a, s, b, i, &key) && key >= prefix) s.keys[at++] = key;
  }
}

// Last phase: each selected key goes to the output slot of its rank (the number of larger
// selected keys; keys are unique), and the slots past the selection are padding.
template <typename T>
MLK_HOST_DEVICE void write_phase(const ThreadIndex& t, const StepArgs<T>& a,
                                 const SharedLayout& s) {
  const int64_t b = t.block.x, selected = s.state->selected;
  for (int64_t j = t.thread_rank(); j < a.beams; j += t.block_dim.count()) {
    if (j >= selected) {
      write_slot(a, b, j, false, 0, 0);
      continue;
    }
    const uint64_t key = s.keys[j];
    int64_t rank = 0;
    for (int64_t i = 0; i < selected; ++i) rank += s.keys[i] > key ? 1 : 0;
    const int64_t k = key_index(key, a.beams * (a.labels + 1)) / (a.labels + 1);
    write_slot(a, b, rank, true, key, s.lengths[k]);
  }
}

// ---- the search's end: following each final beam back through the steps ----------------------

// beam_search_backtrack's view of its tensors. Rows are beams numbered b * K + k at every step.
struct BacktrackArgs {
  const int64_t* sources = nullptr;  // [steps, rows]: the row each beam of step t came from
  const int64_t* labels = nullptr;   // [steps, rows]: the label it added at step t (-1: none)
  const float* scores = nullptr;     // [rows]: the final beams' scores (-inf, NaN: empty slot)
  int64_t steps = 0, rows = 0, width = 0;
  int64_t* out_paths = nullptr;    // [rows, width]
  int64_t* out_lengths = nullptr;  // [rows]
  // Host runs only (CPU, emulator): set when a source is out of [0, rows), for the op to raise.
  // On a GPU it is null and the thread asserts instead (a kernel error, no host sync per call).
  int* bad_source = nullptr;
};

// One final beam (one thread): its labels at every step, in step order, followed back along the
// sources; -1 past the steps, and everywhere for an empty slot. Its length counts labels >= 0.
MLK_HOST_DEVICE void backtrack_row(const BacktrackArgs& a, int64_t row) {
  int64_t* path = a.out_paths + row * a.width;
  for (int64_t t = a.steps; t < a.width; ++t) path[t] = -1;
  int64_t length = 0;
  const bool present = beam_present(a.scores[row]);
  int64_t r = row;
  for (int64_t t = a.steps - 1; t >= 0; --t) {
    const int64_t label = present ? a.labels[t * a.rows + r] : -1;
    path[t] = label;
    length += label >= 0 ? 1 : 0;
    if (!present || t == 0) continue;
    const int64_t source = a.sources[t * a.rows + r];
    if (source < 0 || source >= a.rows) {
#if MLK_ON_DEVICE
      assert(false && "beam_search_backtrack: a source row is out of range");
#else
      __atomic_store_n(a.bad_source, 1, __ATOMIC_RELAXED);
#endif
      for (int64_t u = t - 1; u >= 0; --u) path[u] = -1;
      length = 0;
      break;
    }
    r = source;
  }
  a.out_lengths[row] = length;
}

}  // namespace beam_search
}  // namespace mlk
