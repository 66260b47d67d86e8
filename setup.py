"""Build script for mlkernels' C++/CUDA extension (mlkernels._C).

Environment:
  MLKERNELS_CUDA=auto|0|1   compile the CUDA kernels: when possible (default), never, or always
                            (1 fails the build when CUDA cannot be compiled).
  CUDA_HOME                 the CUDA toolkit root; by default derived from the nvcc on PATH.
  TORCH_CUDA_ARCH_LIST      the GPU architectures to compile for (default "8.0;9.0").
  MAX_JOBS                  parallel compile jobs (default: the number of cores).

Install with `pip install --no-build-isolation -e .` so the build sees the installed torch.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0;9.0"


def log(message: str) -> None:
    print(f"[mlkernels build] {message}", flush=True)


def cuda_mode() -> str:
    mode = os.environ.get("MLKERNELS_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"MLKERNELS_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def find_cuda_home() -> str | None:
    """The real toolkit root: CUDA_HOME if set, else the folder above the bin/ of the nvcc that
    the nvcc on PATH really runs (on these machines PATH holds a wrapper script elsewhere)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        match = re.search(r"_HERE_=(\S+)", dry.stdout + dry.stderr)
    except (OSError, subprocess.SubprocessError):
        match = None
    bin_dir = Path(match.group(1)) if match else Path(os.path.realpath(nvcc)).parent
    return str(bin_dir.resolve().parent)


def nvidia_include_dirs() -> list[str]:
    """Headers that torch's nvidia-* wheels carry (cusparse.h, ...) but the toolkit may lack."""
    try:
        import nvidia  # namespace package installed with a CUDA build of torch
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += [
            d for d in glob.glob(os.path.join(base, "cu[0-9]*", "include")) if os.path.isdir(d)
        ]
    return sorted(found)


MODE = cuda_mode()
CUDA_HOME = find_cuda_home() if MODE != "0" else None
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda() -> tuple[bool, str]:
    if MODE == "0":
        return False, "MLKERNELS_CUDA=0"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None:
        reasons.append("no nvcc on PATH and CUDA_HOME unset")
    elif not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        reasons.append(f"no bin/nvcc under CUDA_HOME={CUDA_HOME}")
    if reasons:
        if MODE == "1":
            sys.exit("MLKERNELS_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"nvcc under {CUDA_HOME}, torch CUDA {torch.version.cuda}"


def write_build_config(with_cuda: bool, archs: str) -> None:
    """mlkernels/_build_config.py: what the import-time checks compare against."""
    text = (
        "# Written by setup.py at build time; do not edit.\n"
        f"VERSION = {VERSION!r}\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCHS = {archs!r}\n"
    )
    (ROOT / "mlkernels" / "_build_config.py").write_text(text)


def extensions():
    with_cuda, why = want_cuda()
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS) if with_cuda else ""
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

    sources = ["csrc/module.cpp"] + sorted(glob.glob("csrc/*/*.cpp"))
    if with_cuda:
        sources += sorted(glob.glob("csrc/*/*.cu"))
    torch_version = torch.__version__
    define = [f'-DMLK_TORCH_VERSION="{torch_version}"', f'-DMLK_CUDA_ARCHS="{archs}"']
    # -ffp-contract=off: no fused multiply-adds where the CPU has them (aarch64, the AVX2+FMA
    # clones), so CPU results keep torchvision's rounding, which computes a*b+c in two steps.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", *define]
    if with_cuda:
        cxx.append("-DMLK_WITH_CUDA")
    kwargs = dict(
        name="mlkernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    log(f"version {VERSION}, torch {torch_version}, python {sys.version.split()[0]}")
    log(f"MLKERNELS_CUDA={MODE}: CUDA kernels {'ON' if with_cuda else 'OFF'} ({why})")
    if with_cuda:
        includes = nvidia_include_dirs()
        kwargs["include_dirs"] += includes
        kwargs["extra_compile_args"]["nvcc"] = [
            "-O3",
            "--extended-lambda",
            "--expt-relaxed-constexpr",
            "-DMLK_WITH_CUDA",
            *define,
        ]
        log(f"CUDA_HOME={CUDA_HOME}, TORCH_CUDA_ARCH_LIST={archs}")
        log(f"extra CUDA include dirs: {includes or 'none'}")
    log(f"MAX_JOBS={os.environ['MAX_JOBS']}, {len(sources)} sources")
    write_build_config(with_cuda, archs)
    return [(CUDAExtension if with_cuda else CppExtension)(**kwargs)]


setup(
    name="mlkernels",
    version=VERSION,
    packages=find_packages(include=["mlkernels", "mlkernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
