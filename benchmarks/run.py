"""Run every family's benchmark (ours vs the anchor, same process, same inputs).

    python benchmarks/run.py            # full run
    python benchmarks/run.py --quick    # small shapes, short timing
    python benchmarks/run.py --only boxes

Prints a markdown table (median times, anchor/ours ratio) and writes
benchmarks/results/latest.json (latest-quick.json for --quick, so a quick run never replaces
the full results that are kept in git). Each bench_<family>.py defines
``cases(quick) -> list[Case]``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
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
    args = parser.parse_args(argv)
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.5)

    import mlkernels  # noqa: F401  (loads the ops)

    info = harness.machine()
    rows = []
    for family in args.only or families():
        module = importlib.import_module(f"bench_{family}")
        print(f"{family}:", flush=True)
        rows += harness.run_cases(module.cases(args.quick), min_run_time)
    print()
    print(harness.markdown_table(rows, info))
    name = "latest-quick.json" if args.quick else "latest.json"
    path = harness.save(rows, info, args.out, name)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
