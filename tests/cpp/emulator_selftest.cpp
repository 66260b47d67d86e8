// Checks the CPU grid emulator itself (csrc/common/emulator.h): grid-stride coverage, barriers
// between phases, shared memory, per-thread state, that a missing barrier shows up, and that
// shared memory is not silently zero at block start, and that launches beyond CUDA's limits are
// refused with a message naming the limit and the config.
// Built and run by tests/test_emulator.py; prints one line per check and exits non-zero on failure.
#include <cstdio>
#include <stdexcept>
#include <string>
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

mlk::LaunchConfig make_config(mlk::Dim3 grid, mlk::Dim3 block, int64_t shared_bytes = 0) {
  mlk::LaunchConfig config;
  config.grid = grid;
  config.block = block;
  config.shared_bytes = shared_bytes;
  return config;
}

// Launches `config` on the emulator with a kernel that counts its threads; returns the refusal's
// message, or "" when it ran (and then every thread ran exactly once).
std::string emulator_refusal(const mlk::LaunchConfig& config) {
  int64_t ran = 0;
  try {
    mlk::EmulatorRunner().blocks(config, [&](mlk::EmulatorRunner::Block& block) {
      block.phase([&](const mlk::ThreadIndex&) { ++ran; });
    });
  } catch (const std::runtime_error& e) {
    return ran == 0 ? e.what() : "refused after running threads";
  }
  return ran == config.grid.count() * config.block.count() ? "" : "ran a wrong number of threads";
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// Each limit just inside (runs) and just past (refused, naming the limit and the config).
void check_launch_limits() {
  using mlk::Dim3;
  bool inside = emulator_refusal(make_config({1, 1, 1}, {1024, 1, 1})).empty() &&
                emulator_refusal(make_config({1, 1, 1}, {1, 1024, 1})).empty() &&
                emulator_refusal(make_config({1, 1, 1}, {1, 1, 64})).empty() &&
                emulator_refusal(make_config({1, 1, 1}, {32, 32, 1})).empty() &&
                emulator_refusal(make_config({1, 65535, 1}, {1, 1, 1})).empty() &&
                emulator_refusal(make_config({1, 1, 65535}, {1, 1, 1})).empty() &&
                emulator_refusal(make_config({1, 1, 1}, {32, 1, 1}, 48 * 1024)).empty() &&
                // Too many blocks to run here: the check alone.
                mlk::launch_config_error(make_config({2147483647, 65535, 65535}, {1, 1, 1}))
                    .empty() &&
                // Empty launches are skipped, whatever their other sizes.
                emulator_refusal(make_config({0, 70000, 1}, {2048, 1, 1}, 1 << 20)).empty();
  expect(inside, "launches at CUDA's limits run");

  const std::string threads = emulator_refusal(make_config({2, 1, 1}, {1025, 1, 1}));
  const std::string threads_total = emulator_refusal(make_config({1, 1, 1}, {32, 32, 2}));
  const std::string block_z = emulator_refusal(make_config({1, 1, 1}, {1, 1, 65}));
  const std::string grid_y = emulator_refusal(make_config({3, 65536, 1}, {64, 1, 1}, 512));
  const std::string grid_z = emulator_refusal(make_config({1, 1, 65536}, {1, 1, 1}));
  const std::string grid_x =
      mlk::launch_config_error(make_config({2147483648LL, 1, 1}, {256, 1, 1}));
  const std::string shared = emulator_refusal(make_config({1, 1, 1}, {32, 1, 1}, 48 * 1024 + 1));
  std::printf("  e.g. %s\n", grid_y.c_str());
  expect(contains(threads, "at most (1024, 1024, 64) threads") &&
             contains(threads, "block (1025, 1, 1)") &&
             contains(threads_total, "a block has at most 1024 threads") &&
             contains(threads_total, "block (32, 32, 2)") &&
             contains(block_z, "(1024, 1024, 64)") && contains(block_z, "block (1, 1, 65)") &&
             contains(grid_y, "a grid is at most (2147483647, 65535, 65535) blocks") &&
             contains(grid_y, "got grid (3, 65536, 1), block (64, 1, 1), 512 bytes") &&
             contains(grid_z, "grid (1, 1, 65536)") && contains(grid_x, "grid (2147483648, 1, 1)") &&
             contains(shared, "49152 bytes (48 KB) of dynamic shared memory") &&
             contains(shared, "49153 bytes"),
         "launches past CUDA's limits are refused, naming the limit and the config");
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

  check_launch_limits();

  return failures == 0 ? 0 : 1;
}
