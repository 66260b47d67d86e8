"""Our CUDA kernels next to torchvision's, from the machine code both ship: registers and SASS
instruction counts of roi_align's and nms's kernels for one architecture (default sm_90, the
H200's), written as a markdown table (stdout, or --out).

    python benchmarks/sass_compare.py                  # float kernels, sm_90
    python benchmarks/sass_compare.py --arch 80 --out /tmp/sass.md

Without a GPU this is the closest look at how the kernels will run: registers set the occupancy
(docs/cuda-report.md works it out for ours), and the instruction counts bound the work of a thread.
They are static counts (every path of the kernel, the rare ones too), so they compare kernels of
the same structure, not running times. The global loads (LDG), stores (STG) and reductions
(RED/ATOM, atomics) are counted apart.

Needs cuobjdump and nvdisasm, on PATH or from NVIDIA's wheels in this Python's environment (the
dev machine's CUDA toolkit has neither: `pip install nvidia-cuda-cuobjdump==13.5.37
nvidia-cuda-nvdisasm==13.5.37`), our extension built with CUDA for the arch, and a torchvision
wheel with CUDA kernels (its _C.so or _C_stable.so). Exits 2 when one is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cuda_report import demangle, readable

# (row label, torchvision's kernel: a pattern for its mangled name and the name shown, a pattern
# for our readable name, as docs/cuda-report.md writes it)
PAIRS = [
    (
        "roi_align forward",
        (
            r"(?<!ps_)roi_align_forward_kernel_implIfE",
            "vision::roi_align_forward_kernel_impl<float>",
        ),
        r"^roi_align::roi_align_forward_kernel \[float\]",
    ),
    (
        "roi_align input gradient",
        (
            r"(?<!ps_)roi_align_backward_kernel_implIfE",
            "vision::roi_align_backward_kernel_impl<float>",
        ),
        r"^roi_align::roi_align_backward_kernel \[float\]",
    ),
    ("roi_align box gradient (fused pass)", None, r"^roi_align::PlainChunkBlock<\w+, float"),
    ("roi_align box gradient", None, r"^roi_align::BoxGradBlock<float"),
    (
        "nms mask",
        (r"nms_kernel_implIfE", "vision::nms_kernel_impl<float>"),
        r"^proposals::.*Mask.*float",
    ),
]


@dataclass
class Function:
    name: str  # readable (ours) or mangled (torchvision's)
    registers: int = 0
    instructions: int = 0
    loads: int = 0  # LDG
    stores: int = 0  # STG
    atomics: int = 0  # RED, ATOM


def tool(name: str) -> str:
    """The tool on PATH, else from the nvidia-cuda-* wheels (their nvidia/cu*/bin)."""
    path = shutil.which(name)
    if path is None:
        for folder in sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]:
            path = next((str(p) for p in Path(folder).glob(f"nvidia/cu*/bin/{name}")), None)
            if path is not None:
                break
    if path is None:
        print(
            f"sass_compare: {name} is neither on PATH nor installed (pip install "
            "nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37)",
            file=sys.stderr,
        )
        sys.exit(2)
    return path


def cubins(library: Path, arch: str, into: Path) -> list[Path]:
    """The library's cubins for sm_<arch>, extracted into `into`."""
    cuobjdump = tool("cuobjdump")
    listing = subprocess.run(
        [cuobjdump, "--list-elf", str(library)], capture_output=True, text=True
    ).stdout
    names = re.findall(rf"ELF file\s+\d+: (\S+\.sm_{arch}\.cubin)", listing)
    for name in names:
        subprocess.run(
            [cuobjdump, "-xelf", name, str(library)], cwd=into, capture_output=True, check=True
        )
    return [into / name for name in names]


def functions(cubin: Path) -> dict[str, Function]:
    """Every kernel of a cubin by mangled name: its registers (-res-usage) and instruction counts
    (-sass)."""
    cuobjdump = tool("cuobjdump")
    # cuobjdump -sass runs nvdisasm from PATH
    env = {**os.environ, "PATH": f"{Path(tool('nvdisasm')).parent}{os.pathsep}{os.environ['PATH']}"}
    out: dict[str, Function] = {}
    usage = subprocess.run(
        [cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True
    ).stdout
    for name, regs in re.findall(r"Function (\S+):\s*\n\s*REG:(\d+)", usage):
        out[name] = Function(name, registers=int(regs))
    current = None
    sass = subprocess.run(
        [cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, env=env
    ).stdout
    for line in sass.splitlines():
        if m := re.match(r"\s+Function : (\S+)", line):
            current = out.setdefault(m.group(1), Function(m.group(1)))
        elif current is not None and (m := re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(\S+)", line)):
            op = m.group(1) if not m.group(1).startswith("@") else line.split()[2]
            current.instructions += 1
            current.loads += op.startswith("LDG")
            current.stores += op.startswith("STG")
            current.atomics += op.startswith(("RED", "ATOM"))
    return out


def library_functions(library: Path, arch: str) -> dict[str, Function]:
    with tempfile.TemporaryDirectory() as tmp:
        found: dict[str, Function] = {}
        for cubin in cubins(library, arch, Path(tmp)):
            found.update(functions(cubin))
    return found


def torchvision_library() -> Path | None:
    import torchvision

    folder = Path(torchvision.__file__).parent
    for name in ("_C.so", "_C_stable.so"):
        if (folder / name).exists():
            return folder / name
    return next(iter(folder.glob("_C*.so")), None)


def row(label: str, who: str, f: Function) -> str:
    return (
        f"| {label} | {who} | `{f.name}` | {f.registers} | {f.instructions} | {f.loads} | "
        f"{f.stores} | {f.atomics} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="the sm_ architecture (default 90)")
    parser.add_argument("--out", type=Path, help="write the table here (default stdout)")
    args = parser.parse_args(argv)

    import mlkernels._C as ours_module

    ours_lib = Path(ours_module.__file__)
    theirs_lib = torchvision_library()
    if theirs_lib is None:
        print("sass_compare: torchvision has no compiled library", file=sys.stderr)
        return 2
    ours = library_functions(ours_lib, args.arch)
    theirs = library_functions(theirs_lib, args.arch)
    if not ours or not theirs:
        missing = "our extension" if not ours else f"torchvision ({theirs_lib.name})"
        print(f"sass_compare: {missing} has no sm_{args.arch} code", file=sys.stderr)
        return 2
    readable_names = dict(zip(ours, (readable(d) for d in demangle(list(ours))), strict=True))

    lines = [
        f"sm_{args.arch}; ours: {ours_lib.name}, torchvision: {theirs_lib.name}. Static counts.",
        "",
        "| kernel | whose | function | registers | instructions | LDG | STG | RED/ATOM |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, their_kernel, ours_pattern in PAIRS:
        if their_kernel is not None:
            pattern, shown = their_kernel
            for name, f in theirs.items():
                if re.search(pattern, name):
                    f.name = shown
                    lines.append(row(label, "torchvision", f))
        for mangled, f in ours.items():
            if re.search(ours_pattern, readable_names[mangled]):
                f.name = readable_names[mangled]
                lines.append(row(label, "ours", f))
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
