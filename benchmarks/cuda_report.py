"""The CUDA kernels' resources, from ptxas: registers, spills, shared memory and the occupancy these
imply, per kernel and architecture, written to docs/cuda-report.md (`make cuda-report`).

    python benchmarks/cuda_report.py                 # every arch of setup.py's default list
    python benchmarks/cuda_report.py --archs 9.0     # only these
    python benchmarks/cuda_report.py --check         # CI: write nothing, exit 1 on a spill

Each csrc/*/*_cuda.cu is compiled for each arch with the flags setup.py gives nvcc (its nvcc list
and default archs are read from setup.py itself, torch's from torch.utils.cpp_extension), plus
`-Xptxas -v`, as `nvcc -cubin`: the device code only, which is all that ptxas reports on, without
the host compile that costs as much again. The jobs run in parallel (--jobs, default the number of
cores) and their ptxas output is cached (~/.cache/mlkernels/cuda-report, or
$MLKERNELS_CUDA_REPORT_CACHE), keyed by the command, nvcc's version and every file under csrc/, so a
second run with nothing changed takes seconds.

Occupancy is worked out as CUDA's occupancy calculator does, from the block size each kernel is
launched with (LAUNCHES below: the launch sites in csrc/*/*_kernels.h) and the per-SM limits of the
arch (ARCH_LIMITS): resident threads per SM out of the most an SM holds, and which limit binds.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "cuda-report.md"
# ccache does not cache `nvcc -cubin` (it counts it "uncacheable"), so the script keeps its own
# cache, out of the tree as ccache's is, so that it outlives a clean clone (CI).
CACHE = Path(
    os.environ.get("MLKERNELS_CUDA_REPORT_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "mlkernels"
    / "cuda-report"
)

# Per SM, from the CUDA programming guide's table of compute-capability features. Registers are
# given to a warp in units of 256 (a thread's count rounded up to a multiple of 8); shared memory
# in units of 128 bytes, plus 1 KB that the runtime reserves per block.
# 8.0 and 9.0 are what we build; the others let `make gpu-check` report on the GPU it runs on.
ARCH_LIMITS = {
    "8.0": dict(registers=65536, threads=2048, blocks=32, shared=164 * 1024),
    "8.6": dict(registers=65536, threads=1536, blocks=16, shared=100 * 1024),
    "8.9": dict(registers=65536, threads=1536, blocks=24, shared=100 * 1024),
    "9.0": dict(registers=65536, threads=2048, blocks=32, shared=228 * 1024),
    "10.0": dict(registers=65536, threads=2048, blocks=32, shared=228 * 1024),
}
REGISTER_UNIT = 256
SHARED_UNIT = 128
SHARED_RESERVED_PER_BLOCK = 1024


@dataclass(frozen=True)
class Launch:
    """How a kernel is launched: its block size and dynamic shared memory in bytes (None when it
    depends on the input: then shared_bound is the most it takes, used for occupancy)."""

    threads: int
    shared: int | None = 0
    shared_bound: int = 0
    note: str = ""


# Launch shapes, matched (first match wins) against the demangled kernel name. They mirror the
# launch sites in csrc/*/*_kernels.h; a kernel that matches none is reported with "?".
LAUNCHES: list[tuple[str, Launch]] = [
    # roi_align: the deterministic input gradient's two kernels (plain rows, then the rows the
    # general walk redoes) run 128-thread blocks (one thread per map row).
    (r"roi_align_backward_kernel.*\{lambda\(mlk::ThreadIndex const&\)#[12]\}", Launch(128)),
    # roi_align's box gradient: 256-thread blocks, 4 moments a thread in shared memory.
    (r"(BoxGradBlock<|PlainChunkBlock<\w+, )[^,]+, float>", Launch(256, 4 * 256 * 4)),
    (r"(BoxGradBlock<|PlainChunkBlock<\w+, )[^,]+, double>", Launch(256, 4 * 256 * 8)),
    # NMS: one 64-thread block per pair of 64-box words; the reduce takes one thread per mask word
    # of the largest group (occupancy at its largest block).
    (r"NmsMaskBlock<float>", Launch(64, 64 * (4 * 4 + 8))),
    (r"NmsMaskBlock<double>", Launch(64, 64 * (4 * 8 + 8))),
    (
        r"NmsReduceBlock",
        Launch(
            512,
            None,
            48 * 1024,
            "32 to 512 threads, one per removed word of the largest group; (64 + words) x 8 B",
        ),
    ),
    # attention: 128-thread tile blocks whose tiles fill up to 48 KB (attention_tiles.h).
    (
        r"attention::\w+Tiles<",
        Launch(128, None, 48 * 1024, "tiles chosen to fit 48 KB"),
    ),
    # beam search: a power of two from 32 to 256 threads; the row's K beams in shared memory.
    (
        r"beam_search::StepBlock<",
        Launch(256, None, 48 * 1024, "32 to 256 threads; K beams, at most 48 KB"),
    ),
    # Every other kernel is a grid-stride loop over launch_config_1d's 256-thread blocks.
    (r"run_threads_kernel", Launch(256)),
]


def setup_py_defaults() -> tuple[list[str], list[str]]:
    """setup.py's DEFAULT_ARCHS and the literal flags of its nvcc list (its -D defines that
    depend on the build, the torch version and arch list, are added by nvcc_flags)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    archs, flags = None, None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id == "DEFAULT_ARCHS":
                archs = ast.literal_eval(node.value).split(";")
            if (
                isinstance(target, ast.Subscript)
                and isinstance(target.slice, ast.Constant)
                and target.slice.value == "nvcc"
                and isinstance(node.value, ast.List)
            ):
                flags = [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
    if archs is None or flags is None:
        sys.exit("cuda_report: cannot find DEFAULT_ARCHS or the nvcc flags in setup.py")
    return archs, flags


def nvcc_flags(setup_flags: list[str], archs: list[str]) -> list[str]:
    """What torch's CUDAExtension build gives nvcc for our sources, less -c and the -gencode."""
    import torch
    from torch.utils import cpp_extension

    torch_dir = Path(torch.__file__).parent
    includes = [ROOT / "csrc", torch_dir / "include", torch_dir / "include/torch/csrc/api/include"]
    try:
        import nvidia  # the CUDA headers torch's nvidia-* wheels carry (as setup.py adds)

        for base in nvidia.__path__:
            includes += sorted(Path(base).glob("cu[0-9]*/include"))
    except ImportError:
        pass
    includes.append(Path(sysconfig.get_paths()["include"]))
    defines = [
        f'-DMLK_TORCH_VERSION="{torch.__version__}"',
        f'-DMLK_CUDA_ARCHS="{";".join(archs)}"',
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
    ]
    return [
        *(f"-I{d}" for d in includes),
        *cpp_extension.COMMON_NVCC_FLAGS,
        *setup_flags,
        *defines,
        cpp_standard(cpp_extension),
    ]


def cpp_standard(cpp_extension) -> str:
    """The -std= that this torch's extension build gives nvcc: c++20 from the torch versions whose
    cpp_extension says so (2.10 on), else c++17, as older ones used."""
    import inspect

    return "-std=c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "-std=c++17"


def find_nvcc() -> str | None:
    """nvcc on PATH, else the toolkit's (as setup.py's build would find it through CUDA_HOME)."""
    for candidate in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.access(candidate, os.X_OK) and os.path.isfile(candidate):
            return candidate
    return None


def sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def compile_one(nvcc: str, source: Path, arch: str, flags: list[str], key: str) -> str:
    """ptxas's report for one source and arch (from the cache when nothing changed)."""
    sm = arch.replace(".", "")
    command = [nvcc, "-cubin", f"-gencode=arch=compute_{sm},code=sm_{sm}", *flags, "-Xptxas", "-v"]
    entry = hashlib.sha256("\0".join([key, str(source), *command]).encode()).hexdigest()[:24]
    cached = CACHE / f"{source.stem}-sm_{sm}-{entry}.log"
    if cached.is_file():
        return cached.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [*command, str(source), "-o", str(Path(tmp) / "out.cubin")],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name} for sm_{sm}:\n{output[-4000:]}")
    CACHE.mkdir(parents=True, exist_ok=True)
    cached.write_text(output)
    return output


@dataclass
class Kernel:
    mangled: str
    full: str = ""  # demangled
    name: str = ""  # shortened for the table
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    static_shared: int = 0


def parse_ptxas(output: str) -> list[Kernel]:
    kernels: list[Kernel] = []
    for line in output.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            kernels.append(Kernel(m.group(1)))
        elif not kernels:
            continue
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+)", line):
            k = kernels[-1]
            k.stack, k.spill_stores, k.spill_loads = (int(g) for g in m.groups())
        elif m := re.search(r"Used (\d+) registers", line):
            kernels[-1].registers = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                kernels[-1].static_shared = int(s.group(1))
    return kernels


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return names
    result = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = result.stdout.splitlines()
    return lines if len(lines) == len(names) else names


# AT_DISPATCH_FLOATING_TYPES(_AND2(kHalf, kBFloat16)) expands the kernel's code once per case,
# in this order: the Nth lambda of a dispatch is the Nth dtype here.
DISPATCH_ORDER = ("double", "float", "half", "bfloat16")


def readable(demangled: str) -> str:
    """`void mlk::run_threads_kernel<mlk::boxes::decode_boxes_kernel<mlk::CudaRunner>(...)::
    {lambda()#1}::operator()() const::{lambda()#2}::operator()() const::{lambda(mlk::ThreadIndex
    const&)#1}>(...)` as `boxes::decode_boxes_kernel [float] λ1`: the function that launches the
    lambda, the dtype of AT_DISPATCH's case (its wrapper lambda, then a lambda per case) and the
    lambda's number in that case; a cooperative kernel as its block type."""
    name = demangled.replace("mlk::", "").replace("c10::", "")
    m = re.match(r"void run_(?:threads|blocks)_kernel<(.*)>\((.*)\)$", name)
    if m is None:
        return name
    inner = m.group(1).strip()
    if "::{lambda" not in inner:
        return re.sub(r"\(.*", "", inner)
    head = re.sub(r"<[^<>]*(<[^<>]*>[^<>]*)*>\(.*", "", inner.split("::{lambda")[0])
    lambdas = re.findall(r"\{lambda\(([^)]*)\)#(\d+)\}", inner)
    dispatched = (
        len(lambdas) == 3
        and lambdas[0] == ("", "1")
        and lambdas[1][0] == ""
        and int(lambdas[1][1]) <= len(DISPATCH_ORDER)
    )
    if dispatched:
        return f"{head} [{DISPATCH_ORDER[int(lambdas[1][1]) - 1]}] λ{lambdas[2][1]}"
    return f"{head} λ" + ".".join(n for _, n in lambdas)


def occupancy(kernel: Kernel, launch: Launch, limits: dict) -> tuple[int, str]:
    """Resident threads per SM and the limit that binds."""
    warps = math.ceil(launch.threads / 32)
    regs_per_warp = math.ceil(max(kernel.registers, 1) * 32 / REGISTER_UNIT) * REGISTER_UNIT
    shared = kernel.static_shared + (launch.shared if launch.shared is not None else 0)
    if launch.shared is None:
        shared += launch.shared_bound
    shared_per_block = math.ceil(shared / SHARED_UNIT) * SHARED_UNIT + SHARED_RESERVED_PER_BLOCK
    by = {
        "registers": (limits["registers"] // regs_per_warp) // warps,
        "threads": limits["threads"] // (warps * 32),
        "blocks": limits["blocks"],
        "shared memory": limits["shared"] // shared_per_block,
    }
    blocks = min(by.values())
    binding = [k for k, v in by.items() if v == blocks]
    return blocks * launch.threads, ", ".join(binding)


def launch_of(name: str) -> Launch | None:
    for pattern, launch in LAUNCHES:
        if re.search(pattern, name):
            return launch
    return None


def kb(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n >= 1024 else f"{n} B"


def table(arch: str, kernels_by_source: dict[str, list[Kernel]]) -> list[str]:
    limits = ARCH_LIMITS[arch]
    lines = [
        f"## sm_{arch.replace('.', '')}",
        "",
        f"Per SM: {limits['registers'] // 1024}K registers, {limits['threads']} threads, "
        f"{limits['blocks']} blocks, {limits['shared'] // 1024} KB shared memory.",
        "",
        "| source | kernel | registers | spill st/ld (B) | static smem | block | dynamic smem "
        "| resident threads / SM | limited by |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for source, kernels in kernels_by_source.items():
        for k in sorted(kernels, key=lambda k: k.name):
            launch = launch_of(k.full)
            spill = f"{k.spill_stores}/{k.spill_loads}"
            if k.spill_stores or k.spill_loads:
                spill = f"**{spill}**"
            if launch is None:
                block, dynamic, resident, binding = "?", "?", "?", "launch shape unknown"
            else:
                block = str(launch.threads)
                if launch.shared is None:
                    dynamic = f"≤ {kb(launch.shared_bound)}"
                else:
                    dynamic = kb(launch.shared)
                threads, binding = occupancy(k, launch, limits)
                resident = (
                    f"{threads} / {limits['threads']} ({100 * threads // limits['threads']}%)"
                )
                if launch.note:
                    binding += f" ({launch.note})"
            lines.append(
                f"| {source} | `{k.name}` | {k.registers} | {spill} | {kb(k.static_shared)} "
                f"| {block} | {dynamic} | {resident} | {binding} |"
            )
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    default_archs, setup_flags = setup_py_defaults()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=";".join(default_archs), help="e.g. '8.0;9.0'")
    parser.add_argument("--out", type=Path, default=REPORT, help="the markdown report")
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 on a spill, say whether --out is out of date",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    archs = [a.strip() for a in re.split(r"[;, ]+", args.archs) if a.strip()]
    unknown = [a for a in archs if a not in ARCH_LIMITS]
    if unknown:
        sys.exit(f"cuda_report: no SM limits for arch {unknown} (known: {list(ARCH_LIMITS)})")
    nvcc = find_nvcc()
    if nvcc is None:
        sys.exit("cuda_report: no nvcc on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    version = version.strip().splitlines()[-1] if version.strip() else "unknown"
    flags = nvcc_flags(setup_flags, archs)
    sources = sorted(ROOT.glob("csrc/*/*_cuda.cu"))
    key = version + sources_digest()

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        futures = {
            (arch, source): pool.submit(compile_one, nvcc, source, arch, flags, key)
            for arch in archs
            for source in sources
        }
        outputs = {job: future.result() for job, future in futures.items()}
    seconds = time.monotonic() - started

    parsed = {job: parse_ptxas(out) for job, out in outputs.items()}
    everything = [k for kernels in parsed.values() for k in kernels]
    for k, full in zip(everything, demangle([k.mangled for k in everything]), strict=True):
        k.full = full
        k.name = readable(full)

    spills = [
        (arch, source.name, k.name)
        for (arch, source), kernels in parsed.items()
        for k in kernels
        if k.spill_stores or k.spill_loads
    ]
    lines = [
        "# CUDA resource report",
        "",
        "Written by `make cuda-report` (benchmarks/cuda_report.py): ptxas's `-Xptxas -v` for every "
        "kernel of csrc/*/*_cuda.cu, compiled with setup.py's nvcc flags. Do not edit by hand.",
        "",
        f"nvcc: {version}. Kernels: {len(everything)} over {len(archs)} arch(s). "
        f"Spills: {len(spills) or 'none'}.",
        "",
        "Kernel names: a `run_threads_kernel` by the function that launches its lambda, the dtype "
        "of the AT_DISPATCH case it is in and its number there (λ1, λ2: the function's thread "
        "lambdas in source order); a cooperative kernel by its block type. Block and "
        "dynamic shared memory are those of the launch sites; where the shared memory depends on "
        "the input, occupancy is computed at its bound.",
        "",
    ]
    for arch in archs:
        lines += table(arch, {s.name: parsed[(arch, s)] for s in sources})
    text = "\n".join(lines)
    print(
        f"cuda_report: {len(everything)} kernels, {len(sources)} sources x {len(archs)} archs, "
        f"compiled in {seconds:.0f} s",
        file=sys.stderr,
    )
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(
                f"cuda_report: {args.out} differs from this build's report (another nvcc, or "
                "kernels changed since `make cuda-report`)",
                file=sys.stderr,
            )
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"cuda_report: wrote {args.out}", file=sys.stderr)
    for arch, source, name in spills:
        print(f"cuda_report: SPILL in {source} sm_{arch}: {name}", file=sys.stderr)
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
