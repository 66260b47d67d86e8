"""benchmarks/gpu_check.sh (make gpu-check) on a machine where nvidia-smi finds no GPU: it stops at
once with a message, not after minutes of build and timeouts."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_stops_at_once_without_a_gpu(tmp_path):
    tools = tmp_path / "bin"
    tools.mkdir()
    fake = tools / "nvidia-smi"  # what nvidia-smi does without a driver or a GPU
    fake.write_text("#!/bin/sh\necho 'No devices were found' >&2\nexit 6\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", "OUT": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "gpu_check: nvidia-smi -L lists no GPU" in result.stderr
    assert "nvidia-smi -L lists no GPU" in (tmp_path / "summary.txt").read_text()
    assert not (tmp_path / "build.log").exists()
