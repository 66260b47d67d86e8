// Argument checks and preparation shared by beam_search_step's CPU, CUDA and emulated kernels.
// The Python fake kernel (mlkernels/ops/beam_search.py) repeats them, message for message.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "beam_search_math.h"

namespace mlk {
namespace beam_search {

constexpr const char* kOp = "beam_search_step";
// The driver's step (mlkernels/ops/beam_search.py): beam_search_step, the parents turned into
// rows, and the state tensors reordered along them, in one call.
constexpr const char* kAdvanceOp = "beam_search_advance";
// Candidate indices of a row live in the low 32 bits of a key (beam_search_math.h).
constexpr int64_t kMaxCandidates = int64_t(1) << 32;

struct StepInputs {
  const char* op = kOp;  // the op called, for messages
  at::Tensor log_probs, scores, used, finished;  // contiguous
  int64_t batch = 0, beams = 0, labels = 0, words = 0, limit = 0;
  float log_threshold = -INFINITY;
};

struct StepOutputs {
  at::Tensor scores, parents, labels, used, finished;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {scores, parents, labels, used, finished};
  }
};

inline void check_shape(const char* op, const char* arg, const at::Tensor& t,
                        at::IntArrayRef expected, const char* why) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", arg, " must be Tensor[", c10::Join(", ", expected),
              "] (", why, "), got ", shape_str(t));
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t,
                        at::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", arg, " must be ", dtype_str(expected),
              ", got ", dtype_str(t.scalar_type()));
}

// The checks of beam_search_step's arguments, and their contiguous forms; `op` names the op in the
// messages (beam_search_step, or beam_search_advance, which takes the same arguments).
inline StepInputs prepare_step(const at::Tensor& log_probs, const at::Tensor& scores,
                               const at::Tensor& used, const at::Tensor& finished,
                               double log_threshold, int64_t max_length, const char* op = kOp) {
  check_defined(op, "log_probs", log_probs);
  check_defined(op, "scores", scores);
  check_defined(op, "used", used);
  check_defined(op, "finished", finished);
  TORCH_CHECK(log_probs.dim() == 3, op, ": log_probs must be Tensor[B, K, C], got ",
              shape_str(log_probs));
  check_floating(op, "log_probs", log_probs, /*allow_half=*/true);
  const int64_t batch = log_probs.size(0), beams = log_probs.size(1), labels = log_probs.size(2);
  const int64_t words = pool_words(labels);
  check_shape(op, "scores", scores, {batch, beams}, "B and K of log_probs");
  check_dtype(op, "scores", scores, at::kFloat);
  check_shape(op, "used", used, {batch, beams, words}, "B and K of log_probs, ceil(C / 64) words");
  check_dtype(op, "used", used, at::kLong);
  check_shape(op, "finished", finished, {batch, beams}, "B and K of log_probs");
  check_dtype(op, "finished", finished, at::kBool);
  check_same_device(op, "log_probs", log_probs, "scores", scores);
  check_same_device(op, "log_probs", log_probs, "used", used);
  check_same_device(op, "log_probs", log_probs, "finished", finished);
  TORCH_CHECK_VALUE(log_threshold <= 0.0, op,
                    ": log_threshold must be in [-inf, 0] (the log of a probability), got ",
                    log_threshold);
  TORCH_CHECK_VALUE(max_length >= 1, op, ": max_length must be >= 1, got ", max_length);
  TORCH_CHECK(beams * (labels + 1) <= kMaxCandidates, op,
              ": log_probs must have K * (C + 1) <= 2**32 candidates per row, got ",
              shape_str(log_probs));
  StepInputs in;
  in.op = op;
  in.batch = batch;
  in.beams = beams;
  in.labels = labels;
  in.words = words;
  in.limit = max_length < labels ? max_length : labels;
  in.log_threshold = static_cast<float>(log_threshold);
  in.log_probs = contiguous_input(op, "log_probs", log_probs);
  in.scores = contiguous_input(op, "scores", scores);
  in.used = contiguous_input(op, "used", used);
  in.finished = contiguous_input(op, "finished", finished);
  return in;
}

inline StepOutputs allocate_step_outputs(const StepInputs& in) {
  const char* op = in.op;
  const auto options = in.scores.options();
  StepOutputs out;
  out.scores = allocate_output(op, {in.batch, in.beams}, options);
  out.parents = allocate_output(op, {in.batch, in.beams}, options.dtype(at::kLong));
  out.labels = allocate_output(op, {in.batch, in.beams}, options.dtype(at::kLong));
  out.used = allocate_output(op, {in.batch, in.beams, in.words}, options.dtype(at::kLong));
  out.finished = allocate_output(op, {in.batch, in.beams}, options.dtype(at::kBool));
  return out;
}

// The math's view of one call's tensors.
template <typename T>
StepArgs<T> step_args(const StepInputs& in, const StepOutputs& out) {
  StepArgs<T> a;
  a.beams = in.beams;
  a.labels = in.labels;
  a.words = in.words;
  a.limit = in.limit;
  a.log_threshold = in.log_threshold;
  a.log_probs = in.log_probs.data_ptr<T>();
  a.scores = in.scores.data_ptr<float>();
  a.pools = reinterpret_cast<const uint64_t*>(in.used.data_ptr<int64_t>());
  a.finished = in.finished.data_ptr<bool>();
  a.out_scores = out.scores.data_ptr<float>();
  a.out_parents = out.parents.data_ptr<int64_t>();
  a.out_labels = out.labels.data_ptr<int64_t>();
  a.out_pools = reinterpret_cast<uint64_t*>(out.used.data_ptr<int64_t>());
  a.out_finished = out.finished.data_ptr<bool>();
  return a;
}

// ---- beam_search_advance ------------------------------------------------------------------------

// Every state tensor has one row per beam (B * K).
inline void check_state(const StepInputs& in, at::TensorList state) {
  const int64_t rows = in.batch * in.beams;
  for (size_t i = 0; i < state.size(); ++i) {
    TORCH_CHECK(state[i].dim() >= 1 && state[i].size(0) == rows, in.op, ": state[", i,
                "] must have leading dimension B * K = ", rows, ", got ", shape_str(state[i]));
  }
}

// The state tensors' rows picked by `sources` (each tensor on its own device). The rows are valid,
// so only the copy's memory can fail (an expanded state that no memory holds once copied): the
// error names the tensor.
// A contiguous CPU tensor with CPU sources is copied row by row, in this thread: a search's state
// is a few KB per beam, too little to be worth waking other threads for between the model's steps.
inline at::Tensor pick_rows(const at::Tensor& t, const at::Tensor& sources) {
  const bool plain = t.layout() == at::kStrided && !t.is_quantized() && !t.is_conj() &&
                     !t.is_neg() && t.is_contiguous();  // its bytes are its values, in order
  if (!(t.is_cpu() && sources.is_cpu() && plain)) {
    return t.index_select(0, t.device() == sources.device() ? sources : sources.to(t.device()));
  }
  at::Tensor out = at::empty_like(t, at::MemoryFormat::Contiguous);
  const int64_t rows = t.size(0);
  if (rows == 0 || t.numel() == 0) return out;
  const size_t row_bytes = static_cast<size_t>(t.numel() / rows) * t.element_size();
  const auto* from = static_cast<const char*>(t.const_data_ptr());
  auto* to = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* source = sources.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(to + r * row_bytes, from + source[r] * row_bytes, row_bytes);
  }
  return out;
}

// finished.all(); on the CPU a loop over the B * K flags, without a reduction's machinery.
inline at::Tensor all_finished(const at::Tensor& finished) {
  if (!finished.is_cpu()) return finished.all();
  const bool* flags = finished.const_data_ptr<bool>();
  return at::scalar_tensor(std::all_of(flags, flags + finished.numel(), [](bool f) { return f; }),
                           finished.options());
}

inline std::vector<at::Tensor> reorder_state(const char* op, at::TensorList state,
                                             const at::Tensor& sources) {
  std::vector<at::Tensor> out;
  out.reserve(state.size());
  for (size_t i = 0; i < state.size(); ++i) {
    const at::Tensor& t = state[i];
    try {
      out.push_back(pick_rows(t, sources));
    } catch (const c10::Error& error) {
      const std::string what = error.what_without_backtrace();
      TORCH_CHECK(false, op, ": state[", i, "] reordered, ", shape_str(t),
                  ", could not be allocated (", what.substr(0, what.find('\n')), ")");
    }
  }
  return out;
}

// ---- beam_search_backtrack ----------------------------------------------------------------------

constexpr const char* kBacktrackOp = "beam_search_backtrack";

struct BacktrackInputs {
  at::Tensor sources, labels, scores;  // contiguous
  int64_t steps = 0, rows = 0, width = 0;
};

inline BacktrackInputs prepare_backtrack(const at::Tensor& sources, const at::Tensor& labels,
                                         const at::Tensor& scores, int64_t width) {
  const char* op = kBacktrackOp;
  check_defined(op, "sources", sources);
  check_defined(op, "labels", labels);
  check_defined(op, "scores", scores);
  TORCH_CHECK(sources.dim() == 2, op, ": sources must be Tensor[T, R] (T steps, R = B * K beams), ",
              "got ", shape_str(sources));
  TORCH_CHECK(sources.scalar_type() == at::kLong, op, ": sources must be int64, got ",
              dtype_str(sources.scalar_type()));
  TORCH_CHECK(labels.sizes() == sources.sizes(), op, ": labels must be Tensor[",
              c10::Join(", ", sources.sizes()), "] (the shape of sources), got ", shape_str(labels));
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
              dtype_str(labels.scalar_type()));
  TORCH_CHECK(scores.dim() == 2 && scores.numel() == sources.size(1), op,
              ": scores must be Tensor[B, K] with B * K = R = ", sources.size(1),
              " (the beams of sources), got ", shape_str(scores));
  TORCH_CHECK(scores.scalar_type() == at::kFloat, op, ": scores must be float32, got ",
              dtype_str(scores.scalar_type()));
  check_same_device(op, "sources", sources, "labels", labels);
  check_same_device(op, "sources", sources, "scores", scores);
  TORCH_CHECK_VALUE(width >= sources.size(0), op,
                    ": width must be at least the number of steps T = ", sources.size(0), ", got ",
                    width);
  BacktrackInputs in;
  in.steps = sources.size(0);
  in.rows = sources.size(1);
  in.width = width;
  in.sources = contiguous_input(op, "sources", sources);
  in.labels = contiguous_input(op, "labels", labels);
  in.scores = contiguous_input(op, "scores", scores);
  return in;
}

}  // namespace beam_search
}  // namespace mlk
