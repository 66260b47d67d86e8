#!/usr/bin/env bash
# The GPU check: one run on a machine with an NVIDIA GPU, from the repository root:
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh        (or: make gpu-check OUT=/some/folder)
#
# It uses the machine's own torch (python3 from PATH, or $PYTHON; no pip, no venv) and builds for
# the local GPU's arch. Without a visible GPU it stops at once (exit 2) with a message saying why.
#
# Steps (each under its own `timeout`; one that fails or hangs never stops the next):
#   info       nvidia-smi -L, python / torch / torchvision / nvcc / compute-sanitizer versions
#   build      MLKERNELS_CUDA=1 MLKERNELS_EMULATOR=1 TORCH_CUDA_ARCH_LIST=<the GPU's> setup.py build_ext
#   import     mlkernels.build_info() (cuda_compiled must be true)
#   tests      pytest -m cuda (every CUDA-marked test; HYPOTHESIS_PROFILE=ci)
#   memcheck   compute-sanitizer --tool memcheck on benchmarks/cuda_workload.py
#   racecheck  the same with racecheck (--light workload: float32 and float16)
#   synccheck  the same with synccheck
#   bench      benchmarks/run.py --device cuda (full shapes)
#   kernels    benchmarks/kernel_times.py --device cuda: every roi_align and proposals case, ours
#              and the anchor, under torch.profiler: the device time of each kernel they launch
#   report     benchmarks/cuda_report.py for the GPU's arch (registers, spills, shared memory,
#              occupancy per kernel; the step fails on a spill)
#
# Writes into "$OUT" (default ./gpu-check-out), ten files:
#   summary.txt       versions, then one line per step: name, exit code, seconds, limit;
#                     pytest's result line and the sanitizers' summaries
#   build.log  tests.log  sanitizer.log  bench.log      each step's output (long logs keep
#                                                       their first and last 200 kB)
#   bench.md          the benchmark table (markdown)
#   latest-cuda.json  the benchmark results
#   cuda-report.md    the resource report (as docs/cuda-report.md, for this GPU's arch)
#   kernels.md        the kernel times (kernels.log: the step's output)
#
# Time: every step has a cap, and the whole run a budget (GPU_CHECK_BUDGET, default 520 s): a
# step never takes time that the steps after it need for their minimum, so the worst case (every
# step hanging) ends within the budget plus a few seconds. Expected: about 5-7 minutes (not yet run
# with the resource report and the attention and beam search workload).

set -u

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-520}"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
: >"$SUMMARY"

# Fail fast without a GPU: nvidia-smi must list one and this python's torch must see it.
no_gpu() {
  echo "gpu_check: $1; this check needs a machine with an NVIDIA GPU, its driver and a CUDA" \
    "build of torch for $PY (set PYTHON=... to use another python)" | tee -a "$SUMMARY" >&2
  rm -rf "$SCRATCH"
  exit 2
}
command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi is not on PATH"
timeout -k 5 30 nvidia-smi -L >/dev/null 2>&1 || no_gpu "nvidia-smi -L lists no GPU"
command -v "$PY" >/dev/null 2>&1 || no_gpu "no python: $PY is not on PATH"
GPU_ARCH=$(timeout -k 5 120 "$PY" -c 'import torch
assert torch.cuda.is_available(), "no GPU visible to torch"
print("%d.%d" % torch.cuda.get_device_capability())' 2>"$SCRATCH/arch.err") ||
  no_gpu "$PY's torch sees no CUDA device ($(tail -n 1 "$SCRATCH/arch.err"))"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HYPOTHESIS_PROFILE=ci
export MLKERNELS_SKIP_WHEEL_TEST=1

# compute-sanitizer: on PATH, else in the CUDA toolkit.
SANITIZER=$(command -v compute-sanitizer 2>/dev/null || true)
for dir in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0; do
  if [ -z "$SANITIZER" ] && [ -n "$dir" ] && [ -x "$dir/bin/compute-sanitizer" ]; then
    SANITIZER="$dir/bin/compute-sanitizer"
  fi
done
SANITIZER="${SANITIZER:-compute-sanitizer}"
export PY SANITIZER  # for the info step's shell

# Appends FILE to LOG, keeping the first and last 200 kB of a longer file.
append_log() {
  local file=$1 log=$2 size
  size=$(wc -c <"$file")
  if [ "$size" -le 400000 ]; then
    cat "$file" >>"$log"
  else
    {
      head -c 200000 "$file"
      printf '\n[... %d bytes cut ...]\n' $((size - 400000))
      tail -c 200000 "$file"
    } >>"$log"
  fi
}

# run_step NAME CAP RESERVE LOG COMMAND...: runs COMMAND under `timeout` for at most CAP seconds,
# and never into the RESERVE seconds that the later steps need; output to LOG (through a
# scratch file: $SCRATCH/NAME.out), one status line to the summary.
run_step() {
  local name=$1 cap=$2 reserve=$3 log=$4
  shift 4
  local left limit t0 rc seconds note=""
  left=$((START + BUDGET - $(date +%s) - reserve))
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    printf '%-10s skipped: only %d s left for it in the %d s budget\n' "$name" "$limit" \
      "$BUDGET" >>"$SUMMARY"
    return 0
  fi
  printf '\n### %s (limit %d s): %s\n' "$name" "$limit" "$*" >>"$log"
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$SCRATCH/$name.out" 2>&1
  rc=$?
  seconds=$(($(date +%s) - t0))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    note="  TIMEOUT"
  fi
  append_log "$SCRATCH/$name.out" "$log"
  printf '### %s: exit %d after %d s%s\n' "$name" "$rc" "$seconds" "$note" >>"$log"
  printf '%-10s rc=%-3d %4d s  (limit %d s)%s\n' "$name" "$rc" "$seconds" "$limit" "$note" \
    >>"$SUMMARY"
  return 0
}

# Lines of a step's output that say how it went, indented, into the summary.
summarize() {
  local name=$1 pattern=$2
  [ -f "$SCRATCH/$name.out" ] || return 0
  grep -E "$pattern" "$SCRATCH/$name.out" | tail -n 6 | sed 's/^/             /' >>"$SUMMARY"
}

info() {
  date -u '+%Y-%m-%dT%H:%M:%SZ'
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" --version
  "$PY" -c 'import torch, torchvision
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("torchvision", torchvision.__version__)'
  echo "cores: $(nproc)"
  echo "nvcc: $(command -v nvcc || echo 'not on PATH')"
  nvcc --version 2>/dev/null | tail -n 2
  echo "compute-sanitizer: $SANITIZER"
  "$SANITIZER" --version 2>/dev/null | head -n 2
  echo "ninja: $(command -v ninja || echo 'not on PATH')  ccache: $(command -v ccache || echo no)"
  git log --oneline -n 1 2>/dev/null || true
  git status --short 2>/dev/null | head -n 20 || true
}

# Minimum seconds kept for each later step (each includes timeout's 5 s kill grace).
FLOOR_IMPORT=20 FLOOR_TESTS=65 FLOOR_SANITIZER=50 FLOOR_BENCH=95 FLOOR_KERNELS=35 FLOOR_REPORT=45

# (a) versions: into the summary itself, above the step lines.
run_step info 60 $((FLOOR_IMPORT + FLOOR_TESTS + 3 * FLOOR_SANITIZER + FLOOR_BENCH + FLOOR_KERNELS + FLOOR_REPORT)) "$SCRATCH/info.log" \
  bash -c "$(declare -f info); info"
cat "$SCRATCH/info.out" >>"$SUMMARY" 2>/dev/null
echo >>"$SUMMARY"

# (b) build
run_step build 240 $((FLOOR_IMPORT + FLOOR_TESTS + 3 * FLOOR_SANITIZER + FLOOR_BENCH + FLOOR_KERNELS + FLOOR_REPORT)) \
  "$OUT/build.log" \
  env MLKERNELS_CUDA=1 MLKERNELS_EMULATOR=1 TORCH_CUDA_ARCH_LIST="$GPU_ARCH" MAX_JOBS="$(nproc)" \
  "$PY" setup.py build_ext --inplace
summarize build 'error:|Error|ccache:|CUDA_HOME|TORCH_CUDA_ARCH_LIST'
run_step import 60 $((FLOOR_TESTS + 3 * FLOOR_SANITIZER + FLOOR_BENCH + FLOOR_KERNELS + FLOOR_REPORT)) "$OUT/build.log" \
  "$PY" -c 'import json, mlkernels; print(json.dumps(mlkernels.build_info()))'
summarize import 'cuda_compiled|Error'

# (c) tests on the GPU
run_step tests 240 $((3 * FLOOR_SANITIZER + FLOOR_BENCH + FLOOR_KERNELS + FLOOR_REPORT)) "$OUT/tests.log" \
  "$PY" -m pytest -q -m cuda -rfE -p no:cacheprovider --durations=10 tests
summarize tests '^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|error)'

# (d) compute-sanitizer on the workload. memcheck without torch's caching allocator, so that an
# access past a tensor is past a cudaMalloc'ed block and not inside a cached one.
run_step memcheck 120 $((2 * FLOOR_SANITIZER + FLOOR_BENCH + FLOOR_KERNELS + FLOOR_REPORT)) "$OUT/sanitizer.log" \
  env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
  "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" benchmarks/cuda_workload.py
summarize memcheck 'ERROR SUMMARY|workload (ok|FAILED)'
run_step racecheck 120 $((FLOOR_SANITIZER + FLOOR_BENCH + FLOOR_KERNELS + FLOOR_REPORT)) "$OUT/sanitizer.log" \
  "$SANITIZER" --tool racecheck --error-exitcode 1 "$PY" benchmarks/cuda_workload.py --light
summarize racecheck 'ERROR SUMMARY|RACECHECK SUMMARY|workload (ok|FAILED)'
run_step synccheck 120 $((FLOOR_BENCH + FLOOR_KERNELS + FLOOR_REPORT)) "$OUT/sanitizer.log" \
  "$SANITIZER" --tool synccheck --error-exitcode 1 "$PY" benchmarks/cuda_workload.py
summarize synccheck 'ERROR SUMMARY|workload (ok|FAILED)'

# (e) benchmarks on the GPU (shorter timing when little time is left)
MIN_RUN_TIME=0.5
if [ $((START + BUDGET - $(date +%s))) -lt 150 ]; then
  MIN_RUN_TIME=0.2
fi
run_step bench 180 $((FLOOR_KERNELS + FLOOR_REPORT)) "$OUT/bench.log" \
  "$PY" benchmarks/run.py --device cuda --min-run-time "$MIN_RUN_TIME" --out "$OUT" \
  --markdown "$OUT/bench.md"
summarize bench '^FAILED'

# (f) where the GPU time goes, kernel by kernel (roi_align and proposals, ours and torchvision's)
run_step kernels 90 "$FLOOR_REPORT" "$OUT/kernels.log" \
  "$PY" benchmarks/kernel_times.py --device cuda --runs 3 --out "$OUT/kernels.md"
summarize kernels '^kernel_times: .*needs|Traceback|Error'

# (g) the resource report for this GPU's arch (nvcc -cubin -Xptxas -v of every *_cuda.cu)
run_step report 120 0 "$OUT/build.log" \
  "$PY" benchmarks/cuda_report.py --archs "$GPU_ARCH" --out "$OUT/cuda-report.md"
summarize report '^cuda_report:'

printf '\ntotal %d s (budget %d s)\n' $(($(date +%s) - START)) "$BUDGET" >>"$SUMMARY"
rm -rf "$SCRATCH"
cat "$SUMMARY"
