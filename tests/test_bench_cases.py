"""Benchmark cases that make bench's own runs do not exercise, built and run here on the CPU:
bench_roi_align.py's CUDA-only case, the deterministic backward against the default one (make
gpu-check times it; its two sides agree, and the deterministic flag is on only inside its side's
calls), and bench_attention.py's module cases at a small size."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_attention  # noqa: E402
import bench_roi_align  # noqa: E402


def test_deterministic_case_runs_its_side_under_the_flag(monkeypatch):
    seen = []
    roi_align = bench_roi_align.mlkernels.ops.roi_align

    def recording(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return roi_align(*args, **kwargs)

    monkeypatch.setattr(bench_roi_align.mlkernels.ops, "roi_align", recording)
    g = torch.Generator().manual_seed(0)
    feat, boxes, grad = bench_roi_align._inputs(1, 4, g)
    feat = feat[:, :8].contiguous()
    grad = grad[:, :8].contiguous()
    case = bench_roi_align.deterministic_case(feat, boxes, grad, "small")
    assert case.target_ratio == 0.5
    ours, anchor = case.ours(), case.anchor()
    case.check(ours, anchor)
    assert seen == [True, False]
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_case_is_cuda_only():
    names = [c.name for c in bench_roi_align.cases(True, "cpu")]
    assert "fwd+bwd, deterministic input grads" not in names
    assert "fwd+bwd, no box grads" in names


def test_module_cases_agree_and_return_weights_as_asked():
    cases = bench_attention._module_cases(2, 8, "cpu")
    assert [c.name for c in cases] == [
        "nn.MultiheadAttention, need_weights=True",
        "nn.MultiheadAttention, need_weights=False",
    ]
    for case, need_weights in zip(cases, (True, False), strict=True):
        ours, theirs = case.ours(), case.anchor()
        case.check(ours, theirs)
        assert (ours[1] is not None) == need_weights
