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

.PHONY: install build test bench bench-quick lint format demo clean FORCE

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

demo: $(BUILT)
	$(PY) -m mlkernels
	$(PY) benchmarks/run.py --quick

clean:
	rm -rf build dist *.egg-info mlkernels/*.so mlkernels/_build_config.py $(BUILT) $(BUILD_MODE) \
	  $(VENV)/.mlkernels-cuda-mode
