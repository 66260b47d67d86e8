# mlkernels developer commands. On a fresh machine `make test` or `make demo` is the only command:
# each creates .venv, installs the pinned dependencies and builds the extension when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export MLKERNELS_CUDA ?= auto
# The wheel leaves the test-only grid emulator out unless MLKERNELS_EMULATOR is given; every other
# target builds it in, since the tests use it.
WHEEL_EMULATOR := $(if $(filter undefined,$(origin MLKERNELS_EMULATOR)),0,$(MLKERNELS_EMULATOR))
export MLKERNELS_EMULATOR ?= 1

DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.mlkernels-built
# Holds the MLKERNELS_CUDA and MLKERNELS_EMULATOR of the last build and changes only with them, so
# that `MLKERNELS_CUDA=1 make test` after a build without CUDA (or the reverse) rebuilds.
BUILD_MODE := $(VENV)/.mlkernels-build-mode
MODE_LINE := cuda=$(MLKERNELS_CUDA) emulator=$(MLKERNELS_EMULATOR)
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

.PHONY: install build test bench bench-quick lint format demo train compare clean sanitize wheel \
  cuda-report sass-compare gpu-check FORCE

install: $(BUILT)

$(DEPS): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(BUILD_MODE): FORCE
	@mkdir -p $(VENV)
	@echo "$(MODE_LINE)" | cmp -s - $@ || echo "$(MODE_LINE)" > $@

# First build: the editable install users do. Later builds: ninja in build/, only what changed.
$(BUILT): $(DEPS) $(CSRC) setup.py pyproject.toml $(BUILD_MODE)
	@if $(PY) -m pip show -q mlkernels >/dev/null 2>&1 && [ -f mlkernels/_build_config.py ]; then \
	  $(PY) setup.py -q build_ext --inplace; \
	else \
	  $(PY) -m pip install --no-build-isolation --no-deps -e . ; \
	fi
	touch $@

build: $(BUILT)

test: $(BUILT)
	$(PY) -m pytest -q tests

bench: $(BUILT)
	$(PY) benchmarks/run.py

bench-quick: $(BUILT)
	$(PY) benchmarks/run.py --quick

lint: $(DEPS)
	$(PY) -m ruff check mlkernels tests benchmarks models setup.py
	$(PY) -m ruff format --check mlkernels tests benchmarks models setup.py

format: $(DEPS)
	$(PY) -m ruff format mlkernels tests benchmarks models setup.py

# The demo's training: the baseline fine-tuning the pretrained EfficientNet-Lite0 (nothing frozen) on
# the scenes benchmark (generated and cached on first use, ~25 s). Measured 2026-11-28 on the 2-core
# dev machine: 3 min, test mAP 76.2 (37.8 with --no-pretrained).
DEMO_TRAIN_ARGS ?= --model baseline --data scenes --backbone efficientnet_lite0 --image-size 128 \
  --epochs 2 --train-images 4000 --val-images 500 --batch-size 64 --lr 0.001 --schedule cosine \
  --threads 2 --out runs/demo

demo: $(BUILT)
	$(PY) -m mlkernels
	$(PY) benchmarks/run.py --quick
	$(PY) -m models.train $(DEMO_TRAIN_ARGS)

# Every model and the baseline on one budget (make demo's), side by side: models/RESULTS.md.
# COMPARE_ARGS: options of models.compare (e.g. --models baseline,cadm); after "--", of each run.
COMPARE_ARGS ?=
compare: $(BUILT)
	$(PY) -m models.compare $(COMPARE_ARGS)

# The full run of a model: make train MODEL=baseline ARGS="--epochs 20 --backbone resnet50".
MODEL ?= baseline
ARGS ?=
train: $(BUILT)
	$(PY) -m models.train --model $(MODEL) --out runs/$(MODEL) $(ARGS)

clean:
	rm -rf build dist *.egg-info mlkernels/*.so mlkernels/_build_config.py $(BUILT) $(BUILD_MODE) \
	  $(VENV)/.mlkernels-cuda-mode

# ---- sanitizers: the CPU and emulated kernels with ASan + UBSan, in build/sanitize/ -------------
# Built apart from the normal build (mlkernels/_C*.so stays as it is); the tests run from
# build/sanitize/lib, so that its mlkernels (the sanitized _C) is the one they import, which
# conftest.py checks (MLKERNELS_EXPECT_SANITIZED=1). SANITIZE_TESTS picks the tests (default all).
SAN_DIR := build/sanitize
SANITIZE_TESTS ?= tests
SAN_CXX = $${CXX:-c++}
SAN_ENV = LD_PRELOAD="$$($(SAN_CXX) -print-file-name=libasan.so) $$($(SAN_CXX) -print-file-name=libubsan.so)" \
  ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  MLKERNELS_EXPECT_SANITIZED=1 MLKERNELS_SKIP_WHEEL_TEST=1

sanitize: $(DEPS)
	rm -rf $(SAN_DIR)/lib  # no stale modules; the objects in $(SAN_DIR)/temp* are reused
	MLKERNELS_SANITIZE=1 MLKERNELS_CUDA=0 MLKERNELS_EMULATOR=1 \
	  $(PY) setup.py -q build --build-base $(SAN_DIR) --build-lib $(SAN_DIR)/lib
	ln -s $(CURDIR)/models $(SAN_DIR)/lib/models  # the models tests import it; the repo root is not on the path
	cd $(SAN_DIR)/lib && $(SAN_ENV) $(CURDIR)/$(PY) -m pytest -q -p no:cacheprovider \
	  $(addprefix $(CURDIR)/,$(SANITIZE_TESTS))

# ---- wheel: dist/mlkernels-*.whl for this platform, torch and MLKERNELS_CUDA --------------------
wheel: $(DEPS)
	MLKERNELS_EMULATOR=$(WHEEL_EMULATOR) $(PY) -m pip wheel --no-build-isolation --no-deps -w dist .
	@ls -l dist/*.whl

# ---- CUDA: the resource report (nvcc only, no GPU) and the check on a machine with a GPU --------
# docs/cuda-report.md: registers, spills, shared memory and occupancy of every CUDA kernel for
# setup.py's archs (ptxas -v; cached in ~/.cache/mlkernels). CI runs it with --check: a spill fails.
cuda-report: $(DEPS)
	$(PY) benchmarks/cuda_report.py

# roi_align's and nms's kernels next to torchvision's, from the sm_90 machine code both ship
# (registers, instruction counts); needs cuobjdump and nvdisasm (see the script's docstring).
sass-compare: $(BUILT)
	$(PY) benchmarks/sass_compare.py

# The GPU check (benchmarks/gpu_check.sh): build for the local GPU against the machine's own torch
# (python3 from PATH, or PYTHON=...; no venv), the cuda tests, compute-sanitizer, the GPU
# benchmarks and the resource report, into OUT (default gpu-check-out/). Without a GPU it stops at
# once with a message.
gpu-check:
	PYTHON="$(PYTHON)" $(if $(OUT),OUT="$(OUT)") bash benchmarks/gpu_check.sh
