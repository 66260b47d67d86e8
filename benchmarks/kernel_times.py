"""Where the time of each benchmark case goes, kernel by kernel: every case of the chosen families
at `make bench`'s shapes, ours and the anchor, run under torch.profiler, with each kernel's time per
call of the case. On a GPU (`make gpu-check` runs it) this is the device time of every CUDA kernel
launched, the profile that tells which of our kernels to work on next; on the CPU, the CPU time of
every op (a smoke test of the script, and a profile of the CPU kernels).

    python benchmarks/kernel_times.py --device cuda --out kernels.md    # on a GPU
    python benchmarks/kernel_times.py --quick                           # CPU, small shapes

Each side is run once untimed, then `--runs` times under the profiler; times are the profiler's
totals divided by the runs. Kernels under 1% of a side's total are summed into one line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

DEFAULT_FAMILIES = ("roi_align", "proposals")
NAME_WIDTH = 90
SMALL_SHARE = 0.01


def kernel_times(fn, runs: int, device: str) -> list[tuple[str, int, float]]:
    """(name, calls per run, microseconds per run) of every kernel (CUDA) or op (CPU) that
    fn() runs, longest first."""
    fn()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(runs):
            fn()
        if cuda:
            torch.cuda.synchronize()
    out = []
    for event in prof.key_averages():
        if cuda:
            # Kernels are the events with device time and no CPU time of their own.
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            micros = event.self_device_time_total
        else:
            micros = event.self_cpu_time_total
        if micros > 0:
            out.append((event.key, round(event.count / runs), micros / runs))
    return sorted(out, key=lambda row: -row[2])


def short(name: str) -> str:
    name = name.replace("\n", " ").replace("|", "/")
    return name if len(name) <= NAME_WIDTH else name[: NAME_WIDTH - 3] + "..."


def case_table(case, runs: int, device: str) -> list[str]:
    lines = [
        f"### {case.family}: {case.name} [{case.shape}]",
        "",
        "| side | kernel | calls | us per call of the case | share |",
        "|---|---|---:|---:|---:|",
    ]
    for side, fn in (("ours", case.ours), (case.anchor_name, case.anchor)):
        try:
            rows = kernel_times(fn, runs, device)
        except Exception as error:  # one side failing must not hide the others
            lines.append(f"| {side} | failed: {short(str(error))} | | | |")
            continue
        total = sum(micros for _, _, micros in rows) or 1.0
        small = [r for r in rows if r[2] < SMALL_SHARE * total]
        for name, calls, micros in rows:
            if micros >= SMALL_SHARE * total:
                lines.append(
                    f"| {side} | `{short(name)}` | {calls} | {micros:.1f} | {micros / total:.0%} |"
                )
        if small:
            micros = sum(r[2] for r in small)
            lines.append(
                f"| {side} | {len(small)} others | {sum(r[1] for r in small)} | {micros:.1f} | "
                f"{micros / total:.0%} |"
            )
        lines.append(f"| {side} | **total** | | **{total:.1f}** | |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the benchmarks' small shapes")
    parser.add_argument("--runs", type=int, default=5, help="profiled calls of each side")
    parser.add_argument(
        "--only", action="append", help=f"families (default: {', '.join(DEFAULT_FAMILIES)})"
    )
    parser.add_argument("--out", type=Path, help="write the markdown here (default stdout)")
    args = parser.parse_args(argv)

    import mlkernels

    if args.device == "cuda" and not (
        torch.cuda.is_available() and mlkernels.build_info().get("cuda_compiled")
    ):
        print(
            "kernel_times: --device cuda needs a GPU and mlkernels built with CUDA", file=sys.stderr
        )
        return 2
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [
        f"Kernel times on {args.device} ({where}, torch {torch.__version__}), per call of each "
        f"case, {args.runs} profiled calls a side.",
        "",
    ]
    for family in args.only or DEFAULT_FAMILIES:
        module = importlib.import_module(f"bench_{family}")
        for case in module.cases(args.quick, args.device):
            lines += case_table(case, args.runs, args.device)
            print(f"kernel_times: {case.family} {case.name} [{case.shape}]", file=sys.stderr)
    text = "\n".join(lines)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
