"""Build script for mlkernels' C++/CUDA extension (mlkernels._C).

Environment:
  MLKERNELS_CUDA=auto|0|1   compile the CUDA kernels: when possible (default), never, or always
                            (1 fails the build when CUDA cannot be compiled).
  MLKERNELS_EMULATOR=0|1    also compile csrc/*/*_emulated.cpp, the CUDA kernels on the CPU grid
                            emulator (torch.ops.mlkernels_emulated.*, used only by the tests).
                            Default 0; `make` and CI set 1.
  MLKERNELS_DEBUG_INFO=0|1  compile C++ with debug info (-g). Default 0 (-g0): -g makes every
                            translation unit about 1.6x slower to compile and the .so 5x larger.
  MLKERNELS_CCACHE=auto|0   compile through ccache when it is on PATH (default; torch's ninja
                            build prepends it to c++ and nvcc), or never.
  MLKERNELS_SANITIZE=0|1    AddressSanitizer + UndefinedBehaviorSanitizer build, CPU only
                            (`make sanitize`; load it with LD_PRELOAD of libasan/libubsan).
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
import time
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0;9.0"


def log(message: str) -> None:
    print(f"[mlkernels build] {message}", flush=True)


def env_choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in allowed:
        sys.exit(f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {value!r}")
    return value


def cuda_mode() -> str:
    return env_choice("MLKERNELS_CUDA", "auto", ("auto", "0", "1"))


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


SANITIZE = env_choice("MLKERNELS_SANITIZE", "0", ("0", "1")) == "1"
SANITIZER_FLAGS = [
    "-fsanitize=address,undefined",
    "-fno-omit-frame-pointer",
    "-fno-sanitize-recover=undefined",
]
if SANITIZE and cuda_mode() == "1":
    sys.exit("MLKERNELS_SANITIZE=1 builds the CPU kernels only; MLKERNELS_CUDA=1 contradicts it")
MODE = "0" if SANITIZE else cuda_mode()
WITH_EMULATOR = env_choice("MLKERNELS_EMULATOR", "0", ("0", "1")) == "1"
DEBUG_INFO = env_choice("MLKERNELS_DEBUG_INFO", "0", ("0", "1")) == "1"
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


def use_ccache() -> tuple[bool, str]:
    """torch's ninja build prepends ccache (or sccache) to c++ and nvcc by itself when one is on
    PATH (torch.utils.cpp_extension._wrap_compiler); TORCH_NO_COMPILER_WRAPPER turns that off."""
    mode = env_choice("MLKERNELS_CCACHE", "auto", ("auto", "0"))
    found = shutil.which("ccache")
    if mode == "0":
        os.environ["TORCH_NO_COMPILER_WRAPPER"] = "1"
        return False, "MLKERNELS_CCACHE=0"
    if os.environ.get("TORCH_NO_COMPILER_WRAPPER"):
        return False, "TORCH_NO_COMPILER_WRAPPER is set"
    if found is None:
        return False, "not on PATH"
    from torch.utils import cpp_extension

    wrapper = getattr(cpp_extension, "_wrap_compiler", None)
    if wrapper is None or wrapper(["c++"])[0] != "ccache":
        return False, f"{found} found, but this torch does not put it in front of the compilers"
    # Paths below the source tree are hashed relative to it, so another checkout (or a copy in a
    # temporary folder, as tests/test_wheel.py makes) hits the same cache entries.
    os.environ.setdefault("CCACHE_BASEDIR", str(ROOT))
    return True, f"{found} for c++ and nvcc, CCACHE_BASEDIR={os.environ['CCACHE_BASEDIR']}"


BUILD_CONFIG: dict = {}


def build_config_text() -> str:
    """mlkernels/_build_config.py: what the import-time checks and build_info() read."""
    lines = ["# Written by setup.py at build time; do not edit."]
    lines += [f"{key} = {value!r}" for key, value in BUILD_CONFIG.items()]
    return "\n".join(lines) + "\n"


UNITY_DIR = "build/unity"


def unity_source(name: str, files: list[str]) -> str:
    """One translation unit, build/unity/<name>, that #includes ``files``; returns its path.

    Most of a translation unit's compile time is torch's headers, not our code. Measured on the
    2-core machine without ccache: roi_align.cpp, _cpu.cpp, _emulated.cpp 8.8/11.1/11.5 s
    apart, 13.3 s as one unit; boxes/proposals/roi_align_cuda.cu (sm_80 + sm_90, ~25 s each of
    host code over torch's headers) 42/45/48 s apart, 50 s as one unit. The sources stay one
    family per folder; only the compiler sees them together. The file is rewritten only when
    its list changes, so ninja and ccache see it unchanged otherwise, and the depfile names
    the included files, so editing one of them recompiles its unit."""
    text = "// Generated by setup.py (unity_source): compiled as one translation unit.\n"
    text += "".join(f'#include "{Path(f).relative_to("csrc").as_posix()}"\n' for f in files)
    path = ROOT / UNITY_DIR / name
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return f"{UNITY_DIR}/{name}"


def extensions():
    with_cuda, why = want_cuda()
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS) if with_cuda else ""
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

    cpp = sorted(glob.glob("csrc/*/*.cpp"))
    emulated = [f for f in cpp if f.endswith("_emulated.cpp")]
    if not WITH_EMULATOR:
        cpp = [f for f in cpp if f not in emulated]
    # One C++ unit per family folder, one CUDA unit for all families (see unity_source).
    families = sorted({Path(f).parent.name for f in cpp})
    sources = ["csrc/module.cpp"] + [
        unity_source(f"{family}.cpp", [f for f in cpp if Path(f).parent.name == family])
        for family in families
    ]
    if with_cuda:
        sources.append(unity_source("cuda.cu", sorted(glob.glob("csrc/*/*.cu"))))
    torch_version = torch.__version__
    define = [f'-DMLK_TORCH_VERSION="{torch_version}"', f'-DMLK_CUDA_ARCHS="{archs}"']
    # -ffp-contract=off: no fused multiply-adds where the CPU has them (aarch64, the AVX2+FMA
    # clones), so CPU results keep torchvision's rounding, which computes a*b+c in two steps.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", *define]
    # Python's CFLAGS (which setuptools puts first) carry -g; a later -g0 or -g1 wins.
    cxx.append("-g" if DEBUG_INFO else "-g0")
    link = ["-fopenmp"]
    if with_cuda:
        cxx.append("-DMLK_WITH_CUDA")
    if SANITIZE:
        # -O1 -g1: what the sanitizers recommend, with file:line in their reports.
        cxx += ["-O1", "-g1", *SANITIZER_FLAGS]
        link += SANITIZER_FLAGS
    kwargs = dict(
        name="mlkernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )
    ccache, ccache_why = use_ccache()
    log(f"version {VERSION}, torch {torch_version}, python {sys.version.split()[0]}")
    log(f"MLKERNELS_CUDA={MODE}: CUDA kernels {'ON' if with_cuda else 'OFF'} ({why})")
    state = "ON" if WITH_EMULATOR else "OFF, skipped"
    log(
        f"MLKERNELS_EMULATOR={int(WITH_EMULATOR)}: grid-emulator registrations (tests only) "
        f"{state}: {len(emulated)} *_emulated.cpp"
    )
    log(f"ccache: {'ON' if ccache else 'OFF'} ({ccache_why})")
    log(f"debug info: {'-g' if DEBUG_INFO else 'OFF (-g0)'}")
    if SANITIZE:
        log(f"MLKERNELS_SANITIZE=1: {' '.join(SANITIZER_FLAGS)} (CPU only)")
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
    log(f"MAX_JOBS={os.environ['MAX_JOBS']}, {len(sources)} translation units")
    BUILD_CONFIG.update(
        VERSION=VERSION,
        TORCH_VERSION=torch_version,
        WITH_CUDA=with_cuda,
        CUDA_ARCHS=archs,
        WITH_EMULATOR=WITH_EMULATOR,
        SANITIZERS="address,undefined" if SANITIZE else "",
    )
    return [(CUDAExtension if with_cuda else CppExtension)(**kwargs)]


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's ninja build, then _build_config.py written next to the _C it describes: in the
    source tree for --inplace and editable installs, in build_lib for wheels (and `make sanitize`,
    which must leave the source tree's build alone). Written after a successful build only, so it
    never describes a _C that failed to build."""

    def build_extension(self, ext) -> None:
        # distutils sorts the sources, and on a fresh build ninja starts jobs in that order, which
        # left the CUDA unit (the longest compile, ~50 s on 2 cores) running alone at the end.
        # Hand ninja the .cu first; the objects go back in sorted order for the link.
        compile_sorted = self.compiler.compile

        def compile_cuda_first(sources, *args, **kwargs):
            order = sorted(range(len(sources)), key=lambda i: not sources[i].endswith(".cu"))
            objects = compile_sorted([sources[i] for i in order], *args, **kwargs)
            by_source = dict(zip(order, objects, strict=True))
            return [by_source[i] for i in range(len(sources))]

        self.compiler.compile = compile_cuda_first
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_sorted

    def run(self) -> None:
        started = time.monotonic()
        super().run()
        dirs = {Path(self.build_lib) / "mlkernels"}
        if self.inplace:
            build_py = self.get_finalized_command("build_py")
            dirs.add(Path(build_py.get_package_dir("mlkernels")).resolve())
        for folder in sorted(dirs):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "_build_config.py").write_text(build_config_text())
        log(f"build_ext done in {time.monotonic() - started:.1f} s")


setup(
    name="mlkernels",
    version=VERSION,
    packages=find_packages(include=["mlkernels", "mlkernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
)
