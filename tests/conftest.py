"""Shared test setup: hypothesis profiles, torch threads, the emulated marker (skipped in builds
without the grid emulator), skipping cuda-marked tests without a GPU. The implementations under
test and input helpers are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

import mlkernels

# "ci": derandomized and bounded, so CI is repeatable and fits its time; "dev": more examples,
# random, for local hunting. CI=true (as CI sets it) picks "ci" unless HYPOTHESIS_PROFILE says.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


# ---- emulated: tests of torch.ops.mlkernels_emulated.* -----------------------------------------
# Those ops (the CUDA kernels on the CPU grid emulator) exist only in builds made with
# MLKERNELS_EMULATOR=1 (make test, .ci/run); a plain `pip install` leaves them out. Convention:
# a test that calls them has "emulated" in its name or parametrization id, or is marked
# @pytest.mark.emulated; without the emulator it is skipped before it runs. A test that calls them
# without following the convention is skipped when it reaches the first emulated call (its checks
# before that call have run, those after it have not).
EMULATOR_SKIP = (
    "needs the CPU grid emulator (torch.ops.mlkernels_emulated), which this build of mlkernels "
    "leaves out: rebuild with MLKERNELS_EMULATOR=1 (make test does)"
)


def _emulated_ops_without_cpu_kernel() -> list[str]:
    names = torch._C._dispatch_get_all_op_names()
    names = [n for n in names if n.startswith("mlkernels_emulated::")]
    return [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")]


def _skip_from_emulated_ops() -> None:
    """Give every schema-only emulated op a CPU kernel that skips the calling test."""

    def skip(*args, **kwargs):
        pytest.skip(EMULATOR_SKIP)

    global _EMULATED_SKIP_LIBRARY
    _EMULATED_SKIP_LIBRARY = torch.library.Library("mlkernels_emulated", "IMPL")
    for name in _emulated_ops_without_cpu_kernel():
        _EMULATED_SKIP_LIBRARY.impl(name.split("::", 1)[1], skip, "CPU")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "emulated: calls torch.ops.mlkernels_emulated (skipped in builds without "
        "MLKERNELS_EMULATOR=1); applied to every test with 'emulated' in its name",
    )
    if not mlkernels.EMULATOR_COMPILED:
        _skip_from_emulated_ops()
    if os.environ.get("MLKERNELS_EXPECT_SANITIZED") == "1":
        # make sanitize: make sure the sanitized _C is the one the tests exercise.
        c_file = Path(mlkernels._C.__file__).resolve()
        sanitizers = mlkernels.build_info()["sanitizers"]
        source_package = Path(__file__).resolve().parents[1] / "mlkernels"
        if not sanitizers or c_file.parent == source_package:
            pytest.exit(
                f"MLKERNELS_EXPECT_SANITIZED=1, but the tests import {c_file} "
                f"(sanitizers: {sanitizers})",
                returncode=4,
            )


def pytest_report_header(config):
    info = mlkernels.build_info()
    return (
        f"mlkernels: {Path(mlkernels._C.__file__).resolve()} "
        f"(cuda_compiled={info['cuda_compiled']}, emulator_compiled={info['emulator_compiled']}, "
        f"sanitizers={info['sanitizers']})"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    # The safety net for tests outside the naming convention whose emulated op has no schema at
    # all (so no skipping kernel could be registered for it).
    try:
        return (yield)
    except Exception as error:
        if not mlkernels.EMULATOR_COMPILED and "mlkernels_emulated" in str(error):
            pytest.skip(EMULATOR_SKIP)
        raise


def pytest_collection_modifyitems(config, items):
    skip_emulated = pytest.mark.skip(reason=EMULATOR_SKIP)
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    for item in items:
        if "emulated" in item.name.lower() and item.get_closest_marker("emulated") is None:
            item.add_marker(pytest.mark.emulated)
        if item.get_closest_marker("emulated") is not None and not mlkernels.EMULATOR_COMPILED:
            item.add_marker(skip_emulated)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
