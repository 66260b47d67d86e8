// Checks the CPU grid emulator itself (csrc/common/emulator.h): grid-stride coverage, barriers
// between phases, shared memory, per-thread state, that a missing barrier shows up, and that
// shared memory is not silently zero at block start.
// Built and run by tests/test_emulator.py; prints one line per check and exits non-zero on failure.
#include <cstdio>
#include <vector>

#include "common/emulator.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAILED", what);
  if (!ok) ++failures;
}

struct SumState {
  double acc;
};

// A block-wise tree reduction, written as a kernel would be: each phase ends at a barrier.
template <typename Runner>
void block_sums(const Runner& run, const std::vector<double>& in, std::vector<double>& out) {
  mlk::LaunchConfig config;
  config.grid.x = static_cast<int64_t>(out.size());
  config.block.x = 64;
  config.shared_bytes = 64 * sizeof(double);
  const double* data = in.data();
  double* result = out.data();
  const int64_t n = static_cast<int64_t>(in.size());
  run.blocks(config, [=](typename Runner::Block& block) {
    double* partial = block.template shared<double>();
    auto state = block.template per_thread<SumState>();
    block.phase([&](const mlk::ThreadIndex& t) {
      state[t].acc = 0;
      for (int64_t i = t.global_x(); i < n; i += t.grid_stride_x()) state[t].acc += data[i];
    });
    block.phase([&](const mlk::ThreadIndex& t) { partial[t.thread.x] = state[t].acc; });
    for (int64_t stride = 32; stride > 0; stride /= 2) {
      block.phase([&](const mlk::ThreadIndex& t) {
        if (t.thread.x < stride) partial[t.thread.x] += partial[t.thread.x + stride];
      });
    }
    block.phase([&](const mlk::ThreadIndex& t) {
      if (t.thread.x == 0) result[t.block.x] = partial[0];
    });
  });
}

}  // namespace

int main() {
  const mlk::EmulatorRunner run;

  // Every element of a grid-stride loop is visited exactly once, for sizes around the cap.
  for (int64_t n : {0, 1, 255, 256, 257, 5000}) {
    std::vector<int> visits(static_cast<size_t>(n), 0);
    int* v = visits.data();
    run.threads(mlk::launch_config_1d(n, 128, 3), [=](const mlk::ThreadIndex& t) {
      for (int64_t i = t.global_x(); i < n; i += t.grid_stride_x()) v[i] += 1;
    });
    bool once = true;
    for (int x : visits) once = once && x == 1;
    expect(once, "grid-stride loop visits each element once");
  }

  // Barriers, shared memory and per-thread state: block sums add up to the total.
  std::vector<double> in(10000);
  double total = 0;
  for (size_t i = 0; i < in.size(); ++i) total += (in[i] = static_cast<double>(i % 97));
  std::vector<double> out(3, -1.0);
  block_sums(run, in, out);
  expect(out[0] + out[1] + out[2] == total, "block tree reduction sums to the total");

  // A phase that reads what another thread of the same phase writes (a missing barrier) gives
  // a different answer from the barrier-separated version: the emulator exposes the race.
  mlk::LaunchConfig config;
  config.block.x = 8;
  config.shared_bytes = 8 * sizeof(int);
  std::vector<int> racy(8), safe(8);
  run.blocks(config, [&](mlk::EmulatorRunner::Block& block) {
    int* s = block.shared<int>();
    block.phase([&](const mlk::ThreadIndex& t) {
      s[t.thread.x] = static_cast<int>(t.thread.x) + 1;
      racy[t.thread.x] = t.thread.x > 0 ? s[t.thread.x - 1] : 0;  // neighbour not written yet
    });
    block.phase([&](const mlk::ThreadIndex& t) {
      safe[t.thread.x] = t.thread.x > 0 ? s[t.thread.x - 1] : 0;
    });
  });
  expect(safe[7] == 7 && racy[7] != 7, "a missing barrier changes the result");

  // Shared memory is not zero at block start (CUDA leaves it uninitialized): a kernel that sums
  // into it without first writing it gets NaN, not a plausible answer.
  mlk::LaunchConfig acc_config;
  acc_config.block.x = 4;
  acc_config.shared_bytes = 4 * sizeof(float);
  float unset = 0.0f;
  run.blocks(acc_config, [&](mlk::EmulatorRunner::Block& block) {
    float* s = block.shared<float>();
    block.phase([&](const mlk::ThreadIndex& t) { s[t.thread.x] += 1.0f; });
    block.phase([&](const mlk::ThreadIndex& t) {
      if (t.thread.x == 0) unset = s[0] + s[1] + s[2] + s[3];
    });
  });
  expect(unset != unset, "shared memory starts poisoned (NaN), not zero");

  return failures == 0 ? 0 : 1;
}
