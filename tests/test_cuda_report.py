"""benchmarks/cuda_report.py (make cuda-report) without nvcc: ptxas's lines parsed, kernel names
made readable, occupancy worked out, and --check failing on a spill."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cuda_report", ROOT / "benchmarks/cuda_report.py")
cuda_report = importlib.util.module_from_spec(_spec)
sys.modules["cuda_report"] = cuda_report  # dataclasses look their module up there
_spec.loader.exec_module(cuda_report)

FORWARD = (
    "_ZN3mlk18run_threads_kernelIZZZNS_9roi_align24roi_align_forward_kernelINS_10CudaRunnerEEEN2at"
    "6TensorERKT_RKS5_SA_RKNS1_4ArgsEENKUlvE_clEvENKUlvE0_clEvEUlRKNS_11ThreadIndexEE_EEvS6_"
)
BOX_GRAD = "_ZN3mlk17run_blocks_kernelINS_9roi_align12BoxGradBlockIffEEEEvT_"
PTXAS = f"""\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{FORWARD}' for 'sm_90'
ptxas info    : Function properties for {FORWARD}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 0 barriers, 400 bytes cmem[0]
ptxas info    : Compile time = 16.175 ms
ptxas info    : Compiling entry function '{BOX_GRAD}' for 'sm_90'
ptxas info    : Function properties for {BOX_GRAD}
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem, 416 bytes cmem[0]
"""


def test_ptxas_lines_and_names():
    forward, box_grad = cuda_report.parse_ptxas(PTXAS)
    assert (forward.registers, forward.spill_stores, forward.static_shared) == (56, 0, 0)
    assert (box_grad.registers, box_grad.stack) == (255, 24)
    assert (box_grad.spill_stores, box_grad.spill_loads, box_grad.static_shared) == (8, 12, 16)
    names = cuda_report.demangle([forward.mangled, box_grad.mangled])
    if names[0] == forward.mangled:
        pytest.skip("no c++filt on PATH")
    # The second dispatch case of AT_DISPATCH_FLOATING_TYPES_AND2 is float.
    assert cuda_report.readable(names[0]) == "roi_align::roi_align_forward_kernel [float] λ1"
    assert cuda_report.readable(names[1]) == "roi_align::BoxGradBlock<float, float>"
    assert cuda_report.launch_of(names[1]).threads == 256


def test_occupancy_and_what_limits_it():
    limits = cuda_report.ARCH_LIMITS["9.0"]
    kernel = cuda_report.Kernel("k", registers=56)
    # 56 registers x 256 threads: 4 blocks of the 65536 registers (as CUDA's calculator says).
    assert cuda_report.occupancy(kernel, cuda_report.Launch(256), limits) == (1024, "registers")
    small = cuda_report.Kernel("k", registers=32)
    assert cuda_report.occupancy(small, cuda_report.Launch(256), limits) == (
        2048,
        "registers, threads",
    )
    # 48 KB of shared memory (plus 1 KB reserved) a block: 4 blocks in 228 KB.
    wide = cuda_report.Launch(128, None, 48 * 1024)
    assert cuda_report.occupancy(small, wide, limits) == (512, "shared memory")


def test_check_fails_on_a_spill(monkeypatch, tmp_path, capsys):
    pytest.importorskip("torch")
    monkeypatch.setattr(cuda_report, "find_nvcc", lambda: "nvcc")
    monkeypatch.setattr(cuda_report, "compile_one", lambda *args: PTXAS)
    monkeypatch.setattr(
        cuda_report.subprocess,
        "run",
        lambda command, **kwargs: cuda_report.subprocess.CompletedProcess(
            command, 0, "Build cuda_13.0\n" if "--version" in command else "", ""
        ),
    )
    out = tmp_path / "report.md"
    assert cuda_report.main(["--archs", "9.0", "--out", str(out), "--check"]) == 1
    assert not out.exists()
    assert "SPILL in " in capsys.readouterr().err
    assert cuda_report.main(["--archs", "9.0", "--out", str(out)]) == 1
    text = out.read_text()
    assert "| **8/12** |" in text and "Spills: " in text
