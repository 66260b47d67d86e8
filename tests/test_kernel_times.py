"""benchmarks/kernel_times.py (a step of make gpu-check) on the CPU: every case of a family
profiled, each side's ops with their time per call, ours' op where ours should spend it."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kernel_times  # noqa: E402


def test_kernel_times_profiles_every_case_on_the_cpu(tmp_path):
    out = tmp_path / "kernels.md"
    assert (
        kernel_times.main(["--quick", "--runs", "1", "--only", "proposals", "--out", str(out)]) == 0
    )
    text = out.read_text()
    import bench_proposals

    cases = bench_proposals.cases(True, "cpu")
    assert text.count("### proposals: ") == len(cases)
    # each case: a table for ours and for its anchor, each with a total
    assert text.count("| ours | **total** |") == len(cases)
    for case in cases:
        assert f"| {case.anchor_name} | **total** |" in text
    # ours spends its time in its own ops: the top row of each table of ours is an mlkernels op
    tops = [
        line
        for block in text.split("### ")[1:]
        for line in block.splitlines()
        if line.startswith("| ours | `")
    ]
    assert any("mlkernels::" in line for line in tops)


def test_kernel_times_needs_a_gpu_for_cuda(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda runs")
    assert kernel_times.main(["--device", "cuda", "--only", "proposals"]) == 2
    assert "needs a GPU" in capsys.readouterr().err
