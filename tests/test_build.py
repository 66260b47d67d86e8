"""The package as a user meets it: build info, `python -m mlkernels`, the load-time checks."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import mlkernels
from mlkernels import _loader


def test_build_info_fields():
    info = mlkernels.build_info()
    assert info["version"] == mlkernels.__version__
    assert info["torch_built_against"] == torch.__version__ == info["torch_running"]
    assert isinstance(info["cuda_compiled"], bool)
    assert all(isinstance(a, str) and "." in a for a in info["cuda_archs"])
    assert info["cuda_compiled"] == bool(info["cuda_archs"])
    assert info["cpu_threads"] >= 1
    for op in ("encode_boxes", "decode_boxes", "box_iou"):
        assert op in info["ops"]
        assert hasattr(torch.ops.mlkernels, op)


def test_python_dash_m_prints_info_and_passes_self_check():
    result = subprocess.run(
        [sys.executable, "-m", "mlkernels"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cuda_compiled:" in result.stdout
    assert "boxes on cpu: ok" in result.stdout


def test_torch_version_mismatch_names_both_versions(monkeypatch):
    from mlkernels import _build_config

    monkeypatch.setattr(_build_config, "TORCH_VERSION", "1.0.0")
    expected = f"built against torch 1.0.0, but torch {torch.__version__} is installed"
    with pytest.raises(ImportError, match=re.escape(expected)):
        _loader.load_extension()
