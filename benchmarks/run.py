"""Run every family's benchmark (ours vs the anchor, same process, same inputs).

    python benchmarks/run.py            # full run
    python benchmarks/run.py --quick    # small shapes, short timing
    python benchmarks/run.py --only boxes
    python benchmarks/run.py --device cuda   # ours and the anchor on the GPU

Prints a markdown table (median times, anchor/ours ratio) and writes
benchmarks/results/latest.json (latest-quick.json for --quick, so a quick run never replaces
the full results that are kept in git; latest-cuda.json and latest-cuda-quick.json for
--device cuda). Each bench_<family>.py defines ``cases(quick, device) -> list[Case]``: inputs are
drawn on the CPU generator as for the CPU run, then moved to the device.

On CUDA the table adds the peak extra GPU memory of one call of each side, and a case that fails
is reported in the table (note column) and in the JSON ("error") instead of stopping the run;
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from pathlib import Path

# torch.utils.benchmark imports cpp_extension, which warns about CUDA_HOME on machines without a
# GPU runtime; nothing here compiles, so the warning is noise.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402


def families() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short timing")
    parser.add_argument("--only", action="append", choices=families(), help="run these families")
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds of timing per measurement (default 0.05 quick, 0.5 full)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON goes")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where ours and the anchor run (default cpu); cuda results go to latest-cuda*.json",
    )
    parser.add_argument(
        "--markdown", type=Path, default=None, help="also write the markdown table to this file"
    )
    args = parser.parse_args(argv)
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.5)

    import mlkernels  # noqa: F401  (loads the ops)

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("run.py: --device cuda needs a visible CUDA device; none is", file=sys.stderr)
            return 2
        if not mlkernels.build_info().get("cuda_compiled"):
            print("run.py: --device cuda needs mlkernels built with CUDA", file=sys.stderr)
            return 2

    info = harness.machine(args.device)
    rows, broken = [], []
    for family in args.only or families():
        module = importlib.import_module(f"bench_{family}")
        print(f"{family}:", flush=True)
        try:
            cases = module.cases(args.quick, args.device)
        except Exception:
            if args.device == "cpu":
                raise
            # On a borrowed GPU one run must report every family that can run.
            traceback.print_exc()
            broken.append(family)
            continue
        rows += harness.run_cases(cases, min_run_time, args.device)
    print()
    table = harness.markdown_table(rows, info)
    extras = harness.extras_table(rows, info)  # "" unless a family reports memory or GFLOP/s
    if extras:
        table += "\n\n" + extras
    measures = harness.measures_table(rows)  # "" unless a case reports further measurements
    if measures:
        table += "\n\n" + measures
    print(table)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
    suffix = "-cuda" if args.device == "cuda" else ""
    name = f"latest{suffix}-quick.json" if args.quick else f"latest{suffix}.json"
    path = harness.save(rows, info, args.out, name)
    print(f"\nresults: {path}")
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        print(f"FAILED {r['family']}/{r['case']} [{r['shape']}]: {r['error']}", file=sys.stderr)
    for family in broken:
        print(f"FAILED {family}: its cases could not be built (traceback above)", file=sys.stderr)
    return 1 if failed or broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
