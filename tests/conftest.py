"""Shared test setup: hypothesis profiles, torch threads, the emulated marker, skipping cuda-marked
tests without a GPU. The implementations under test and input helpers are in helpers.py."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

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


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "emulated: runs the CUDA kernels' code on the CPU grid emulator"
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
