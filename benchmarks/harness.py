"""A small harness over torch.utils.benchmark: each family's bench_<family>.py lists Cases (ours
and the anchor on the same inputs), run.py times them all in one process and reports ratios.

On CUDA (``device="cuda"``) the same cases run on the GPU, and each row also gets the peak extra
GPU memory of one call of each side; a case that fails (its check, or an error) is recorded with
its message and the run goes on, so that one run on a borrowed GPU reports every case. On the CPU
a failure stops the run, as before, and rows and table are unchanged."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
import timeit
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.benchmark as tbench


@dataclasses.dataclass
class Case:
    """One comparison: ``ours`` and ``anchor`` compute the same thing on the same inputs.

    family/name/shape label the row; ``anchor_name`` says what the anchor is
    (e.g. "torchvision.ops.nms"). ``check`` (optional) asserts the two results agree before
    timing, so a ratio is never reported for different answers."""

    family: str
    name: str
    shape: str
    ours: Callable[[], object]
    anchor: Callable[[], object]
    anchor_name: str
    check: Callable[[object, object], None] | None = None
    target_ratio: float | None = None  # the ratio the family's issue asks for, if any


def is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def machine(device: str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if is_cuda(device):  # CPU results keep their keys as they were
        import torchvision

        info["device"] = str(torch.device(device))
        info["cuda_runtime"] = torch.version.cuda
        info["torchvision"] = torchvision.__version__
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30)
    return info


def _cuda_timer() -> float:
    """What torch.utils.benchmark's default timer does on a machine with a GPU (it synchronizes
    the accelerator, then reads the clock), spelled out so that CUDA timings never depend on it."""
    torch.cuda.synchronize()
    return timeit.default_timer()


def median_seconds(fn: Callable[[], object], min_run_time: float, device: str = "cpu") -> float:
    # The timer brackets each block of calls; on CUDA it synchronizes first, so a block's time
    # includes the kernels it queued.
    extra = {"timer": _cuda_timer} if is_cuda(device) else {}
    timer = tbench.Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), **extra
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median


def peak_extra_mb(fn: Callable[[], object]) -> float:
    """GPU memory (MiB) that one call of ``fn`` allocates at its peak beyond what was allocated
    before it (its output included): torch.cuda.max_memory_allocated's delta."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return (peak - before) / 2**20


def run_cases(cases: list[Case], min_run_time: float, device: str = "cpu") -> list[dict]:
    if is_cuda(device):
        return [_run_cuda_case(case, min_run_time, device) for case in cases]
    rows = []
    for case in cases:
        if case.check is not None:
            case.check(case.ours(), case.anchor())
        ours = median_seconds(case.ours, min_run_time)
        anchor = median_seconds(case.anchor, min_run_time)
        rows.append(
            {
                "family": case.family,
                "case": case.name,
                "shape": case.shape,
                "anchor": case.anchor_name,
                "anchor_ms": anchor * 1e3,
                "ours_ms": ours * 1e3,
                "ratio": anchor / ours,
                "target_ratio": case.target_ratio,
            }
        )
        print(
            f"  {case.family}/{case.name} [{case.shape}]: ours {ours * 1e3:.3f} ms, "
            f"{case.anchor_name} {anchor * 1e3:.3f} ms, ratio {anchor / ours:.2f}x",
            flush=True,
        )
    return rows


def _error(error: BaseException) -> str:
    """The exception's type and first lines (assert_close says what differs on lines 2-4)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {' / '.join(lines[:4])}"[:400]


def _run_cuda_case(case: Case, min_run_time: float, device: str) -> dict:
    """One case on CUDA: the check, the peak memory of each side, the timings. Each step that
    fails is recorded in the row's "error" and the rest still runs."""
    row = {
        "family": case.family,
        "case": case.name,
        "shape": case.shape,
        "anchor": case.anchor_name,
        "anchor_ms": None,
        "ours_ms": None,
        "ratio": None,
        "target_ratio": case.target_ratio,
        "anchor_peak_mb": None,
        "ours_peak_mb": None,
        "error": None,
    }
    errors = []

    def attempt(what: str, step: Callable[[], object]) -> object:
        try:
            return step()
        except Exception as error:  # recorded; the run goes on
            errors.append(f"{what}: {_error(error)}")
            traceback.print_exc()
            try:
                torch.cuda.synchronize()  # a later step must not inherit queued work
            except Exception:  # a sticky CUDA error: every later step will report it too
                pass
            return None

    if case.check is not None:
        attempt("check", lambda: case.check(case.ours(), case.anchor()))
    row["ours_peak_mb"] = attempt("ours", lambda: peak_extra_mb(case.ours))
    row["anchor_peak_mb"] = attempt("anchor", lambda: peak_extra_mb(case.anchor))
    if row["ours_peak_mb"] is not None:
        ours = attempt("ours", lambda: median_seconds(case.ours, min_run_time, device))
        row["ours_ms"] = ours * 1e3 if ours is not None else None
    if row["anchor_peak_mb"] is not None:
        anchor = attempt("anchor", lambda: median_seconds(case.anchor, min_run_time, device))
        row["anchor_ms"] = anchor * 1e3 if anchor is not None else None
    if row["ours_ms"] and row["anchor_ms"]:
        row["ratio"] = row["anchor_ms"] / row["ours_ms"]
    row["error"] = "; ".join(errors) or None
    print(
        f"  {case.family}/{case.name} [{case.shape}]: ours {_ms(row['ours_ms'])} ms, "
        f"{case.anchor_name} {_ms(row['anchor_ms'])} ms, ratio {_ratio(row['ratio'])}, "
        f"peak MB ours {_mb(row['ours_peak_mb'])} / anchor {_mb(row['anchor_peak_mb'])}"
        + (f"  FAILED: {row['error']}" if row["error"] else ""),
        flush=True,
    )
    return row


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def markdown_table(rows: list[dict], info: dict) -> str:
    if info.get("device", "cpu") != "cpu":
        return _cuda_markdown_table(rows, info)
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, "
        f"torch {info['torch']}" + (f", GPU {info['cuda_device']}" if info["cuda_device"] else ""),
        "",
        "| family | case | shape | anchor | anchor ms | ours ms | anchor/ours | target |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        target = f">= {r['target_ratio']:g}x" if r["target_ratio"] else ""
        lines.append(
            f"| {r['family']} | {r['case']} | {r['shape']} | {r['anchor']} | "
            f"{r['anchor_ms']:.3f} | {r['ours_ms']:.3f} | {r['ratio']:.2f}x | {target} |"
        )
    return "\n".join(lines)


def _cuda_markdown_table(rows: list[dict], info: dict) -> str:
    """markdown_table for a CUDA run: the GPU in the header, peak extra GPU memory per side and a
    note column for cases that failed."""
    lines = [
        f"Device: {info['device']}, GPU {info['cuda_device']} ({info['gpu_memory_gb']} GB), "
        f"CUDA {info['cuda_runtime']}, torch {info['torch']}, torchvision {info['torchvision']}; "
        f"host {info['cpu']}, {info['cores']} cores",
        "",
        "| family | case | shape | anchor | anchor ms | ours ms | anchor/ours | target "
        "| anchor peak MB | ours peak MB | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        target = f">= {r['target_ratio']:g}x" if r["target_ratio"] else ""
        note = (r["error"] or "").replace("|", "/")
        lines.append(
            f"| {r['family']} | {r['case']} | {r['shape']} | {r['anchor']} | "
            f"{_ms(r['anchor_ms'])} | {_ms(r['ours_ms'])} | {_ratio(r['ratio'])} | {target} | "
            f"{_mb(r['anchor_peak_mb'])} | {_mb(r['ours_peak_mb'])} | {note} |"
        )
    return "\n".join(lines)


def save(rows: list[dict], info: dict, directory: Path, name: str = "latest.json") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info, "rows": rows}
    path = directory / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
